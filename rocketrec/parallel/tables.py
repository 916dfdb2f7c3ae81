"""Embedding tables born sharded: per-row initial values and block-split checkpoint views.

Tables are built on the `meta` device and DMP materializes only each rank's
shards (see `shard_model`). Two things then must not depend on the plan:

1. **Initial values**: `init_tables` (rocketrec.model.init, re-exported here) writes
   each row's (seed, table, row)-determined values into the local shards.

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

import os
import warnings
from typing import Any

from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata

CKPT_BLOCK_ROWS = 1 << 18  # rows per saved checkpoint chunk (262,144 x 16 fp32 = 16 MB)


def ckpt_block_rows() -> int:
    """Rows per checkpoint chunk; ROCKETREC_CKPT_BLOCK_ROWS overrides (tests use small blocks)."""
    return int(os.environ.get("ROCKETREC_CKPT_BLOCK_ROWS", CKPT_BLOCK_ROWS))


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim), so that the transient
    blocks of init, checkpoint and resume do not stay in the resident set."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


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
