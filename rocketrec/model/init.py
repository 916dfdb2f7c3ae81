"""The tables' initial values: a pure function of (seed, table, row), whatever the sharding.

Row r of table t starts as a function of (seed, t, r) only: rows are grouped in
fixed blocks of `INIT_BLOCK_ROWS` global rows; block k of table t is drawn from a
generator seeded with FNV-1a-64("rocketrec-init/<seed>/<t>/<k>") as
uniform(-a, a) of shape [block rows, dim], with a = sqrt(1 / rows) (TorchRec's
default). A shard (any row range and column range) draws only the blocks it
overlaps and slices them: 1 worker, 2 workers row-wise, table-wise or
column-wise start from bit-identical tables, and no process ever draws a full
table unless it owns one. Part of the model (its initial state), so the model
layer owns it; rocketrec.parallel.tables applies it to sharded state dicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from rocketrec.spec.hashing import fnv1a64

_TABLE_PREFIXES = ("ebc.embedding_bags.", "light_ebc.embedding_bags.", "ec.embeddings.")


def table_weight_key(spec: Any, table: str) -> str:
    """The state-dict key of shared table `table`'s weight: a sequence table lives in the
    EmbeddingCollection (`ec`), every other one in the EmbeddingBagCollection (`ebc`)."""
    if table in spec.sequence_tables:
        return f"ec.embeddings.{table}.weight"
    return f"ebc.embedding_bags.{table}.weight"


INIT_BLOCK_ROWS = 65536  # part of the init contract: changing it changes initial weights


def table_in_key(key: str) -> str | None:
    """The table a state key names, if any: a table's weight
    ('ebc.embedding_bags.users.weight', 'ec.embeddings.ads.weight') or its optimizer
    state ('sparse_optim.state.ebc.embedding_bags.users.weight.momentum1')."""
    k = "." + key
    for mark in (".embedding_bags.", ".embeddings."):
        if mark in k:
            return k.split(mark, 1)[1].split(".", 1)[0]
    return None


def table_of_key(key: str) -> str | None:
    """'ebc.embedding_bags.users.weight' -> 'users'; None for keys that are not a
    table's weight (its optimizer state: `table_in_key`)."""
    if key.startswith(_TABLE_PREFIXES) and key.endswith(".weight"):
        return table_in_key(key)
    return None


def init_bound(rows: int) -> float:
    """Half-width of the uniform init: TorchRec's default sqrt(1 / rows)."""
    return math.sqrt(1.0 / rows)


def _block(seed: int, table: str, k: int, rows: int, dim: int) -> torch.Tensor:
    """Block k of table `table` ([min(B, R - k B), D] float32): see the module docstring."""
    n = min(INIT_BLOCK_ROWS, rows - k * INIT_BLOCK_ROWS)
    g = torch.Generator().manual_seed(fnv1a64(f"rocketrec-init/{seed}/{table}/{k}") & (2**63 - 1))
    a = init_bound(rows)
    return torch.rand(n, dim, generator=g).mul_(2 * a).sub_(a)


def init_rows(
    seed: int, table: str, rows: int, dim: int, r0: int, nrows: int, c0: int = 0, ncols: int = -1
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (offset within the range, values) covering rows [r0, r0+nrows), cols [c0, c0+ncols).

    Drawn block by block, so memory stays at one block however large the range.
    """
    ncols = dim - c0 if ncols < 0 else ncols
    r, end = r0, r0 + nrows
    while r < end:
        k = r // INIT_BLOCK_ROWS
        blk = _block(seed, table, k, rows, dim)
        lo = r - k * INIT_BLOCK_ROWS
        hi = min(end - k * INIT_BLOCK_ROWS, blk.shape[0])
        yield r - r0, blk[lo:hi, c0 : c0 + ncols]
        r = k * INIT_BLOCK_ROWS + hi


def full_table_init(seed: int, table: str, rows: int, dim: int) -> torch.Tensor:
    """The whole initial table [R, D] (for tests and small unsharded references only)."""
    out = torch.empty(rows, dim)
    for off, v in init_rows(seed, table, rows, dim, 0, rows):
        out[off : off + v.shape[0]] = v
    return out


def local_pieces(value: Any) -> list[tuple[torch.Tensor, list[int], list[int]]]:
    """(tensor, [first row, first col], [rows, cols]) of this rank's part of a table:
    its local shards, or the whole tensor for a replica / an unsharded table."""
    if isinstance(value, ShardedTensor):
        return [
            (s.tensor, list(s.metadata.shard_offsets), list(s.metadata.shard_sizes))
            for s in value.local_shards()
        ]
    return [(value, [0, 0], list(value.shape))]


@torch.no_grad()
def init_tables(state: dict[str, Any], seed: int) -> list[str]:
    """Write the per-row initial values into every table of a (DMP) state dict, in place.

    ShardedTensors: only the local shards are touched; plain tensors (data-parallel
    replicas, or an unsharded model) are written whole. Returns the keys written.
    """
    done = []
    for key, value in state.items():
        table = table_of_key(key)
        if table is None:
            continue
        rows, dim = int(value.size(0)), int(value.size(1))
        for t, off, size in local_pieces(value):
            for o, v in init_rows(seed, table, rows, dim, off[0], size[0], off[1], size[1]):
                t[o : o + v.shape[0]].copy_(v)
        done.append(key)
    return done
