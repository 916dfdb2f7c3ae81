"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout under <out>/checkpoints/:
    step_000100/            one finished checkpoint
        .metadata, __*_*.distcp   DCP: model (sharded tables too) and the fused table optimizer
        dense_optim.pt      the dense optimizer (replicated: rank 0 writes it)
        meta.json           step, phase, epoch, every rank's reader state, spec, configs
        files.json          every other file's size and CRC-32, written last
    latest                  name of the newest finished checkpoint

Every rank writes into `.tmp-step_000100/`; after a barrier rank 0 renames it
and then replaces `latest` (write to a temp file, fsync, rename). A crash at
any point leaves `latest` naming a complete checkpoint. DCP reshards on load,
so a checkpoint loads under another world size.

Verification: `files.json` records each file's size and CRC-32 when the
checkpoint is written. `latest_checkpoint` (used by resume, the automatic
restart after a worker failure, warm start and export) verifies the newest
checkpoint and, if a file is missing, truncated or altered, warns in one line
and falls back to the newest intact one; if none is intact it raises
`CheckpointDamaged` naming each checkpoint and its first bad file. Older
checkpoints are deleted only after the new one is complete, so the last intact
one is never removed while writing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from rocketrec.errors import CheckpointError
from rocketrec.run.run_dir import RunDir


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically: a temporary file, fsynced, renamed, and the
    directory fsynced (a reader sees the old text or the new, also after a crash)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


FILES = "files.json"
_BLOCK = 8 << 20


class CheckpointDamaged(CheckpointError):
    """No intact checkpoint where one was expected (the message names each bad file)."""


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def write_file_list(ckpt: Path) -> None:
    """files.json: size and CRC-32 of every file of the checkpoint directory."""
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != FILES:
            files[str(p.relative_to(ckpt))] = {"bytes": p.stat().st_size, "crc32": _crc32(p)}
    atomic_write_text(ckpt / FILES, json.dumps({"files": files}, indent=1))


def verify_checkpoint(ckpt: str | Path) -> str | None:
    """None if every file listed in files.json is there with its size and CRC-32; else
    what is wrong, in a few words. A checkpoint without files.json (written before
    verification existed) is accepted if its meta.json reads."""
    ckpt = Path(ckpt)
    try:
        json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"meta.json unreadable ({e.__class__.__name__})"
    if not (ckpt / FILES).is_file():
        return None
    try:
        listed = json.loads((ckpt / FILES).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{FILES} unreadable ({e.__class__.__name__})"
    for name, want in listed.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size:,} bytes, {want['bytes']:,} when written"
    for name, want in listed.items():  # sizes first (cheap), then contents
        if _crc32(ckpt / name) != want["crc32"]:
            return f"{name} differs from when it was written (CRC-32)"
    return None


def _candidates(cand: Path) -> list[Path]:
    """Finished checkpoints under a checkpoints/ dir, newest first (`latest` first)."""
    out: list[Path] = []
    p = cand / "latest"
    if p.is_file():
        named = cand / p.read_text().strip()
        if (named / "meta.json").is_file():
            out.append(named)
    steps = sorted(
        (d for d in cand.glob("step_*") if d.is_dir() and (d / "meta.json").is_file()),
        key=lambda d: (_step_of(d), d.name),
        reverse=True,
    )
    out += [d for d in steps if d not in out]
    return out


def _step_of(d: Path) -> int:
    """The checkpoint's step (-1 if its meta.json does not read: it sorts last)."""
    try:
        return int(json.loads((d / "meta.json").read_text()).get("step", -1))
    except (OSError, ValueError):
        return -1


def latest_checkpoint(root: str | Path, verify: bool = True) -> Path | None:
    """The newest intact checkpoint under root (a run dir, its checkpoints/ dir, or one
    checkpoint dir); None if there is none at all. With `verify`, damaged ones are
    skipped with one warning line each; CheckpointDamaged if every one is damaged."""
    root = Path(root)
    for cand in (root, RunDir(root).checkpoints):
        if (cand / "meta.json").is_file() and not (cand / "latest").exists():
            if verify and (why := verify_checkpoint(cand)) is not None:
                raise CheckpointDamaged(f"checkpoint {cand} is damaged: {why}")
            return cand
        found = _candidates(cand)
        if not found:
            continue
        if not verify:
            return found[0]
        bad: list[str] = []
        for ck in found:
            why = verify_checkpoint(ck)
            if why is None:
                if bad:
                    print(
                        f"rocketrec: warning: skipping damaged checkpoint(s) {'; '.join(bad)}; "
                        f"using {ck}",
                        file=sys.stderr,
                        flush=True,
                    )
                return ck
            bad.append(f"{ck.name} ({why})")
        raise CheckpointDamaged(f"{cand}: no intact checkpoint: {'; '.join(bad)}")
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
    root = RunDir(root).checkpoints
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
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
    _barrier()
    if rank == 0:
        write_file_list(tmp)  # every rank's files are complete here
    if rank == 0:
        os.replace(tmp, final)
        atomic_write_text(root / "latest", name)
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
    """A checkpoint's meta.json (rocketrec.checkpoint.meta reads its sections)."""
    return json.loads((Path(path) / "meta.json").read_text())
