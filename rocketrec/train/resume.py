"""Resume: what a checkpoint must match, and a run's state saved into and restored from it.

    check_resume_compatible(meta, spec, model_cfg, loss_cfg, train_cfg, where)
    save_run(trainer, metrics) -> Path        every rank; rank 0 renames it into place
    resume_run(trainer, path)                 model, both optimizers, counters, readers

A resumed run keeps its spec, model, loss and every training setting outside
RESUME_MAY_CHANGE (budget, cadence, step mechanics); anything else is refused
in one line naming the field and both values.

Sharding kinds: the checkpoint's kind of each table is the first constraint of
the resumed run's plan (`allowed_kinds`), so a small table the planner would
make data-parallel at one world size and fused at another keeps its kind and
its optimizer state. Table-wise and row-wise are one class: their weights and
optimizer state have the same global shape, so the planner may move a table
between them (DCP reshards it exactly; one line says so); a one-worker run is
table-wise, a row-wise table resumed on one worker becomes table-wise. Column-
wise and data-parallel tables keep their kind. Where the kind must change
otherwise (--sharding at resume) the optimizer state of a table that moves
between fused and data-parallel, or whose state changes shape (column-wise
row-wise state: one value per row per column shard), starts fresh with one
warning line naming it.
Reader positions are per rank: at another world size the interrupted epoch
continues with the rows no old rank trained, shared by the new ranks.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from rocketrec.data.reader import ParquetReader
from rocketrec.errors import CheckpointError
from rocketrec.model.init import table_in_key
from rocketrec.model.loss import LossConfig
from rocketrec.model.towers import ModelConfig
from rocketrec.parallel.sharding import MOVABLE_KINDS, planner_kinds, sharding_kinds
from rocketrec.parallel.tables import block_views, release_free_memory
from rocketrec.settings import resume_may_change
from rocketrec.spec import FeatureSpec, private_table_name, spec_from_dict
from rocketrec.train.checkpoint import load_checkpoint, read_meta, save_checkpoint
from rocketrec.train.train_config import TrainConfig

if TYPE_CHECKING:
    from rocketrec.train.trainer import Trainer

# TrainConfig fields a resumed run may change (declared with each setting): the budget,
# cadence and step mechanics
RESUME_MAY_CHANGE = resume_may_change(TrainConfig)

_KEEPABLE = ("table_wise", "column_wise", "table_column_wise", "row_wise", "data_parallel")


class ResumeMismatch(CheckpointError):
    """--resume with settings that would change the run's model or objective."""


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else (path, a, b)


def check_resume_compatible(
    meta: dict[str, Any],
    spec: FeatureSpec,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    where: str,
) -> None:
    """Refuse, in one line naming the field and both values, a resume that changes the
    spec, the model, the loss or a training setting outside RESUME_MAY_CHANGE."""
    tc_old = {k: v for k, v in meta.get("train_config", {}).items() if k not in RESUME_MAY_CHANGE}
    tc_new = {k: v for k, v in asdict(train_cfg).items() if k not in RESUME_MAY_CHANGE}
    tc_old = {k: v for k, v in tc_old.items() if k in tc_new}  # fields added since: defaults
    for section, old, new in (
        ("spec", meta.get("spec"), spec.to_dict()),
        ("model", meta.get("model_config"), asdict(model_cfg)),
        ("loss", meta.get("loss_config"), asdict(loss_cfg)),
        ("train", tc_old, tc_new),
    ):
        d = _first_difference(json.loads(json.dumps(old)), json.loads(json.dumps(new)), "")
        if d:
            field_, was, now = d
            raise ResumeMismatch(
                f"--resume {where}: {section} setting '{field_}' was {was!r} in the run, "
                f"now {now!r}; resume with the run's settings (epochs, steps and cadence may "
                "change), or start a new run with --out"
            )


# -- sharding kinds across a resume ----------------------------------------------------


