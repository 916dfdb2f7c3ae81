"""The training loop: one function for 1 or N workers, no Ray imports (Ray wraps it).

    train(spec, train_data, val_data, out_dir, model_cfg, loss_cfg, train_cfg)

`train_data` / `val_data` are Parquet paths or readers made for this rank.
Per step: the reader hands out a batch -> the train task (DMP forward of the
towers its phase runs -> rocket loss) -> backward (the tables' fused optimizer
updates in backward) -> per-tower clipping of dense gradients -> dense optimizer
step with linear warm-up (rocketrec.train.steps). Every `eval_every` steps and
at the end: each tower's metrics on the validation set (rocketrec.train.validation)
to `metrics.jsonl` and a console line. A NaN/inf loss (agreed by all ranks)
stops the run with a clear error before the bad step is applied; the last
checkpoint stays good.

teacher_student runs two phases over the same data and step budget: `teacher`
(booster_only) then `student` (light tower with BCE + hint against the frozen
booster; tables frozen). Step counts, checkpoints and metrics span both.
Distributed steps must agree, so an epoch has as many steps as the rank with
the fewest batches has (the rest of that epoch's rows on other ranks is
counted in `rows_unused` and not trained on).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rocketrec.checkpoint.files import latest_checkpoint, read_meta
from rocketrec.checkpoint.meta import saved_trainer_state
from rocketrec.checkpoint.resume import (
    check_resume_compatible,
)
from rocketrec.data.reader import ParquetReader
from rocketrec.errors import CheckpointNotFound, ConfigError
from rocketrec.model.loss import LossConfig, plan_phases
from rocketrec.model.towers import ModelConfig
from rocketrec.spec import FeatureSpec
from rocketrec.train.epoch import Rate, train_epoch
from rocketrec.train.job import JobConfig
from rocketrec.train.train_config import TrainConfig
from rocketrec.train.trainer import Report, Trainer


def _total_steps(t: Trainer) -> int:
    """Steps of the whole run (every phase) under the epoch and step budget: those done,
    the rest of the current epoch (replanned by a resume at another worker count, it
    has fewer), the epochs left, and the phases left."""
    p, cfg, r = t.progress, t.cfg, t.train_reader
    full = r.full_epoch_batches()
    per_phase = full * cfg.epochs
    if cfg.max_steps:
        per_phase = min(per_phase, cfg.max_steps)
    if p.phase_idx >= len(t.phases):
        return p.step
    left = r.min_batches_all_ranks(r.epoch) - p.epoch_step + max(0, cfg.epochs - r.epoch - 1) * full
    if cfg.max_steps:
        left = min(left, cfg.max_steps - (p.step - p.phase_start))
    return p.step + max(0, left) + per_phase * (len(t.phases) - p.phase_idx - 1)


def run(t: Trainer) -> dict[str, Any]:
    """Every phase's epochs, then the final evaluation and checkpoint."""
    p, t0 = t.progress, time.time()
    rate, total = Rate(t), _total_steps(t)
    while p.phase_idx < len(t.phases):
        plan = t.phases[p.phase_idx]
        while t.train_reader.epoch < t.cfg.epochs and train_epoch(t, plan, rate, total):
            pass
        p.phase_idx += 1
        if p.phase_idx < len(t.phases):
            t.log.line(
                f"phase {plan.phase} done at step {p.step}; starting {t.phases[p.phase_idx].phase}"
            )
            t.train_reader.next_epoch(0)
            p.epoch_step = 0
            p.phase_start = p.step
            t.dense_opt = t.make_dense_opt(t.phases[p.phase_idx])
    t.check_finite()
    final = t.evaluate()
    final["train_seconds"] = time.time() - t0
    final["step_seconds"] = p.loop_seconds  # forward/backward/update only (no I/O, eval)
    final.update(steps=p.step, rows_seen=p.rows_seen, rows_unused=p.rows_unused)
    t.log.record(final)
    t.log.close()
    path = t.save(final)
    t.log.line(
        f"done: {p.step} steps, {p.rows_seen:,} rows trained on "
        f"({p.rows_unused:,} unused), {final['train_seconds']:.1f}s "
        f"({p.rows_seen / max(p.loop_seconds, 1e-9):,.0f} ex/s in steps); checkpoint {path}"
    )
    return final


