"""The rocket loss: BCE(booster) + BCE(light) + lambda * hint(light, booster).

Hints (z_l, z_b: light and booster logits [B]; t = the booster target):
    mimic     mean((z_l - t)^2)                                  (the paper's)
    mse_prob  mean((sigmoid(z_l) - sigmoid(t))^2)
    kd        T^2 * BCE(sigmoid(z_l / T), target sigmoid(t / T))

Gradient block (default on): t = z_b.detach(), so the hint's gradient never
reaches booster-only parameters; it reaches the light tower and, through the
light path only, the shared layers. Off: t = z_b, and the hint also pulls the
booster towards the light tower.

Modes: rocket (all three terms), booster_only, light_only, and
teacher_student, whose second phase (`student`) trains the light tower on
BCE + hint against a frozen booster (booster logits computed without grad,
shared tables not trained). Means are weighted by the sample weights if given.
perfect_teacher (experiments only): the light tower alone, with BCE + hint against
a known click probability (synth's true CTR column) instead of a booster: the
ceiling of what any teacher's soft labels can add.

Logged teacher (the spec's `teacher:` column, e.g. production's pCTR): in every mode
the light tower also distils from it, `teacher_lambda * hint(z_l, teacher)`, with the
configured hint and temperature (`teacher_booster`: the booster too, off by default).
The teacher is a constant; rows whose score is missing (NaN here) skip the term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rocketrec.errors import ConfigError
from rocketrec.settings import setting

MODES = ("rocket", "booster_only", "light_only", "teacher_student", "perfect_teacher")
HINTS = ("mimic", "mse_prob", "kd")


@dataclass(frozen=True)
class LossConfig:
    mode: str = setting(
        "rocket",
        "rocket: booster and light together; booster_only / light_only: one tower; "
        "teacher_student: booster first, then the light tower against it",
        resume=False,
        choices=MODES,
    )
    hint: str = setting(
        "kd",
        "hint loss: mimic = MSE of logits (the paper), mse_prob = MSE of probabilities, "
        "kd = tempered BCE x T^2",
        resume=False,
        choices=HINTS,
    )
    hint_weight: float = setting(
        1.0, "lambda, the hint loss weight", resume=False, aliases=("--lambda",)
    )
    temperature: float = setting(2.0, "T for --hint kd", resume=False)
    gradient_block: bool = setting(
        True, "on: the hint never reaches booster parameters", resume=False
    )
    light_shared_grad_scale: float = setting(
        1.0,
        "scale in [0,1] on the light losses' gradient into the shared tables (1 = the paper, "
        "0 = light reads detached embeddings)",
        resume=False,
    )
    teacher_lambda: float = setting(
        1.0,
        "weight of the hint towards the spec's logged teacher score (teacher: in the spec), "
        "in every mode; 0 = off",
        resume=False,
    )
    teacher_booster: bool = setting(
        False, "on: the booster also distils from the logged teacher", resume=False
    )

    def __post_init__(self) -> None:
        if not self.teacher_lambda >= 0:
            raise ConfigError(f"teacher_lambda must be >= 0, got {self.teacher_lambda}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.hint not in HINTS:
            raise ConfigError(f"hint must be one of {', '.join(HINTS)}, got {self.hint!r}")
        if not self.hint_weight >= 0:
            raise ConfigError(f"hint_weight (lambda) must be >= 0, got {self.hint_weight}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.light_shared_grad_scale <= 1.0:
            raise ConfigError(
                f"light_shared_grad_scale must be in [0, 1], got {self.light_shared_grad_scale}"
            )


def _wmean(
    x: torch.Tensor, w: torch.Tensor | None, w_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted mean; `w_norm` replaces this batch's weight sum as the denominator (the
    training loop passes the global sum / world size, so that every rank's batch counts
    by the same normaliser and W workers train like one with the global batch)."""
    if w is None:
        return x.mean()
    return (x * w).sum() / (w.sum() if w_norm is None else w_norm).clamp_min(1e-12)


def bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    w: torch.Tensor | None,
    w_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    return _wmean(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"), w, w_norm)


def hint_loss(
    z_l: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    temperature: float,
    w: torch.Tensor | None,
    w_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    if kind == "mimic":
        per = (z_l - target) ** 2
    elif kind == "mse_prob":
        per = (torch.sigmoid(z_l) - torch.sigmoid(target)) ** 2
    elif kind == "kd":
        t = temperature
        per = (t * t) * F.binary_cross_entropy_with_logits(
            z_l / t, torch.sigmoid(target / t), reduction="none"
        )
    else:
        raise ConfigError(f"unknown hint {kind!r}")
    return _wmean(per, w, w_norm)


def rocket_loss(
    z_b: torch.Tensor | None,
    z_l: torch.Tensor | None,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    cfg: LossConfig,
    phase: str | None = None,
    teacher: torch.Tensor | None = None,
    w_norm: torch.Tensor | None = None,
    as_tensors: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Return (total loss, every term as a float). phase: None or 'teacher'/'student'.

    teacher: teacher logits [B] (NaN = no score for that row): the target of mode
    perfect_teacher, else a logged teacher both towers may distil from (`teacher_lambda`).
    w_norm: denominator of the weighted means instead of this batch's weight sum (see
    `_wmean`). as_tensors: the terms as detached 0-dim tensors (no host sync; the
    training step reads them only on logging steps)."""
    mode = cfg.mode
    logged = None
    if mode == "perfect_teacher":
        if teacher is None:
            raise ConfigError("mode perfect_teacher needs a teacher probability column")
        z_b = teacher  # a constant target
        mode = "student"
    elif teacher is not None and cfg.teacher_lambda > 0:
        logged = teacher
    if mode == "teacher_student":
        mode = "booster_only" if phase in (None, "teacher") else "student"
    terms: dict[str, torch.Tensor] = {}
    if mode in ("rocket", "booster_only"):
        assert z_b is not None
        terms["bce_booster"] = bce(z_b, labels, weights, w_norm)
    if mode in ("rocket", "light_only", "student"):
        assert z_l is not None
        terms["bce_light"] = bce(z_l, labels, weights, w_norm)
    if mode in ("rocket", "student") and cfg.hint_weight > 0:
        assert z_b is not None and z_l is not None
        # gradient block: the booster's logits are a constant in the hint term, so the
        # hint never reaches booster-only parameters (in 'student' the booster is frozen)
        target = z_b.detach() if (cfg.gradient_block or mode == "student") else z_b
        terms["hint"] = hint_loss(z_l, target, cfg.hint, cfg.temperature, weights, w_norm)
    if logged is not None:
        # rows with a score only; the teacher is data, so nothing flows back into it
        has = ~torch.isnan(logged)
        w_t = has.to(labels.dtype) * (weights if weights is not None else 1.0)
        t = torch.where(has, logged, torch.zeros_like(logged))
        if mode in ("rocket", "light_only", "student"):
            assert z_l is not None
            terms["teacher"] = hint_loss(z_l, t, cfg.hint, cfg.temperature, w_t)
        if cfg.teacher_booster and mode in ("rocket", "booster_only"):
            assert z_b is not None
            terms["teacher_booster"] = hint_loss(z_b, t, cfg.hint, cfg.temperature, w_t)
    scale = {"hint": cfg.hint_weight, "teacher": cfg.teacher_lambda}
    scale["teacher_booster"] = cfg.teacher_lambda
    total = sum(
        (scale.get(k, 1.0) * v for k, v in terms.items()),
        torch.zeros((), device=labels.device),
    )
    out: dict[str, Any] = {k: v.detach() for k, v in terms.items()}
    out["loss"] = total.detach()
    if not as_tensors:
        out = {k: float(v) for k, v in out.items()}
    return total, out


@dataclass(frozen=True)
class PhasePlan:
    """Everything a training phase decides, in one place.

    phase:      None (one phase), 'teacher' or 'student' (teacher_student).
    run_booster / run_light: the towers `forward` runs.
    shared_grad_scale: the light losses' gradient into the shared layers.
    trains:     dense parameter groups the dense optimizer updates ('booster',
                'light', 'shared' = shared bottom and data-parallel tables).
    Terms of the loss follow from (mode, phase) in `rocket_loss`.
    """

    phase: str | None
    run_booster: bool
    run_light: bool
    shared_grad_scale: float
    trains: frozenset[str]


def plan_phases(cfg: LossConfig) -> list[PhasePlan]:
    """The phases of a run and what each one trains."""
    s = cfg.light_shared_grad_scale
    if cfg.mode == "teacher_student":
        return [
            PhasePlan("teacher", True, False, s, frozenset({"booster", "shared"})),
            # the light tower against the frozen booster; tables frozen (no gradient)
            PhasePlan("student", True, True, 0.0, frozenset({"light"})),
        ]
    if cfg.mode == "booster_only":
        return [PhasePlan(None, True, False, s, frozenset({"booster", "shared"}))]
    if cfg.mode in ("light_only", "perfect_teacher"):
        # the light tower alone trains its tables
        return [PhasePlan(None, False, True, 1.0, frozenset({"light", "shared"}))]
    return [PhasePlan(None, True, True, s, frozenset({"booster", "light", "shared"}))]


def trained_towers(cfg: LossConfig) -> list[str]:
    """The towers some phase of this run trains, booster first: a single-tower mode's
    other tower is untrained noise, so evaluation and reports leave it out."""
    trains = {t for plan in plan_phases(cfg) for t in plan.trains}
    return [t for t in ("booster", "light") if t in trains]
