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
    # TorchRec rewrites the model: the sharded tables' input distribution and the
    # preprocessing (RocketModel.featurize, a parameter-free postproc module fed by batch
    # fields) run for the next batch while this one computes
    return TrainPipelineSparseDist(
        dmp,
        opt,  # type: ignore[arg-type]
        device,
        custom_model_fwd=task,  # type: ignore[arg-type]
        pipeline_postproc=True,
    )


def detach(steps: Any) -> None:
    """Give the model its own forwards back (evaluation, the end of an epoch); the
    pipeline re-attaches itself on its next step (`attach`)."""
    if isinstance(steps, TrainPipelineSparseDist):
        steps.detach()


def attach(steps: Any) -> None:
    """Pipeline the model again after `detach`. The in-flight batch's input distribution
    already ran (its context holds the splits and lengths the output distribution of an
    EmbeddingCollection reads), so it must not start again: TorchRec's `attach` re-runs it
    into the same context and the sequence all-to-all then gets sizes from two
    distributions (gloo `in->size == out->size`). `attach(sparse_dist=False)` would skip it
    but also the example batch the model's rewrite traces with, so the rewrite runs with the
    batch and the redistribution is skipped for that one call."""
    if isinstance(steps, TrainPipelineSparseDist):
        steps.start_sparse_data_dist = lambda *args, **kwargs: None  # type: ignore[method-assign]
        try:
            steps.attach()
        finally:
            del steps.start_sparse_data_dist


def pipelined(steps: Any) -> tuple[list[str], list[str]]:
    """(sharded modules, postproc modules) TorchRec's rewrite pipelined, by name."""
    if not isinstance(steps, TrainPipelineSparseDist):
        return [], []
    model = steps._model.module if hasattr(steps._model, "module") else steps._model
    names = {id(m): n for n, m in model.named_modules()}
    mods = [names.get(id(m), type(m).__name__) for m in steps._pipelined_modules]
    return mods, [p.fqn for p in steps._pipelined_postprocs]
