"""Parquet ad-log reader: row groups strided by rank, reshuffled per epoch, resumable.

Work unit = one (file, row group). For epoch e, the list of all units is
permuted with `Random(seed + e)` and rank r takes units[r::world_size]: every
row goes to exactly one rank per epoch. Rows of consecutive units are cut into
batches of `batch_size` (the last, short one is kept or dropped by option).

Decoding (Arrow -> numpy -> Batch) runs in a background thread feeding a
bounded queue. The reader's position is that of the *consumer*: `state_dict()`
after k batches says where batch k+1 starts (epoch, unit index, row offset), and
`load_state_dict()` continues from exactly there.

Paths: a file, a directory (recursive) or a glob; `scheme://` URIs go through
pyarrow's filesystem layer. Files whose name starts with `_` or `.`
(`_SUCCESS`, `_metadata`, `_common_metadata`, hidden files, as petastorm and
Spark write them) are ignored; so are empty files and files with no row group.
"""

from __future__ import annotations

import glob as globlib
import os
import queue
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rocketrec.data.batch import Batch, DataError, Decoded, check_schema, decode_table
from rocketrec.spec import FeatureSpec


def _ignored(name: str) -> bool:
    base = os.path.basename(name.rstrip("/"))
    return base.startswith("_") or base.startswith(".")


def list_parquet_files(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """Resolve a file, directory or glob to a sorted list of data files."""
    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(path)
        if any(c in path for c in "*?["):
            files = sorted(p for p in globlib.glob(root, recursive=True) if os.path.isfile(p))
            files = [p for p in files if not _ignored(p)]
            if not files:
                raise DataError(f"{path}: no Parquet files match this pattern")
            return fs, files
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path}: no such file or directory")
    if info.type == pafs.FileType.File:
        return fs, [root]
    sel = pafs.FileSelector(root, recursive=True)
    files = sorted(
        i.path
        for i in fs.get_file_info(sel)
        if i.type == pafs.FileType.File
        and not any(_ignored(part) for part in os.path.relpath(i.path, root).split(os.sep))
    )
    if not files:
        raise DataError(f"{path}: directory holds no data files")
    return fs, files


@dataclass(frozen=True)
class Unit:
    file: int
    row_group: int
    rows: int


class ParquetReader:
    """Iterate `Batch`es for one rank. See the module docstring for the contract."""

    def __init__(
        self,
        path: str,
        spec: FeatureSpec,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        pad_last: bool = False,
        prefetch: int = 4,
        teacher_column: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.path = path
        self.spec = spec
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pad_last = pad_last  # pad the short last batch (Batch.n_real says how many are real)
        self.prefetch = max(1, prefetch)
        self.fs, self.files = list_parquet_files(path)
        self.units: list[Unit] = []
        self._pf: dict[int, pq.ParquetFile] = {}
        for fi, f in enumerate(self.files):
            try:
                if self.fs.get_file_info(f).size == 0:
                    continue  # empty file: skipped, not fatal
                pf = pq.ParquetFile(self.fs.open_input_file(f))
            except (OSError, ValueError) as e:
                raise DataError(f"{f}: cannot read as Parquet: {e}") from None
            check_schema(pf.schema_arrow, spec, f)
            self._pf[fi] = pf
            md = pf.metadata
            for rg in range(md.num_row_groups):
                rows = md.row_group(rg).num_rows
                if rows:
                    self.units.append(Unit(fi, rg, rows))
        if not self.units:
            raise DataError(f"{path}: no rows in any Parquet file")
        self.teacher_column = teacher_column
        self.columns = spec.columns() + ([teacher_column] if teacher_column else [])
        self.epoch = 0
        self._unit_pos = 0  # index into this rank's unit list for self.epoch
        self._row = 0  # row offset inside that unit

    # -- plan ------------------------------------------------------------------
    def units_for(self, epoch: int, rank: int | None = None) -> list[Unit]:
        order = list(self.units)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        r = self.rank if rank is None else rank
        return order[r :: self.world_size]

    def rows_for(self, epoch: int, rank: int | None = None) -> int:
        return sum(u.rows for u in self.units_for(epoch, rank))

    def batches_per_epoch(self, epoch: int = 0, rank: int | None = None) -> int:
        rows = self.rows_for(epoch, rank)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def min_batches_all_ranks(self, epoch: int = 0) -> int:
        """Batches every rank can serve this epoch (distributed steps must agree)."""
        return min(self.batches_per_epoch(epoch, r) for r in range(self.world_size))

    @property
    def total_rows(self) -> int:
        return sum(u.rows for u in self.units)

    # -- state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "unit_pos": self._unit_pos,
            "row": self._row,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "world_size", "batch_size"):
            if state.get(k) != getattr(self, k):
                raise ValueError(
                    f"reader state was saved with {k}={state.get(k)}, this reader has "
                    f"{k}={getattr(self, k)}"
                )
        self.epoch = int(state["epoch"])
        self._unit_pos = int(state["unit_pos"])
        self._row = int(state["row"])

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning."""
        self.epoch, self._unit_pos, self._row = epoch, 0, 0

    # -- reading ---------------------------------------------------------------
    def _read_unit(self, u: Unit) -> Decoded:
        table = self._pf[u.file].read_row_group(u.row_group, columns=self.columns)
        return decode_table(table, self.spec, self.files[u.file], self.teacher_column)

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        """Put (Batch, position after it) for the rest of the current epoch on `out`."""
        try:
            units = self.units_for(self.epoch)
            pos, row = self._unit_pos, self._row
            pending: list[Decoded] = []
            have = 0
            while pos < len(units) and not stop.is_set():
                block = self._read_unit(units[pos])
                if row:
                    block = block.slice(row, len(block))
                # walk this block in batch-size pieces
                off = 0
                while off < len(block):
                    take = min(self.batch_size - have, len(block) - off)
                    pending.append(block.slice(off, off + take))
                    have += take
                    off += take
                    if have == self.batch_size:
                        nxt_row = row + off
                        nxt = (pos, nxt_row) if nxt_row < units[pos].rows else (pos + 1, 0)
                        out.put((Decoded.concat(pending).to_batch(), nxt))
                        pending, have = [], 0
                        if stop.is_set():
                            return
                pos, row = pos + 1, 0
            if pending and not self.drop_last and not stop.is_set():
                last = Decoded.concat(pending)
                if self.pad_last:
                    batch = last.pad_to(self.batch_size).to_batch()
                    batch.n_real = len(last)
                else:
                    batch = last.to_batch()
                out.put((batch, (len(units), 0)))
            out.put(None)
        except BaseException as e:  # surface reader errors in the consumer thread
            out.put(e)

    def __iter__(self) -> Iterator[Batch]:
        """Batches for the rest of the current epoch; then the epoch advances."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        t = threading.Thread(target=self._produce, args=(q, stop), daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                batch, (pos, row) = item  # the position right after this batch
                self._unit_pos, self._row = pos, row
                yield batch
            self.set_epoch(self.epoch + 1)
        finally:
            stop.set()
            while t.is_alive():  # drain so the producer can exit
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            t.join()
