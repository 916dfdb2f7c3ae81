"""Partitions of a log directory for near-line training (`--follow`).

A partition is either
- a directory under the root that holds a `_SUCCESS` file (as Spark and Hive write when
  a partition is complete) and at least one Parquet file: `date=.../hour=...`
  directories, or plain ones; it arrives when its `_SUCCESS` is written. A directory
  without `_SUCCESS` is not complete and is not read; or
- a Parquet file directly under the root (when the root itself has no `_SUCCESS`): one
  file per partition, complete once it ends with Parquet's closing magic bytes (a
  writer writes the footer last; better, it writes a hidden or `_`-prefixed temporary
  and renames it into place); it arrives at its modification time. Hidden and
  `_`/`.`-prefixed files are never partitions.
Its name is its path relative to the root. Partitions are taken in arrival order, then
by name; a late partition (an older date written now) arrives now.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SUCCESS = "_SUCCESS"


@dataclass(frozen=True)
class Partition:
    name: str  # relative to the root
    path: Path
    arrived: float  # mtime of its _SUCCESS file


MAGIC = b"PAR1"


def _complete_file(path: Path) -> bool:
    """A Parquet file whose last bytes are the closing magic (its footer is written)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < 12:  # magic, footer length, magic
                return False
            f.seek(-4, os.SEEK_END)
            return f.read(4) == MAGIC
    except OSError:
        return False


def complete_partitions(root: str | Path) -> list[Partition]:
    """Every complete partition under `root`, in arrival order."""
    root = Path(root)
    out = []
    if root.is_dir() and not (root / SUCCESS).exists():
        for f in root.iterdir():
            if f.suffix == ".parquet" and not f.name.startswith((".", "_")) and f.is_file():
                if _complete_file(f):
                    try:
                        out.append(Partition(f.name, f, f.stat().st_mtime))
                    except OSError:  # removed meanwhile
                        continue
    for dirpath, _dirs, files in os.walk(root):
        if SUCCESS in files and any(f.endswith(".parquet") for f in files):
            d = Path(dirpath)
            try:
                arrived = (d / SUCCESS).stat().st_mtime
            except OSError:  # removed meanwhile
                continue
            name = str(d.relative_to(root)) if d != root else "."
            out.append(Partition(name, d, arrived))
    return sorted(out, key=lambda p: (p.arrived, p.name))