def _follow_root(train_data: Any, loss_cfg: LossConfig) -> str:
    paths = [train_data] if isinstance(train_data, str | Path) else list(train_data)
    if len(paths) != 1 or not Path(paths[0]).is_dir():
        raise ConfigError(
            f"--follow: --train must be one directory (got {' '.join(map(str, paths))})"
        )
    if len(plan_phases(loss_cfg)) != 1:
        raise ConfigError(f"--follow: mode {loss_cfg.mode} trains in phases; use one-phase modes")
    return str(paths[0])


def train(
    spec: FeatureSpec,
    train_data: str | Sequence[str] | ParquetReader | None,
    val_data: str | Sequence[str] | ParquetReader | None,
    out_dir: str | Path,
    model_cfg: ModelConfig | None = None,
    loss_cfg: LossConfig | None = None,
    train_cfg: TrainConfig | None = None,
    resume: str | None = None,
    report: Report | None = None,
    run_id: str | None = None,
    run_config: dict[str, Any] | None = None,
    verified: bool = False,
    publish: Any = None,
) -> dict[str, Any]:
    """Train; returns the final validation metrics. `resume`: a run dir or checkpoint dir
    (the newest intact checkpoint is used); with `verified`, the checkpoint itself, its
    files already checked by the caller. `run_config`: the resolved job config, kept in
    every checkpoint's meta.json."""
    model_cfg, loss_cfg = model_cfg or ModelConfig(), loss_cfg or LossConfig()
    train_cfg = train_cfg or TrainConfig()
    ck: Path | None = None
    if resume:
        ck = Path(resume) if verified else latest_checkpoint(resume)
        if ck is None:
            raise CheckpointNotFound(f"--resume {resume}: no complete checkpoint found there")
        check_resume_compatible(read_meta(ck), spec, model_cfg, loss_cfg, train_cfg, str(ck))
    root = None
    if train_cfg.follow:  # the reader is opened per partition (rocketrec.train.follow)
        root, train_data = _follow_root(train_data, loss_cfg), None
        if ck is not None:
            cur = (saved_trainer_state(read_meta(ck)).get("follow") or {}).get("current")
            train_data = str(Path(root) / cur) if cur else None
    t = Trainer(
        spec, model_cfg, loss_cfg, train_cfg, out_dir, train_data, val_data, report, run_id,
        run_config, resume_from=ck,
    )  # fmt: skip
    try:
        if ck is not None:
            t.resume(ck)
        elif train_cfg.init_from:
            t.warm_start(train_cfg.init_from)
        if root is not None:
            from rocketrec.train.follow import follow

            return follow(t, root, publish)
        return run(t)
    finally:
        sys.stdout.flush()
        t.env.close()


def train_job(
    job: JobConfig,
    spec: FeatureSpec,
    resume: str | None = None,
    report: Report | None = None,
    run_id: str | None = None,
    publish: Any = None,
) -> dict[str, Any]:
    """train() of a JobConfig that went through rocketrec.run.prepare.prepare_run (rocketrec
    train, and every Ray worker of ads_train.py): its `resume` is a checkpoint already
    verified. `resume` overrides it (a restarted worker group's newest verified one)."""
    return train(
        spec,
        list(job.data.train),
        list(job.data.val) if job.data.val else None,
        job.data.out,
        job.model,
        job.loss,
        job.train,
        resume=resume or job.resume,
        report=report,
        run_id=run_id,
        run_config=job.to_dict(),
        verified=True,
        publish=publish,
    )
