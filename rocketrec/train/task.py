"""The train task: model + rocket loss, the unit the step path calls (TorchRec's
`DLRMTrain` pattern: the model computes logits, the task adds the loss).

    RocketTrainTask(model, loss_cfg)(batch) -> (loss, (terms, rows))

The phase (which towers run, the loss terms, the gradient scale) comes from the
`PhasePlan` the task is built with: the task applies it on every call (the model
holds no run state); `forward` stores nothing.
The step makes no host sync: the loss terms stay tensors (the loop reads them on
logging steps) and the loss's finiteness is recorded on the device
(`DivergenceGuard`) and checked by the loop at its sync points, before any
checkpoint: a NaN/inf loss stops the run with `TrainingDiverged` naming the first
bad step, and every checkpoint on disk predates it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rocketrec.data.batch import Batch
from rocketrec.errors import UserError
from rocketrec.model.loss import LossConfig, PhasePlan, rocket_loss


class TrainingDiverged(UserError):
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


class DivergenceGuard:
    """Whether every step's loss was finite, kept on the device: recording costs no host
    sync, so the step runs without one. The loop checks it at its sync points (logging,
    evaluation, before a checkpoint, the end), all ranks together: a non-finite loss
    stops the run there with TrainingDiverged naming the first bad step, and no
    checkpoint is ever written after it (the last one stays intact)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def record(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        now = torch.full((), step, dtype=torch.int64, device=self.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0), now, self.first_bad)

    def check(self, world: int, where: str, last: Any = None) -> None:
        """Raise TrainingDiverged if a recorded loss was not finite on any rank; `last`:
        the run's newest checkpoint or a function finding it (the message says where to
        resume from), if any."""
        never = torch.iinfo(torch.int64).max
        first = torch.where(self.first_bad < 0, never, self.first_bad).reshape(1).cpu()
        if world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = int(first.item())
        if step != never:
            last = last() if callable(last) else last
            then = (
                f"The last checkpoint ({last}) is intact: lower the learning rates or check "
                "the data, then --resume."
                if last
                else "No checkpoint was written: lower the learning rates or check the data "
                "and start again."
            )
            raise TrainingDiverged(
                f"loss is not finite at step {step} (finite up to step {step - 1}); stopped "
                f"{where}, before writing any checkpoint after it. {then}"
            )


class RocketTrainTask(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        loss_cfg: LossConfig,
        plan: PhasePlan,
        world: int,
        step_of: Callable[[], int],
        guard: DivergenceGuard,
    ) -> None:
        """model: the (DMP-wrapped) RocketModel; plan: the phase it trains."""
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg
        self.plan = plan
        self.world = world
        self._step_of = step_of
        self.guard = guard

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[dict[str, Any], int]]:
        """batch -> (loss [], (every loss term as a 0-dim tensor, rows in the batch))."""
        p = self.plan
        out = self.model(batch.dense, batch.sparse, p.run_booster, p.run_light, p.shared_grad_scale)
        w, rows = batch.weights, len(batch)
        if batch.n_real is not None:  # a padded reader (pad_final): its padding weighs 0
            rows = batch.n_real
            real = (torch.arange(len(batch), device=batch.labels.device) < rows).float()
            w = real if w is None else w * real
        loss, terms = rocket_loss(
            out.booster,
            out.light,
            batch.labels,
            w,
            self.loss_cfg,
            self.plan.phase,
            batch.teacher,
            weight_norm(w, self.world),
            as_tensors=True,
        )
        self.guard.record(loss, self._step_of() + 1)  # no host sync: checked by the loop
        return loss, (terms, rows)

    def extra_repr(self) -> str:
        p: Any = self.plan
        return (
            f"phase={p.phase}, towers=({p.run_booster}, {p.run_light}), trains={sorted(p.trains)}"
        )
