"""The train task: model + rocket loss, the unit the step path calls (TorchRec's
`DLRMTrain` pattern: the model computes logits, the task adds the loss).

    RocketTrainTask(model, loss_cfg)(batch) -> (loss, (terms, rows))

The phase (which towers run, the loss terms, the gradient scale) comes from a
`PhasePlan` set once per phase with `set_plan`; `forward` stores nothing.
Before the loss is returned its finiteness is agreed by every rank: a NaN/inf
loss raises `TrainingDiverged` before backward, i.e. before the tables' fused
optimizer would apply it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rocketrec.data.batch import Batch
from rocketrec.model.loss import LossConfig, PhasePlan, rocket_loss


class TrainingDiverged(RuntimeError):
    pass


class RocketTrainTask(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        loss_cfg: LossConfig,
        plan: PhasePlan,
        weight_norm: Callable[[torch.Tensor | None], torch.Tensor | None],
        all_finite: Callable[[torch.Tensor], bool],
        step_of: Callable[[], int],
    ) -> None:
        """model: the (DMP-wrapped) RocketModel whose towers `plan` already set."""
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg
        self.plan = plan
        self._weight_norm = weight_norm
        self._all_finite = all_finite
        self._step_of = step_of

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[dict[str, float], int]]:
        """batch -> (loss [], (every loss term as a float, rows in the batch))."""
        out = self.model(batch.dense, batch.sparse)
        loss, terms = rocket_loss(
            out.booster,
            out.light,
            batch.labels,
            batch.weights,
            self.loss_cfg,
            self.plan.phase,
            batch.teacher,
            self._weight_norm(batch.weights),
        )
        if not self._all_finite(loss):  # before backward: the tables update inside it
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
