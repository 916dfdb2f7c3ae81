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
        if final.exists():
            shutil.rmtree(final)
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
