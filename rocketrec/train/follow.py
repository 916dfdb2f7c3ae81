"""Near-line training (`--follow`): test, then train, each new partition once, as it lands.

    follow(t, root)      the loop; the Trainer holds its state (t.follow_state) and saves
                         it in every checkpoint: the partitions done, the one in progress
                         (its reader position is the Trainer's reader state), those
                         quarantined

Per partition, in arrival order (rocketrec.data.partitions): its files are checked
(schema, types; a bad partition is quarantined with one line and skipped), it is scored
by the current model before any of its rows is trained on (progressive AUC, NE and
calibration of both towers: `metrics.jsonl` records with `partition`), then trained on
once (the reader's one epoch over it), then a checkpoint; every `publish_every`
partitions (or, `publish_minutes`, after the first partition that ends that long after
the last publish) rank 0 publishes the light tower (rocketrec.run.publish's gates; the NE gate
on this partition). Rank 0 decides which partition comes next and every rank follows
(a broadcast), so all ranks train the same partition. Idle waiting prints one line per
minute; `until_idle` seconds without a new partition, or SIGTERM, stop the loop after a
checkpoint. A restart (`--resume`, a Ray worker-group restart, another worker count)
continues the partition in progress where its checkpoint stopped (the rows no rank
trained, as for any epoch) and never takes a done or quarantined partition again.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from rocketrec.data.partitions import SUCCESS, complete_partitions
from rocketrec.data.schema import DataError
from rocketrec.spec import SpecError
from rocketrec.train.epoch import Rate, train_epoch

if TYPE_CHECKING:
    from rocketrec.train.trainer import Trainer

Publish = Callable[[Path, Path, Callable[[str], None]], Any]


def new_state() -> dict[str, Any]:
    return {"done": [], "current": None, "quarantined": []}


class _Stop:
    """SIGTERM asks the loop to stop after a checkpoint (the main thread only)."""

    def __init__(self) -> None:
        self.asked = False
        try:
            signal.signal(signal.SIGTERM, self._on_term)
        except ValueError:  # not the main thread (e.g. inside a Ray actor): no handler
            pass

    def _on_term(self, *_: Any) -> None:
        self.asked = True


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def next_partition(root: str | Path, state: dict[str, Any]) -> tuple[str, Path] | None:
    """The first complete partition neither done nor quarantined (None: none yet)."""
    seen = set(state["done"]) | {q["name"] for q in state["quarantined"]}
    for p in complete_partitions(root):
        if p.name not in seen:
            return p.name, p.path
    return None


def _wait(t: Trainer, root: Path, stop: _Stop) -> tuple[str, Path] | None:
    """Rank 0 polls until a partition is complete, the idle limit passes or SIGTERM; the
    decision is broadcast (every `follow_poll` seconds, so no rank waits in a collective
    for long)."""
    cfg, since, said = t.cfg, time.monotonic(), 0.0
    while True:
        found: Any = next_partition(root, t.follow_state) if t.rank == 0 else None
        idle = time.monotonic() - since
        quit_ = stop.asked or (cfg.until_idle > 0 and idle >= cfg.until_idle)
        found, quit_ = _broadcast((found, quit_), t.world)
        if found is not None:
            return found  # type: ignore[no-any-return]
        if quit_:
            return None
        if idle - said >= 60 or said == 0:
            said = max(idle, 1e-9)
            t.log.line(
                f"follow: waiting for a complete partition under {root} (a directory with "
                f"{SUCCESS}, or a Parquet file directly under it); "
                f"{len(t.follow_state['done'])} trained, idle {idle:.0f}s"
            )
        time.sleep(cfg.follow_poll)


def _open(t: Trainer, name: str, path: Path) -> bool:
    """Point the trainer's reader at partition `path`; False (quarantined) if its files
    cannot be read as the spec says: footers and types (every rank reads them all), then
    (`follow_verify`) every row group decoded, each rank its share, before any row of the
    partition is scored or trained; the ranks share what they found, so all decide alike."""
    from rocketrec.train.trainer import train_reader

    reader, reason = None, None
    try:
        reader = train_reader(t.spec, str(path), t.cfg, t.rank, t.world)
        if min(reader.rows_for(0, r) for r in range(t.world)) < 1:
            raise DataError(f"{path}: fewer rows than workers")
        if t.cfg.follow_verify:  # this rank's share of the row groups, decoded
            reader.verify(t.rank, t.world)
    except (DataError, SpecError, OSError) as e:
        reason = str(e).strip().splitlines()[0]
    if t.world > 1:  # a rank's finding is every rank's: all quarantine, or none
        found: list[Any] = [None] * t.world
        dist.all_gather_object(found, reason)
        reason = next((r for r in found if r), None)
    if reason is not None:
        if reader is not None:
            reader.close()
        t.follow_state["quarantined"].append({"name": name, "reason": reason})
        t.log.line(f"follow: quarantined partition {name}: {reason}")
        return False
    assert reader is not None
    if t.train_reader is not None:
        t.train_reader.close()
    reader.trace = t.trace
    t.train_reader = reader
    return True


def _progressive(t: Trainer, name: str, path: Path) -> dict[str, Any]:
    """Both towers' metrics on the partition's rows before training on them."""
    from rocketrec.train.trainer import val_reader
    from rocketrec.train.validation import evaluate

    reader = val_reader(t.spec, str(path), t.cfg, t.rank, t.world)
    try:
        m = evaluate(
            t.dmp, reader, t.trained_towers, t.progress.step, t.env.device, 0,
            t.cfg.negative_sample_rate,
        )  # fmt: skip
    finally:
        reader.close()
    rec = {"partition": name, "step": t.progress.step}
    rec.update({f"progressive_{k}": v for k, v in m.items() if k != "step"})
    t.log.record(rec)
    show = " ".join(
        f"{k.removeprefix('progressive_')} {v:.4f}"
        for k, v in rec.items()
        if k.endswith(("_auc", "_ne")) and isinstance(v, float)
    )
    t.log.line(f"follow: partition {name} before training: {show}")
    return rec


def _publish(t: Trainer, path: Path, publish: Publish) -> None:
    if t.rank == 0:
        publish(t.out, path, t.log.line)
    if t.world > 1:
        dist.barrier()


def follow(t: Trainer, root: str | Path, publish: Publish | None = None) -> dict[str, Any]:
    """The near-line loop (module docstring); returns the last progressive metrics.
    `publish(run_dir, partition, log)`: what publishes the light tower (the run layer's
    rocketrec.run.publish, given by the caller), every `publish_every` partitions."""
    root, stop, st = Path(root), _Stop(), t.follow_state
    plan, rate, last, saved = t.phases[0], Rate(t), {}, t.progress.step
    published = time.monotonic()  # --publish-minutes counts from the start
    t.stop_requested = lambda: stop.asked  # type: ignore[method-assign]
    while True:
        if st["current"] is None:
            found = _wait(t, root, stop)
            if found is None:
                break
            name, path = found
            if not _open(t, name, path):
                continue
            st["current"] = name
            t.progress.epoch_step = 0
            last = _progressive(t, name, path)
            rate.mark()  # examples/s and the ETA count training, not the wait or the scoring
        name = st["current"]
        path = root / name
        r, p = t.train_reader, t.progress
        total = p.step + r.steps_all_ranks(r.epoch) - p.epoch_step
        if not train_epoch(t, plan, rate, total):  # stopped early: SIGTERM or --max-steps
            break
        st["done"].append(name)
        st["current"] = None
        t.save(last)
        saved = t.progress.step
        every = t.cfg.publish_every and len(st["done"]) % t.cfg.publish_every == 0
        due = t.cfg.publish_minutes and time.monotonic() - published >= 60 * t.cfg.publish_minutes
        if publish and (every or due):
            _publish(t, path, publish)
            published = time.monotonic()
        if stop.asked:
            break
    if saved != t.progress.step or not t.progress.step:  # stopped mid-partition
        t.save(last)
    q = st["quarantined"]
    t.log.line(
        f"follow: stopped after {len(st['done'])} partition(s)"
        + (f"; quarantined {len(q)}: " + ", ".join(x["name"] for x in q) if q else "")
    )
    return {**last, "partitions": len(st["done"]), "quarantined": [x["name"] for x in q]}
