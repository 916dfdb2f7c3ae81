"""Reading a checkpoint's tables and towers back without holding a table whole.

CheckpointTables(ckpt).row_blocks(fqn)    row blocks, one saved chunk at a time
load_towers(ckpt)                          the dense model, tables left on `meta`
load_unsharded(ckpt)                       the whole model (small tables: tests, tools)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from rocketrec.checkpoint.files import read_meta
from rocketrec.checkpoint.meta import saved_model_config, saved_spec
from rocketrec.errors import CheckpointError
from rocketrec.model.init import table_of_key
from rocketrec.model.model import RocketModel


class CheckpointTables:
    """Row blocks of the tables in a DCP checkpoint, read one saved chunk at a time.

    DCP's own load reads each saved chunk whole; checkpoints written by the
    training loop hold tables as chunks of at most `CKPT_BLOCK_ROWS` rows
    (rocketrec.parallel.tables.block_views), so reading a table block by block
    keeps at most a couple of chunks in memory, never a whole table. Column-wise
    shards are put back side by side, so every block has full rows.
    """

    def __init__(self, ckpt: str | Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.path = Path(ckpt)
        self.md = FileSystemReader(str(self.path)).read_metadata()
        self._storage: dict[tuple[str, tuple[int, ...]], Any] = {
            (k.fqn, tuple(k.offset)): v for k, v in self.md.storage_data.items()
        }

    def shape(self, fqn: str) -> tuple[int, ...]:
        if fqn not in self.md.state_dict_metadata:
            raise KeyError(f"{self.path}: checkpoint has no tensor {fqn!r}")
        return tuple(self.md.state_dict_metadata[fqn].size)  # type: ignore[union-attr]

    def _read_chunk(self, fqn: str, offsets: tuple[int, ...]) -> torch.Tensor:
        import io

        info = self._storage[(fqn, offsets)]
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"{self.path}: {fqn}: transformed (e.g. compressed) chunks unsupported"
            )
        with open(self.path / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def row_blocks(
        self, fqn: str, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (first row, rows [n, D] float32) covering rows [start, stop) of table `fqn`
        (default: all) in row order; only the chunks that overlap them are read."""
        rows, dim = self.shape(fqn)
        stop = rows if stop is None else min(stop, rows)
        chunks = sorted(
            (
                c
                for c in self.md.state_dict_metadata[fqn].chunks  # type: ignore[union-attr]
                if c.sizes[0] > 0 and c.sizes[1] > 0
            ),
            key=lambda c: (c.offsets[0], c.offsets[1]),
        )
        bounds = sorted(
            {c.offsets[0] for c in chunks} | {c.offsets[0] + c.sizes[0] for c in chunks}
        )
        cache: dict[int, torch.Tensor] = {}
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            if hi <= start or lo >= stop:
                continue
            lo, hi = max(lo, start), min(hi, stop)
            out = torch.empty(hi - lo, dim)
            covered = 0
            for i, c in enumerate(chunks):
                r0, c0 = c.offsets[0], c.offsets[1]
                if r0 >= hi or r0 + c.sizes[0] <= lo:
                    continue
                if i not in cache:
                    cache[i] = self._read_chunk(fqn, (r0, c0))
                out[:, c0 : c0 + c.sizes[1]] = cache[i][lo - r0 : hi - r0].float()
                covered += (hi - lo) * c.sizes[1]
            for i in [i for i in cache if chunks[i].offsets[0] + chunks[i].sizes[0] <= hi]:
                del cache[i]  # done with this chunk
            if covered != (hi - lo) * dim:
                raise CheckpointError(
                    f"{self.path}: {fqn}: rows {lo}..{hi} not fully covered by chunks"
                )
            yield lo, out
        if bounds and (bounds[0] != 0 or bounds[-1] != rows):
            raise CheckpointError(
                f"{self.path}: {fqn}: chunks cover rows {bounds[0]}..{bounds[-1]} of {rows}"
            )

    def full(self, fqn: str) -> torch.Tensor:
        """The whole table (small tables and tests only)."""
        out = torch.empty(self.shape(fqn))
        for r0, blk in self.row_blocks(fqn):
            out[r0 : r0 + blk.shape[0]] = blk
        return out


# -- the model of a checkpoint ------------------------------------------------------------


def load_towers(ckpt: Path) -> tuple[Any, dict[str, Any]]:
    """The RocketModel of a checkpoint with its dense parts loaded and its tables on `meta`.

    Tables stay out of memory: read them block by block with `CheckpointTables`.
    """
    meta = read_meta(ckpt)
    spec = saved_spec(meta, f"{ckpt}/meta.json")
    model_cfg = saved_model_config(meta)
    model = RocketModel(spec, model_cfg, table_device=torch.device("meta"))
    dense = {k: v for k, v in model.state_dict().items() if table_of_key(k) is None}
    # a local read in whatever process asks (export inside a training job's rank 0 too):
    # never a collective, which the other ranks would not join
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": dense}, checkpoint_id=str(ckpt), no_dist=True)
    model.load_state_dict(dense, strict=False)
    model.eval()
    return model, meta


def load_unsharded(ckpt: Path) -> tuple[Any, dict[str, Any]]:
    """The whole unsharded RocketModel of a checkpoint (small tables: tests, tools)."""
    towers, meta = load_towers(ckpt)
    model = RocketModel(towers.spec, towers.cfg)
    sd, dense = model.state_dict(), towers.state_dict()
    ct = CheckpointTables(ckpt)
    with torch.no_grad():
        for k, v in sd.items():
            if table_of_key(k) is None:
                v.copy_(dense[k])
            else:
                v.copy_(ct.full(f"model.{k}"))
    model.eval()
    return model, meta
