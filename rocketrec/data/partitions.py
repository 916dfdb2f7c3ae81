"""Partitions of a log directory for near-line training (`--follow`).

A partition is a directory under the root that holds a `_SUCCESS` file (as Spark and
Hive write when a partition is complete) and at least one Parquet file: `date=.../hour=...`
directories, or plain ones. Its name is its path relative to the root. Partitions are
taken in arrival order: by the modification time of their `_SUCCESS` file, then by name;
a late partition (an older date written now) arrives now. A directory without `_SUCCESS`
is not complete and is not read.
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


def complete_partitions(root: str | Path) -> list[Partition]:
    """Every complete partition under `root`, in arrival order."""
    root = Path(root)
    out = []
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