def _fused_tables(path: Path) -> set[str]:
    """Tables whose optimizer state the checkpoint holds in the fused optimizer."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {t for k in keys if k.startswith("sparse_optim.state.") and (t := table_in_key(k))}


def saved_sharding(path: Path) -> dict[str, str]:
    """The sharding kind of each table in a checkpoint: from meta.json (`sharding`), or,
    for checkpoints written before it was recorded, data_parallel for the tables without
    fused optimizer state (the others are left to the planner)."""
    meta = read_meta(path)
    kinds = meta.get("sharding")
    if isinstance(kinds, dict):
        return {t: k for t, k in kinds.items() if k in _KEEPABLE}
    spec = spec_from_dict(meta["spec"])
    names = [t.name for t in spec.tables]
    if meta.get("model_config", {}).get("light_private_dim"):
        names += [private_table_name(t) for t in names]
    fused = _fused_tables(path)
    if not fused:  # e.g. a plain SGD run without optimizer state: nothing to infer
        return {}
    return {t: "data_parallel" for t in names if t not in fused}


def allowed_kinds(saved: dict[str, str], world_size: int) -> dict[str, tuple[str, ...]]:
    """The kinds each saved table may take at `world_size`: its own, or, for table-wise
    and row-wise (MOVABLE_KINDS), whichever of them the planner would choose there."""
    movable = tuple(k for k in planner_kinds(world_size) if k in MOVABLE_KINDS)
    return {t: movable if k in MOVABLE_KINDS else (k,) for t, k in saved.items()}


def stale_state_tables(path: Path, sparse_state: dict[str, Any]) -> list[str]:
    """Tables whose live (fused) optimizer state the checkpoint cannot fill exactly: it
    lacks the state (the table was data-parallel when written) or holds it in another
    global shape (row-wise state under column-wise sharding holds one value per row *per
    column shard*, so it depends on the kind and the shard count)."""
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    out = set()
    for key, value in _flat_items(sparse_state, "sparse_optim."):
        table = table_in_key(key)
        if table is None or not hasattr(value, "size"):
            continue
        size = getattr(saved.get(key), "size", None)
        if size is None or tuple(size) != tuple(value.size()):
            out.add(table)
    return sorted(out)


def _flat_items(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        out: list[tuple[str, Any]] = []
        for k, v in d.items():
            out += _flat_items(v, f"{prefix}{k}.")
        return out
    return [(prefix.rstrip("."), d)]


def drop_table_state(sparse_state: dict[str, Any], tables: list[str]) -> dict[str, Any]:
    """sparse_state without the entries of `tables` (they keep their fresh state)."""
    if not tables:
        return sparse_state

    def keep(key: str) -> bool:
        return table_in_key(key + ".") not in tables

    def walk(d: Any, prefix: str) -> Any:
        if not isinstance(d, dict):
            return d
        return {k: walk(v, f"{prefix}{k}.") for k, v in d.items() if keep(f"{prefix}{k}")}

    return walk(sparse_state, "")


# -- a run's state in a checkpoint -------------------------------------------------------


def _live_state(t: Trainer) -> dict[str, Any]:
    """Live state for DCP: sharded tensors as block views (bounded chunks on disk)."""
    return {"model": t.dmp.state_dict(), "sparse_optim": t.dmp.fused_optimizer.state_dict()}


def save_run(t: Trainer, metrics: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint of the run (every rank); reports it to Ray when asked to."""
    readers: list[Any] = [None] * t.world
    if t.world > 1:
        dist.all_gather_object(readers, t.train_reader.trained_state())
    else:
        readers = [t.train_reader.trained_state()]
    p = t.progress
    meta: dict[str, Any] = {
        "step": p.step,
        "run_id": t.run_id,
        "phase_idx": p.phase_idx,
        "phase_start": p.phase_start,
        "epoch_step": p.epoch_step,
        "rows_seen": p.rows_seen,
        "rows_unused": p.rows_unused,
        "world_size": t.world,
        "readers": readers,
        "spec": t.spec.to_dict(),
        "model_config": asdict(t.model_cfg),
        "loss_config": asdict(t.loss_cfg),
        "train_config": asdict(t.cfg),
        "metrics": metrics or t.log.last(),
        "sharding": sharding_kinds(t.dmp),  # resume keeps these kinds
        "versions": {"torch": torch.__version__},
        "run_config": t.run_config,
    }
    path = save_checkpoint(
        t.out,
        p.step,
        block_views(_live_state(t)),
        t.dense_opt.state_dict(),
        meta,
        t.cfg.keep_checkpoints,
    )
    release_free_memory()
    t.log.line(f"checkpoint: {path}")
    if t.report is not None:
        t.report({"step": p.step, **(meta["metrics"] or {})}, path)
    return path


