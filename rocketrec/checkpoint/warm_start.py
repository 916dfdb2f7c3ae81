"""Warm start: begin a new run from another run's weights, with a possibly changed spec.

    --init-from RUN_OR_CHECKPOINT [--init-from-allow-shrink]

Tables are matched by name (shared and light-only private tables alike):
- same rows and dim: copied;
- more rows now (a grown table): the old rows are copied, the new rows keep
  their fresh per-row initial values;
- fewer rows or another dim: refused, unless --init-from-allow-shrink (then a
  shrunk table keeps its first rows, and a changed dim starts fresh);
- a table only in the new spec: fresh; only in the old one: dropped.
Tower and bottom parameters are copied where name and shape match, fresh
otherwise. Optimizer state and the step count start anew (a new run).

Born sharded all the way: every rank copies only its own shards' rows, read
block by block from the old checkpoint's files (`CheckpointTables`), so no
process holds a full table. Every rank reads the same old tower weights.
Prints a table of what was copied, grown, new, fresh and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rocketrec.checkpoint.files import latest_checkpoint
from rocketrec.checkpoint.tables import CheckpointTables, load_towers
from rocketrec.errors import CheckpointError, CheckpointNotFound
from rocketrec.model.init import local_pieces, table_of_key


class WarmStartError(CheckpointError):
    """--init-from cannot map the old weights onto the new model as asked."""


@dataclass(frozen=True)
class Change:
    name: str
    status: str  # copied | grown | shrunk | new | fresh | dropped
    detail: str


@torch.no_grad()
def warm_start(
    state: dict[str, Any],
    dense_params: dict[str, torch.Tensor],
    source: str,
    allow_shrink: bool = False,
) -> list[Change]:
    """Fill `state` (the DMP state dict: tables as ShardedTensors or replicas) and
    `dense_params` (name -> live tensor of every non-table parameter) from `source`."""
    ck = latest_checkpoint(source)
    if ck is None:
        raise CheckpointNotFound(f"--init-from {source}: no complete checkpoint found there")
    ct = CheckpointTables(ck)
    old_tables: dict[str, str] = {}
    for k in ct.md.state_dict_metadata:
        t = table_of_key(k[len("model.") :]) if k.startswith("model.") else None
        if t is not None:
            old_tables[t] = k
    changes: list[Change] = []
    plans: list[tuple[str, Any, str, int]] = []  # (table, live value, old fqn, rows to copy)
    for key, value in state.items():
        table = table_of_key(key)
        if table is None:
            continue
        rows, dim = int(value.size(0)), int(value.size(1))
        fqn = old_tables.get(table)
        if fqn is None:
            changes.append(Change(table, "new", f"{rows:,} x {dim}, fresh"))
            continue
        r0, d0 = ct.shape(fqn)
        if d0 != dim:
            if not allow_shrink:
                raise WarmStartError(
                    f"--init-from {ck}: table '{table}' has dim {d0} there and {dim} now: "
                    "pass --init-from-allow-shrink to start it fresh"
                )
            changes.append(Change(table, "fresh", f"dim {d0} -> {dim}"))
            continue
        if rows < r0 and not allow_shrink:
            raise WarmStartError(
                f"--init-from {ck}: table '{table}' has {r0:,} rows there and {rows:,} now: "
                "pass --init-from-allow-shrink to keep its first rows"
            )
        n = min(rows, r0)
        plans.append((table, value, fqn, n))
        status = "copied" if rows == r0 else ("grown" if rows > r0 else "shrunk")
        detail = f"{r0:,} -> {rows:,} rows x {dim}" + (
            f", rows {r0:,}.. fresh" if rows > r0 else ""
        )
        changes.append(Change(table, status, detail))
    new_tables = {table_of_key(k) for k in state if table_of_key(k) is not None}
    for t in sorted(set(old_tables) - new_tables):
        changes.append(Change(str(t), "dropped", "not in the new spec"))
    for _table, value, fqn, n in plans:
        _copy_rows(ct, fqn, value, n)
    # towers, bottom: name and shape
    towers, _ = load_towers(ck)
    old_dense = {k: v for k, v in towers.state_dict().items() if table_of_key(k) is None}
    for name, live in dense_params.items():
        old = old_dense.get(name)
        if old is None:
            changes.append(Change(name, "new", f"{list(live.shape)}, fresh"))
        elif tuple(old.shape) != tuple(live.shape):
            changes.append(Change(name, "fresh", f"{list(old.shape)} -> {list(live.shape)}"))
        else:
            live.copy_(old)
            changes.append(Change(name, "copied", f"{list(live.shape)}"))
    for name in sorted(set(old_dense) - set(dense_params)):
        changes.append(Change(name, "dropped", "not in the new model"))
    return changes


def _copy_rows(ct: CheckpointTables, fqn: str, value: Any, n: int) -> None:
    """Old rows [0, n) into this rank's part of `value` (local shards or a replica)."""
    for t, (r0, c0), (nr, nc) in local_pieces(value):
        hi = min(r0 + nr, n)
        if hi <= r0:
            continue
        for first, blk in ct.row_blocks(fqn, r0, hi):
            t[first - r0 : first - r0 + blk.shape[0]].copy_(blk[:, c0 : c0 + nc])


def format_changes(changes: list[Change], source: str | Path) -> str:
    width = max((len(c.name) for c in changes), default=10)
    lines = [f"warm start from {source}:"]
    for c in changes:
        lines.append(f"  {c.name:<{width}}  {c.status:<8} {c.detail}")
    counts: dict[str, int] = {}
    for c in changes:
        counts[c.status] = counts.get(c.status, 0) + 1
    lines.append("  " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def warm_start_model(model: Any, state: dict[str, Any], source: str, allow_shrink: bool) -> str:
    """Warm-start a RocketModel (its DMP state dict `state`) from `source`; returns the
    table of changes to print."""
    dense: dict[str, torch.Tensor] = {}
    for prefix in ("booster", "light", "bottom"):
        mod = getattr(model, prefix)
        if mod is not None:
            for n, p in mod.state_dict(keep_vars=True).items():
                dense[f"{prefix}.{n}"] = p.data
    return format_changes(warm_start(state, dense, source, allow_shrink), source)
