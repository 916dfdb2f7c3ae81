"""The step path: forward + rocket loss (the train task), backward, dense update.

    steps = make_steps(dmp, task, DenseStep(...), device, "pipeline" | "plain")
    terms, rows = steps.progress(batches)     # one step; StopIteration ends the epoch

`pipeline` is TorchRec's TrainPipelineSparseDist (batch copies to the device
ahead of time on their own stream on CUDA; on CPU the same steps in order);
`plain` runs forward, backward and the update in order. Both run the same train
task (rocketrec.train.task) and the same dense update (`DenseStep`: per-tower
clipping, linear warm-up); the tables' fused optimizer updates inside backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.utils import _override_input_dist_forwards

from rocketrec.data.batch import Batch
from rocketrec.train.train_config import TrainConfig


class DenseStep:
    """What the step path calls `optimizer`: zero_grad, then per-tower clipping of the
    dense gradients, linear warm-up and the dense optimizer's step."""

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        clip_groups: list[list[torch.nn.Parameter]],
        cfg: TrainConfig,
        steps_into_phase: Callable[[], int],
    ) -> None:
        self.opt, self.clip_groups, self.cfg = opt, clip_groups, cfg
        self.steps_into_phase = steps_into_phase  # steps of this phase done before this one

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        cfg = self.cfg
        if cfg.grad_clip > 0:
            # per tower: the light tower's gradients never rescale the booster's
            for group in self.clip_groups:
                torch.nn.utils.clip_grad_norm_(group, cfg.grad_clip)
        warm = min(1.0, (self.steps_into_phase() + 1) / max(1, cfg.warmup_steps))
        for g in self.opt.param_groups:
            g["lr"] = cfg.dense_lr * warm
        self.opt.step()


class _SparseDistPipeline(TrainPipelineSparseDist):  # type: ignore[misc,type-arg]
    """TrainPipelineSparseDist without the fx rewrite of the model.

    TorchRec's rewrite pipelines a sharded module only when its input is a field
    of the batch; rocketrec bucketizes raw ids inside the model (so training and
    the exported model cannot disagree), so no sharded module qualifies and the
    rewrite would only fail. The pipeline still owns the step (batch
    prefetch and device copy on its own stream, forward, backward, optimizer);
    the sharded modules run their input distribution in the forward.
    """

    def _pipeline_model(self, batch: Any, context: Any, pipelined_forward: Any = None) -> None:
        self._pipelined_modules: list[Any] = []
        self._original_forwards: list[Any] = []
        self._pipelined_postprocs: list[Any] = []
        self.start_sparse_data_dist(batch, context)
        self._original_kjt_dist_forwards = _override_input_dist_forwards([])


class PlainSteps:
    """The plain step path (no pipeline), with TrainPipelineSparseDist's interface."""

    def __init__(self, fwd: Callable[[Batch], Any], opt: DenseStep, device: torch.device) -> None:
        self.fwd, self.opt, self.device = fwd, opt, device

    def progress(self, data: Iterator[Batch]) -> Any:
        batch = next(data)  # StopIteration ends the epoch, as for the pipeline
        self.opt.zero_grad()
        loss, out = self.fwd(batch.to(self.device))
        loss.backward()  # fused table optimizer steps here
        self.opt.step()
        return out


def make_steps(
    dmp: Any, task: Callable[[Batch], Any], opt: DenseStep, device: torch.device, path: str
) -> Any:
    """The step path `path` ("pipeline" or "plain") for one epoch of one phase."""
    if path == "plain":
        return PlainSteps(task, opt, device)
    return _SparseDistPipeline(dmp, opt, device, custom_model_fwd=task)  # type: ignore[arg-type]
