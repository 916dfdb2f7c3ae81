"""One epoch of training steps (`train_epoch`), shared by the epoch loop
(rocketrec.train.loop.run) and the near-line loop (rocketrec.train.follow), and the
progress line of a logging step (`Rate`, `log_step`)."""

from __future__ import annotations

import time
from typing import Any

from rocketrec.model.loss import PhasePlan
from rocketrec.train.runlog import eta
from rocketrec.train.steps import attach, detach, make_steps, pipelined
from rocketrec.train.trainer import Trainer


class Rate:
    """Examples/s and the ETA between two logging steps."""

    def __init__(self, t: Trainer) -> None:
        self.trainer, self.t, self.rows, self.step = t, time.time(), 0, 0
        self.mark()

    def mark(self) -> tuple[float, float]:
        p, now = self.trainer.progress, time.time()
        rate = (p.rows_seen - self.rows) / max(now - self.t, 1e-9)
        step_s = (now - self.t) / max(1, p.step - self.step)
        self.t, self.rows, self.step = now, p.rows_seen, p.step
        return rate, step_s


def log_step(t: Trainer, plan: PhasePlan, terms: dict[str, Any], rate: Rate, total: int) -> None:
    p, cfg = t.progress, t.cfg
    t.check_finite()
    terms = {k: float(v) for k, v in terms.items()}  # the step's only host syncs
    ex_s, step_s = rate.mark()
    t.log.line(
        f"step {p.step}/{total} epoch {t.train_reader.epoch} {plan.phase or t.loss_cfg.mode} "
        + " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        + f" | {ex_s:,.0f} ex/s | ETA {eta(step_s * (total - p.step))}"
    )
    groups = t.dense_opt.param_groups
    t.log.record(
        {
            "step": p.step,
            "phase": plan.phase,
            **{f"train_{k}": v for k, v in terms.items()},
            "train_examples_per_s": ex_s,
            "train_lr_dense": groups[0]["lr"] if groups else cfg.dense_lr,
            "train_lr_sparse": cfg.sparse_lr,
        }
    )


def _ends_run(t: Trainer, epoch_done: bool) -> bool:
    """Whether the step just trained is the run's last (not for --follow, whose loop goes
    on with the next partition): the last phase's step budget is spent, or its last epoch
    is done."""
    cfg, p = t.cfg, t.progress
    if cfg.follow or p.phase_idx != len(t.phases) - 1:
        return False
    spent = bool(cfg.max_steps) and p.step - p.phase_start >= cfg.max_steps
    return spent or (epoch_done and t.train_reader.epoch >= cfg.epochs - 1)


def train_epoch(t: Trainer, plan: PhasePlan, rate: Rate, total: int) -> bool:
    """Train the rest of the reader's current epoch in `plan`'s phase, within the step
    budget. Returns False when the phase's step budget ran out before the epoch's end."""
    cfg, p, reader = t.cfg, t.progress, t.train_reader
    n_epoch = reader.steps_all_ranks(reader.epoch)
    todo = n_epoch - p.epoch_step
    if cfg.max_steps:
        todo = min(todo, cfg.max_steps - (p.step - p.phase_start))
    steps = make_steps(t.dmp, t.task(plan), t.dense_step(), t.env.device, cfg.step_path)
    data = reader.take(max(0, todo))
    while True:
        t0 = time.perf_counter()
        try:
            terms, n_rows = steps.progress(data)
        except StopIteration:
            break
        p.loop_seconds += time.perf_counter() - t0
        reader.mark_trained()  # this batch is trained: a checkpoint resumes after it
        p.step += 1
        p.epoch_step += 1
        p.rows_seen += n_rows * t.world
        if cfg.log_every and p.step % cfg.log_every == 0:
            log_step(t, plan, terms, rate, total)
        if p.step == 1 + p.phase_start and cfg.step_path == "pipeline":
            mods, post = pipelined(steps)
            t.log.line(
                f"pipeline: TorchRec pipelines {', '.join(mods) or 'no sharded module'} "
                f"(input distribution) and {', '.join(post) or 'no module'} (preprocessing)"
            )
        # the run's last step is evaluated and saved by the run's end (loop.run), which
        # also marks the checkpoint finished: not twice (a second checkpoint, step_N-1)
        last = _ends_run(t, p.epoch_step >= n_epoch)
        if cfg.eval_every and p.step % cfg.eval_every == 0 and not last:
            detach(steps)  # evaluation calls the model's own forwards
            t.check_finite()
            t.log.record(t.evaluate())
            attach(steps)
        if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0 and not last:
            t.save()
        if t.stop_requested():
            break
    detach(steps)  # the model's own forwards again (the next epoch builds a new pipeline)
    data.close()  # stop the reader thread
    if cfg.max_steps and p.step - p.phase_start >= cfg.max_steps or t.stop_requested():
        return False
    # epoch done: every rank stopped at the common count of batches
    unused = reader.rows_unused(reader.epoch, n_epoch)
    p.rows_unused += unused
    total_rows = reader.total_rows
    why = (
        "short last batches padded, the padding weighed 0"
        if getattr(reader, "pad_final", False)
        else "each rank's short last batch"
    )
    t.log.line(
        f"epoch {reader.epoch} done at step {p.step}: {total_rows - unused:,} of "
        f"{total_rows:,} rows trained on, rows_unused {unused:,} ({why})"
    )
    reader.next_epoch()
    p.epoch_step = 0
    return True