def _restore_readers(t: Trainer, meta: dict[str, Any], path: Path) -> None:
    """Reader positions: the same world size continues exactly; another one shares the
    rows no old rank trained (each row of the epoch once); an older stream restarts."""
    p = t.progress
    readers = meta["readers"]
    epoch = int(readers[0]["epoch"])
    if not all(ParquetReader.continuable(st) for st in readers):
        # a checkpoint of an older rocketrec: its positions are of another stream
        t.train_reader.next_epoch(epoch)
        p.epoch_step = 0
        t.log.line(
            f"resume: {path} holds reader positions of an older rocketrec: epoch {epoch} "
            "restarts from its beginning (its examples before the checkpoint are seen again)"
        )
    elif int(meta["world_size"]) == t.world:
        t.train_reader.load_state_dict(readers[t.rank])
    else:
        # DCP resharded the model; the rows no old rank trained are shared again
        left = t.train_reader.load_states(readers)
        p.epoch_step = 0
        t.log.line(
            f"resume: world size {meta['world_size']} -> {t.world}: epoch {epoch} continues "
            f"with its {left:,} untrained rows shared by {t.world} worker(s) (each row of "
            "the epoch is trained once)"
        )


def resume_run(t: Trainer, path: Path) -> None:
    """Load model, optimizers, counters and reader positions from checkpoint `path`."""
    state = _live_state(t)
    # tables whose optimizer state starts fresh: fused now and data-parallel then, or
    # reshaped (column-wise); and every table whose kind differs from the checkpoint's
    fresh = stale_state_tables(path, state["sparse_optim"])
    now_kinds = sharding_kinds(t.dmp)
    changed = sorted(k for k, v in t.saved_kinds.items() if now_kinds.get(k, v) != v)
    moved = [k for k in changed if {t.saved_kinds[k], now_kinds.get(k)} <= set(MOVABLE_KINDS)]
    changed = [k for k in changed if k not in moved]
    dp_moved = [k for k in changed if "data_parallel" in (t.saved_kinds[k], now_kinds.get(k))]
    to_load = {**state, "sparse_optim": drop_table_state(state["sparse_optim"], fresh)}
    # DCP fills the block views in place, i.e. the live shards: it reads one saved
    # block at a time, never a whole table, whatever world size wrote it.
    dense, meta = load_checkpoint(path, block_views(to_load))
    t.dmp.load_state_dict(state["model"])
    t.dmp.fused_optimizer.load_state_dict(state["sparse_optim"])
    p = t.progress
    for k in ("step", "phase_idx", "phase_start", "epoch_step", "rows_seen", "rows_unused"):
        setattr(p, k, int(meta.get(k, 0)))
    if p.phase_idx >= len(t.phases):
        # a finished run: continue its last phase if the new budget allows more steps
        p.phase_idx = len(t.phases) - 1
        t.log.line(
            f"resume: {path} is a finished run; continuing it under the new step/epoch budget"
        )
    t.dense_opt = t.make_dense_opt(t.phases[p.phase_idx])
    dense_fresh = False
    try:
        t.dense_opt.load_state_dict(dense)
    except ValueError:  # a data-parallel table came or went (a changed sharding kind)
        dense_fresh = True
    if moved:
        t.log.line(
            "resume: "
            + ", ".join(f"{k} {t.saved_kinds[k]} -> {now_kinds[k]}" for k in moved)
            + f" at world size {t.world} (weights and optimizer state moved across)"
        )
    for k in changed:  # one line per table whose kind changed
        extra = ""
        if k in dp_moved:
            extra = "; its optimizer state starts fresh" + (
                " (so does the towers' dense optimizer state)" if dense_fresh else ""
            )
        elif k in fresh:
            extra = "; its optimizer state starts fresh (its shape changed with the kind)"
        t.log.line(
            f"resume: warning: table '{k}' changed sharding kind "
            f"({t.saved_kinds[k]} -> {now_kinds.get(k)}){extra}"
        )
    for k in (k for k in fresh if k not in changed):  # the same kind, other shards
        t.log.line(
            f"resume: warning: table '{k}': its optimizer state's shape changed with its "
            "shards; it starts fresh"
        )
    if dense_fresh and not dp_moved:
        t.log.line(
            "resume: warning: the dense optimizer's parameters changed; its state starts fresh"
        )
    _restore_readers(t, meta, path)
    release_free_memory()
    t.log.line(f"resumed from {path} at step {p.step}")
