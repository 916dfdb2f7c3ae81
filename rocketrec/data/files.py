"""Data paths -> Parquet files: files, directories (Hive partitions too) or globs.

Files whose name starts with `_` or `.` (`_SUCCESS`, `_metadata`, hidden files,
as petastorm and Spark write them) are ignored; `scheme://` URIs go through
pyarrow's filesystem layer.
"""

from __future__ import annotations

import glob as globlib
import os
from collections.abc import Sequence

import pyarrow.fs as pafs

from rocketrec.data.batch import DataError


def _ignored(name: str) -> bool:
    base = os.path.basename(name.rstrip("/"))
    return base.startswith("_") or base.startswith(".")


def list_parquet_files(paths: str | Sequence[str]) -> tuple[pafs.FileSystem, list[str]]:
    """Resolve files, directories or globs (one or several) to a list of data files:
    each path's files sorted, paths in the order given, duplicates dropped."""
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise DataError("no data path given")
    fs: pafs.FileSystem | None = None
    out: list[str] = []
    for p in paths:
        pfs, files = _list_one(p)
        if fs is not None and type(pfs) is not type(fs):
            raise DataError(f"{p}: all data paths must be on the same file system")
        fs = pfs
        out.extend(files)
    assert fs is not None
    return fs, list(dict.fromkeys(out))


def _list_one(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """Resolve a file, directory or glob to a sorted list of data files."""
    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(path)
        if any(c in path for c in "*?["):
            # a glob may match files or folders (e.g. Hive partitions `date=2026-11-2*`)
            files: list[str] = []
            for m in sorted(globlib.glob(root, recursive=True)):
                if _ignored(m):
                    continue
                if os.path.isfile(m):
                    files.append(m)
                elif os.path.isdir(m):
                    files.extend(_list_dir(fs, m))
            if not files:
                raise DataError(f"{path}: no Parquet files match this pattern")
            return fs, files
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path}: no such file or directory")
    if info.type == pafs.FileType.File:
        return fs, [root]
    files = _list_dir(fs, root)
    if not files:
        raise DataError(f"{path}: directory holds no data files")
    return fs, files


def _list_dir(fs: pafs.FileSystem, root: str) -> list[str]:
    sel = pafs.FileSelector(root, recursive=True)
    return sorted(
        i.path
        for i in fs.get_file_info(sel)
        if i.type == pafs.FileType.File
        and not any(_ignored(part) for part in os.path.relpath(i.path, root).split(os.sep))
    )


def show_paths(path: str | Sequence[str]) -> str:
    """Data paths as one string for messages."""
    return path if isinstance(path, str) else ", ".join(path)
