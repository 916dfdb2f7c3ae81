"""Embedding tables born sharded: per-row initial values and block-split checkpoint views.

Tables are built on the `meta` device and DMP materializes only each rank's
shards (see `shard_model`). Two things then must not depend on the plan:

1. **Initial values.** Row r of table t starts as a pure function of
   (seed, t, r): rows are grouped in fixed blocks of `INIT_BLOCK_ROWS` global
   rows; block k of table t is drawn from a generator seeded with
   FNV-1a-64("rocketrec-init/<seed>/<t>/<k>") as uniform(-a, a) of shape
   [block rows, dim], with a = sqrt(1 / rows) (TorchRec's default). A shard
   (any row range and column range) draws only the blocks it overlaps and
   slices them: 1 worker, 2 workers row-wise, table-wise or column-wise
   start from bit-identical tables, and no process ever draws a full table
   unless it owns one.

2. **Checkpoint chunks.** DCP writes one chunk per local shard, and on load
   reads a whole saved chunk before cutting out the rows it needs. With one
   chunk per shard, resuming at another world size (or exporting) would read
   a full shard, which can be a full table. `block_views(state)` rewrites
   every ShardedTensor of a state dict as a ShardedTensor of *views* of the
   same storage, split on a grid of `CKPT_BLOCK_ROWS` global rows. DCP then
   saves and loads blocks of at most that many rows, and loading into the
   views fills the live shards in place.

Legend: R rows of a table, D its dim, r0/c0 a shard's first row/column.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata

from rocketrec.hashing import fnv1a64

INIT_BLOCK_ROWS = 65536  # part of the init contract: changing it changes initial weights
CKPT_BLOCK_ROWS = 1 << 18  # rows per saved checkpoint chunk (262,144 x 16 fp32 = 16 MB)


def ckpt_block_rows() -> int:
    """Rows per checkpoint chunk; ROCKETREC_CKPT_BLOCK_ROWS overrides (tests use small blocks)."""
    return int(os.environ.get("ROCKETREC_CKPT_BLOCK_ROWS", CKPT_BLOCK_ROWS))


_TABLE_PREFIXES = ("ebc.embedding_bags.", "light_ebc.embedding_bags.")


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim), so that the transient
    blocks of init, checkpoint and resume do not stay in the resident set."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def table_of_key(key: str) -> str | None:
    """'ebc.embedding_bags.users.weight' -> 'users'; None for non-table keys."""
    for p in _TABLE_PREFIXES:
        if key.startswith(p) and key.endswith(".weight"):
            return key[len(p) : -len(".weight")]
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


# ShardedTensor is what TorchRec 1.8 hands out (its deprecation notice is not ours to act on)
warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor.*", category=FutureWarning)


# -- block-split views for DCP -------------------------------------------------------


def _split(md: ShardMetadata, block: int) -> list[tuple[int, int]]:
    """Row ranges (start, length) of shard `md` cut on the global grid of `block` rows."""
    r0, n = md.shard_offsets[0], md.shard_sizes[0]
    out, r = [], r0
    while r < r0 + n:
        nxt = min((r // block + 1) * block, r0 + n)
        out.append((r, nxt - r))
        r = nxt
    return out or [(r0, 0)]


def _block_view(st: ShardedTensor, block: int) -> ShardedTensor:
    md = st.metadata()
    shards_md: list[ShardMetadata] = []
    for m in md.shards_metadata:
        for r, n in _split(m, block):
            shards_md.append(
                ShardMetadata(
                    shard_offsets=[r, *m.shard_offsets[1:]],
                    shard_sizes=[n, *m.shard_sizes[1:]],
                    placement=m.placement,
                )
            )
    local: list[Shard] = []
    for s in st.local_shards():
        for r, n in _split(s.metadata, block):
            lo = r - s.metadata.shard_offsets[0]
            local.append(
                Shard(
                    tensor=s.tensor.narrow(0, lo, n),
                    metadata=ShardMetadata(
                        shard_offsets=[r, *s.metadata.shard_offsets[1:]],
                        shard_sizes=[n, *s.metadata.shard_sizes[1:]],
                        placement=s.metadata.placement,
                    ),
                )
            )
    new_md = ShardedTensorMetadata(
        shards_metadata=shards_md, size=md.size, tensor_properties=md.tensor_properties
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, new_md)


def block_views(obj: Any, block: int | None = None) -> Any:
    """Same structure, every ShardedTensor replaced by block views of the same storage."""
    block = block or ckpt_block_rows()
    if isinstance(obj, ShardedTensor):
        if obj.size(0) <= block:
            return obj
        return _block_view(obj, block)
    if isinstance(obj, dict):
        return {k: block_views(v, block) for k, v in obj.items()}
    if isinstance(obj, list):
        return [block_views(v, block) for v in obj]
    return obj
