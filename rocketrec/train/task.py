"""The train task: model + rocket loss, the unit the step path calls (TorchRec's
`DLRMTrain` pattern: the model computes logits, the task adds the loss).

    RocketTrainTask(model, loss_cfg)(batch) -> (loss, (terms, rows))

The phase (which towers run, the loss terms, the gradient scale) comes from the
`PhasePlan` the task is built with: the task applies it on every call (the model
holds no run state); `forward` stores nothing.
Before the loss is returned its finiteness is agreed by every rank: a NaN/inf
loss raises `TrainingDiverged` before backward, i.e. before the tables' fused
optimizer would apply it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rocketrec.data.batch import Batch
from rocketrec.model.loss import LossConfig, PhasePlan, rocket_loss


class TrainingDiverged(RuntimeError):
    pass


def weight_norm(w: torch.Tensor | None, world: int) -> torch.Tensor | None:
    """With sample weights on W > 1 workers: the global weight sum / W, the denominator
    of every rank's weighted means. TorchRec and DDP average the gradients over ranks,
    so each rank normalising by its own sum would give a mean of per-rank ratios, not
    the global weighted mean one worker computes on the same global batch
    (docs/results.md section 10)."""
    if w is None or world == 1:
        return None
    total = w.detach().sum().reshape(1).clone()
    dist.all_reduce(total)
    return total[0] / world


def all_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank (all ranks agree on stopping)."""
    ok = torch.tensor([1.0 if bool(torch.isfinite(loss)) else 0.0])
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() == 1.0)


class RocketTrainTask(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        loss_cfg: LossConfig,
        plan: PhasePlan,
        world: int,
        step_of: Callable[[], int],
    ) -> None:
        """model: the (DMP-wrapped) RocketModel; plan: the phase it trains."""
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg
        self.plan = plan
        self.world = world
        self._step_of = step_of

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[dict[str, float], int]]:
        """batch -> (loss [], (every loss term as a float, rows in the batch))."""
        p = self.plan
        out = self.model(batch.dense, batch.sparse, p.run_booster, p.run_light, p.shared_grad_scale)
        loss, terms = rocket_loss(
            out.booster,
            out.light,
            batch.labels,
            batch.weights,
            self.loss_cfg,
            self.plan.phase,
            batch.teacher,
            weight_norm(batch.weights, self.world),
        )
        if not all_finite(loss, self.world):  # before backward: the tables update inside it
            raise TrainingDiverged(
                f"loss is {terms['loss']} at step {self._step_of()} ({terms}); stopped before "
                "applying it. The last checkpoint is intact: lower the learning rates "
                "or check the data, then --resume."
            )
        return loss, (terms, len(batch))

    def extra_repr(self) -> str:
        p: Any = self.plan
        return (
            f"phase={p.phase}, towers=({p.run_booster}, {p.run_light}), trains={sorted(p.trains)}"
        )
