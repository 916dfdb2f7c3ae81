"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout under <out>/checkpoints/:
    step_000100/            one finished checkpoint
        .metadata, __*_*.distcp   DCP: model (sharded tables too) and the fused table optimizer
        dense_optim.pt      the dense optimizer (replicated: rank 0 writes it)
        meta.json           step, phase, epoch, every rank's reader state, spec, configs
    latest                  name of the newest finished checkpoint

Every rank writes into `.tmp-step_000100/`; after a barrier rank 0 renames it
and then replaces `latest` (write to a temp file, fsync, rename). A crash at
any point leaves `latest` naming a complete checkpoint. DCP reshards on load,
so a checkpoint loads under another world size.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under root (a run dir or its checkpoints/ dir)."""
    root = Path(root)
    for cand in (root, root / "checkpoints"):
        if (cand / "meta.json").is_file():
            return cand
        p = cand / "latest"
        if p.is_file():
            step_dir = cand / p.read_text().strip()
            if (step_dir / "meta.json").is_file():
                return step_dir
    return None


def save_checkpoint(
    root: str | Path,
    step: int,
    state: dict[str, Any],
    dense_optim: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = Path(root) / "checkpoints"
    rank = dist.get_rank() if dist.is_initialized() else 0
    name = f"step_{step:09d}"
    if (root / name).exists():
        # the same step saved again (e.g. the final save right after a periodic one):
        # a new directory, so that `latest` always names a complete checkpoint
        k = 1
        while (root / f"{name}-{k}").exists():
            k += 1
        name = f"{name}-{k}"
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    if rank == 0:
        torch.save(dense_optim, tmp / "dense_optim.pt")
        _atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
    _barrier()
    if rank == 0:
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", name)
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(
    path: str | Path, state: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fill `state` in place from a checkpoint dir; return (dense optimizer state, meta)."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    dcp.load(state, checkpoint_id=str(path))
    dense = torch.load(path / "dense_optim.pt", weights_only=False)
    return dense, meta


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())


# -- reading tables back without holding them whole ----------------------------------


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
            raise ValueError(
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
                raise ValueError(f"{self.path}: {fqn}: rows {lo}..{hi} not fully covered by chunks")
            yield lo, out
        if bounds and (bounds[0] != 0 or bounds[-1] != rows):
            raise ValueError(
                f"{self.path}: {fqn}: chunks cover rows {bounds[0]}..{bounds[-1]} of {rows}"
            )

    def full(self, fqn: str) -> torch.Tensor:
        """The whole table (small tables and tests only)."""
        out = torch.empty(self.shape(fqn))
        for r0, blk in self.row_blocks(fqn):
            out[r0 : r0 + blk.shape[0]] = blk
        return out
