"""Resume: what a checkpoint must match, and a run's state saved into and restored from it.

    check_resume_compatible(meta, spec, model_cfg, loss_cfg, train_cfg, where)
    save_model(root, step, dmp, dense_optim_state, meta, keep)   collective
    load_model(path, dmp, saved_kinds) -> LoadedTables            collective

The Trainer's own state (counters, reader positions, RNG) is Trainer.state_dict(),
kept in meta.json (rocketrec.checkpoint.meta).

A resumed run keeps its spec, model, loss and every training setting outside
those a setting declares resumable (budget, cadence, step mechanics); anything else is refused
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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rocketrec.checkpoint.files import load_checkpoint, read_meta, save_checkpoint
from rocketrec.checkpoint.meta import saved_config
from rocketrec.errors import CheckpointError
from rocketrec.model.init import table_in_key
from rocketrec.model.loss import LossConfig
from rocketrec.model.towers import ModelConfig
from rocketrec.parallel.sharding import MOVABLE_KINDS, planner_kinds, sharding_kinds
from rocketrec.parallel.tables import block_views, release_free_memory
from rocketrec.settings import resume_may_change
from rocketrec.spec import FeatureSpec, private_table_name, spec_from_dict

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
    train_cfg: Any,
    where: str,
) -> None:
    """Refuse, in one line naming the field and both values, a resume that changes the
    spec, the model, the loss or a training setting that may not change on --resume
    (declared with each setting: the budget, cadence and step mechanics may)."""
    may_change = resume_may_change(type(train_cfg))
    tc_old = {k: v for k, v in saved_config(meta, "train").items() if k not in may_change}
    tc_new = {k: v for k, v in asdict(train_cfg).items() if k not in may_change}
    tc_old = {k: v for k, v in tc_old.items() if k in tc_new}  # fields added since: defaults
    for section, old, new in (
        ("spec", meta.get("spec"), spec.to_dict()),
        ("model", saved_config(meta, "model"), asdict(model_cfg)),
        ("loss", saved_config(meta, "loss"), asdict(loss_cfg)),
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
    if saved_config(meta, "model").get("light_private_dim"):
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


# -- the tables and their optimizer state across a resume ---------------------------------


def live_state(dmp: Any) -> dict[str, Any]:
    """The sharded model's state for DCP: every table and the fused table optimizer."""
    return {"model": dmp.state_dict(), "sparse_optim": dmp.fused_optimizer.state_dict()}


def save_model(
    root: Path, step: int, dmp: Any, dense_optim: dict[str, Any], meta: dict[str, Any], keep: int
) -> Path:
    """Collective: write a checkpoint of the sharded model (tables as bounded block views),
    the dense optimizer state and `meta`; returns its directory."""
    path = save_checkpoint(root, step, block_views(live_state(dmp)), dense_optim, meta, keep)
    release_free_memory()
    return path


@dataclass
class LoadedTables:
    """What load_model restored, and which tables' sharding or optimizer state changed."""

    meta: dict[str, Any]
    dense_optim: dict[str, Any]  # to load into the dense optimizer of the resumed phase
    saved_kinds: dict[str, str]
    now_kinds: dict[str, str]
    fresh: list[str]  # optimizer state starts fresh (missing or reshaped in the checkpoint)
    moved: list[str] = field(default_factory=list)  # table-wise <-> row-wise, state moved
    changed: list[str] = field(default_factory=list)  # any other change of kind

    def lines(self, world: int, dense_fresh: bool) -> list[str]:
        """One log line per table whose kind or optimizer state changed."""
        out = []
        dp_moved = [
            k
            for k in self.changed
            if "data_parallel" in (self.saved_kinds[k], self.now_kinds.get(k))
        ]
        if self.moved:
            out.append(
                "resume: "
                + ", ".join(f"{k} {self.saved_kinds[k]} -> {self.now_kinds[k]}" for k in self.moved)
                + f" at world size {world} (weights and optimizer state moved across)"
            )
        for k in self.changed:
            extra = ""
            if k in dp_moved:
                extra = "; its optimizer state starts fresh" + (
                    " (so does the towers' dense optimizer state)" if dense_fresh else ""
                )
            elif k in self.fresh:
                extra = "; its optimizer state starts fresh (its shape changed with the kind)"
            out.append(
                f"resume: warning: table '{k}' changed sharding kind "
                f"({self.saved_kinds[k]} -> {self.now_kinds.get(k)}){extra}"
            )
        for k in (k for k in self.fresh if k not in self.changed):  # same kind, other shards
            out.append(
                f"resume: warning: table '{k}': its optimizer state's shape changed with its "
                "shards; it starts fresh"
            )
        if dense_fresh and not dp_moved:
            out.append(
                "resume: warning: the dense optimizer's parameters changed; its state starts fresh"
            )
        return out


def load_model(path: Path, dmp: Any, saved_kinds: dict[str, str]) -> LoadedTables:
    """Fill the sharded model and its fused table optimizer from checkpoint `path`, at
    whatever world size wrote it. Tables whose optimizer state the checkpoint cannot fill
    exactly (fused now and data-parallel then, or reshaped) keep their fresh state."""
    state = live_state(dmp)
    fresh = stale_state_tables(path, state["sparse_optim"])
    now_kinds = sharding_kinds(dmp)
    changed = sorted(k for k, v in saved_kinds.items() if now_kinds.get(k, v) != v)
    moved = [k for k in changed if {saved_kinds[k], now_kinds.get(k)} <= set(MOVABLE_KINDS)]
    to_load = {**state, "sparse_optim": drop_table_state(state["sparse_optim"], fresh)}
    # DCP fills the block views in place, i.e. the live shards: it reads one saved
    # block at a time, never a whole table, whatever world size wrote it.
    dense, meta = load_checkpoint(path, block_views(to_load))
    dmp.load_state_dict(state["model"])
    dmp.fused_optimizer.load_state_dict(state["sparse_optim"])
    release_free_memory()
    return LoadedTables(
        meta, dense, saved_kinds, now_kinds, fresh, moved, [k for k in changed if k not in moved]
    )
