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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from rocketrec.errors import CheckpointError
from rocketrec.model.init import table_of_key
from rocketrec.model.model import RocketModel
from rocketrec.model.towers import ModelConfig
from rocketrec.spec import spec_from_dict
from rocketrec.train.run_dir import RunDir


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


FILES = "files.json"
_BLOCK = 8 << 20


class CheckpointDamaged(CheckpointError):
    """No intact checkpoint where one was expected (the message names each bad file)."""


def log_user_error(out: str | Path | None, err: BaseException) -> None:
    """Append a user error's full traceback to RUN/train.log (the console gets one line)."""
    import traceback

    if not out or "://" in str(out):
        return
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(RunDir(out).log, "a") as f:
            f.write("error: " + "".join(traceback.format_exception(err)))
    except OSError:
        pass


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
    _atomic_write_text(ckpt / FILES, json.dumps({"files": files}, indent=1))


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
        _atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
    _barrier()
    if rank == 0:
        write_file_list(tmp)  # every rank's files are complete here
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


# -- sharding kinds across resumes ----------------------------------------------------


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
    spec = spec_from_dict(meta["spec"], source=f"{ckpt}/meta.json")
    mc = meta["model_config"]
    model_cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in mc.items()})  # type: ignore[arg-type]
    model = RocketModel(spec, model_cfg, table_device=torch.device("meta"))
    dense = {k: v for k, v in model.state_dict().items() if table_of_key(k) is None}
    dcp.load({"model": dense}, checkpoint_id=str(ckpt))
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
