"""Parquet ad-log reader: rows balanced over ranks, shuffled, resumable, lazy on files.

Work unit = one (file, row group). For epoch e the list of all units is
permuted with a seeded RNG (seed, e) and laid end to end as one stream of T
rows; rank r takes the contiguous row range [r T / W, (r + 1) T / W) of that
stream, as pieces (file, row group, first row, row count). Every row goes to
exactly one rank per epoch and ranks differ by at most one row, so with
`drop_last` at most W x batch_size rows per epoch go unused.

Shuffle within files: a rank's stream is cut into windows of `shuffle_buffer`
rows (mixing rows of every unit the window spans); each window's rows are
permuted with a seeded RNG (seed, epoch, rank, window) before batching. The
order is a pure function of (seed, epoch, rank, world size, buffer size), so
the reader's position is one number, the rows consumed this epoch, and
`load_state_dict` continues at exactly the next batch, also in the middle of
a window. Memory: one window of decoded rows.

Decoding (Arrow -> numpy -> Batch) runs in a background thread feeding a
bounded queue; the position is that of the *consumer*.

Many files: each file's footer is read once (at construction, then closed);
files are opened when first needed, at most `max_open_files` at a time
(least recently used closed first), and a rank only opens the files of its
own row range.

Paths: files, directories (Hive partitions too) or globs (rocketrec.data.files).
"""

from __future__ import annotations

import queue
import random
import threading
from collections import OrderedDict, deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rocketrec.data.batch import Batch, Decoded, check_schema, decode_table
from rocketrec.data.files import list_parquet_files, show_paths
from rocketrec.data.schema import DataError, conform, unify_schemas
from rocketrec.errors import CheckpointError, ConfigError
from rocketrec.spec import FeatureSpec
from rocketrec.spec.hashing import fnv1a64

_MASK64 = (1 << 64) - 1
DEFAULT_SHUFFLE_BUFFER = 65536  # rows; about 20 MB of decoded ads_ctr rows
_READ_WINDOW = 65536  # rows decoded at a time when not shuffling


@dataclass(frozen=True)
class Unit:
    file: int
    row_group: int
    rows: int  # rows this unit contributes (after negative downsampling, if any)
    first_row: int = 0  # index in its file of the row group's first row


@dataclass(frozen=True)
class Piece:
    """Rows [first, first + count) of one unit."""

    unit: Unit
    first: int
    count: int


class ParquetReader:
    """Iterate `Batch`es for one rank. See the module docstring for the contract."""

    def __init__(
        self,
        path: str | Sequence[str],
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
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        max_open_files: int = 4,
        negative_sample_rate: float = 1.0,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} outside world size {world_size}")
        if shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer must be >= 0 rows, got {shuffle_buffer}")
        if not 0.0 < negative_sample_rate <= 1.0:
            raise ConfigError(f"negative_sample_rate must be in (0, 1], got {negative_sample_rate}")
        self.negative_sample_rate = negative_sample_rate
        self.path = path
        self.spec = spec
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        # rows permuted together; 0 = units are still permuted, rows inside them are not
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.drop_last = drop_last
        self.pad_last = pad_last  # pad the short last batch (Batch.n_real says how many are real)
        self.prefetch = max(1, prefetch)
        self.max_open_files = max(1, max_open_files)
        self.fs, self.files = list_parquet_files(path)
        self._md: dict[int, pq.FileMetaData] = {}
        self._open: OrderedDict[int, tuple[pq.ParquetFile, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_files_open_seen = 0
        self.units, schemas = self._scan(spec)
        if not self.units:
            raise DataError(f"{show_paths(path)}: no rows in any Parquet file")
        # files whose column types differ (real logs widen types over time): each file is
        # read with its own schema and cast to one type per column (rocketrec.data.batch)
        self.target_types, self.schema_notes = unify_schemas(schemas, spec)
        self.teacher_column = teacher_column
        self.columns = spec.columns() + ([teacher_column] if teacher_column else [])
        if negative_sample_rate < 1.0:
            # units count the rows they keep: one pass over the label column, files closed
            self.units = [u for u in (self._sampled(u) for u in self.units) if u.rows]
            self.close()  # the scan's files; reading reopens them lazily
            if not self.units:
                raise DataError(f"{show_paths(path)}: no rows left after negative downsampling")
        self.epoch = 0
        self._pos = 0  # rows of this rank's epoch stream already consumed
        self._trained_pos = 0  # ... and trained on (see `take`)
        self._handed: deque[int] = deque()  # position after each batch `take` handed out

    def _scan(self, spec: FeatureSpec) -> tuple[list[Unit], dict[str, pa.Schema]]:
        """Read every file's footer once (then close it): its row groups and schema."""
        units: list[Unit] = []
        checked: set[str] = set()
        schemas: dict[str, pa.Schema] = {}
        for fi, f in enumerate(self.files):
            try:
                if self.fs.get_file_info(f).size == 0:
                    continue  # empty file: skipped, not fatal
                with self.fs.open_input_file(f) as fh:
                    md = pq.read_metadata(fh)  # the footer, read once; the file is closed again
            except (OSError, ValueError) as e:
                raise DataError(f"{f}: cannot read as Parquet: {e}") from None
            schema = md.schema.to_arrow_schema()
            schemas[f] = schema
            key = schema.to_string()
            if key not in checked:  # thousands of files usually share a few schemas
                check_schema(schema, spec, f)
                checked.add(key)
            self._md[fi] = md
            first = 0
            for rg in range(md.num_row_groups):
                rows = md.row_group(rg).num_rows
                if rows:
                    units.append(Unit(fi, rg, rows, first))
                first += rows
        return units, schemas

    # -- plan ------------------------------------------------------------------
    def _order(self, epoch: int) -> list[Unit]:
        order = list(self.units)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _bounds(self, rank: int) -> tuple[int, int]:
        total, w = self.total_rows, self.world_size
        return rank * total // w, (rank + 1) * total // w

    def pieces_for(self, epoch: int, rank: int | None = None) -> list[Piece]:
        """This rank's row range of the epoch's unit stream, as pieces of units."""
        lo, hi = self._bounds(self.rank if rank is None else rank)
        out, start = [], 0
        for u in self._order(epoch):
            end = start + u.rows
            a, b = max(lo, start), min(hi, end)
            if a < b:
                out.append(Piece(u, a - start, b - a))
            start = end
            if start >= hi:
                break
        return out

    def rows_for(self, epoch: int, rank: int | None = None) -> int:
        lo, hi = self._bounds(self.rank if rank is None else rank)
        return hi - lo

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
    # what a reader's position depends on: a saved state must match them to be loaded
    _STATE_KEYS = (
        "seed",
        "world_size",
        "batch_size",
        "shuffle_buffer",
        "total_rows",
        "negative_sample_rate",
    )

    def state_dict(self) -> dict[str, Any]:
        keys = {k: getattr(self, k) for k in self._STATE_KEYS}
        return {"epoch": self.epoch, "pos": self._pos, "rank": self.rank, **keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self._STATE_KEYS:
            if k in state and state.get(k) != getattr(self, k):
                raise CheckpointError(
                    f"reader state was saved with {k}={state.get(k)}, this reader has "
                    f"{k}={getattr(self, k)}"
                )
        if "pos" not in state:
            raise CheckpointError(
                "reader state from an older rocketrec (no 'pos'): cannot resume it"
            )
        self.epoch = int(state["epoch"])
        self._pos = self._trained_pos = int(state["pos"])
        self._handed.clear()

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning."""
        self.epoch, self._pos, self._trained_pos = epoch, 0, 0
        self._handed.clear()

    # -- the training stream: epochs and the position after the last *trained* batch --
    def take(self, n: int) -> Generator[Batch, None, None]:
        """At most `n` batches of the current epoch. The step path may read ahead of
        training (TorchRec's pipeline does): `mark_trained()` after each trained batch
        moves the position a checkpoint keeps (`trained_state`)."""
        it = iter(self)
        try:
            for _ in range(n):
                b = next(it, None)
                if b is None:
                    return
                self._handed.append(self._pos)
                yield b
        finally:
            it.close()  # never exhausts the epoch: `next_epoch` moves on explicitly

    def mark_trained(self) -> None:
        """The oldest batch handed out by `take` is trained: resume after it."""
        self._trained_pos = self._handed.popleft()

    def trained_state(self) -> dict[str, Any]:
        """state_dict() at the last trained batch (what a checkpoint saves)."""
        return {**self.state_dict(), "pos": self._trained_pos}

    def next_epoch(self, epoch: int | None = None) -> None:
        """Start the next epoch (or `epoch`) from its beginning."""
        self.set_epoch(self.epoch + 1 if epoch is None else epoch)

    def rows_unused(self, epoch: int, n_batches: int) -> int:
        """Rows of `epoch` no step trains on when every rank stops after `n_batches`."""
        used = n_batches * self.batch_size
        return sum(max(0, self.rows_for(epoch, r) - used) for r in range(self.world_size))

    # -- reading ---------------------------------------------------------------
    def _file(self, fi: int) -> pq.ParquetFile:
        with self._lock:
            if fi in self._open:
                self._open.move_to_end(fi)
                return self._open[fi][0]
            while len(self._open) >= self.max_open_files:
                _, (old_pf, old_fh) = self._open.popitem(last=False)
                old_fh.close()
            fh = self.fs.open_input_file(self.files[fi])
            pf = pq.ParquetFile(fh, metadata=self._md[fi])  # no second footer read
            self._open[fi] = (pf, fh)
            self.max_files_open_seen = max(self.max_files_open_seen, len(self._open))
            return pf

    def close(self) -> None:
        """Close every open file (reading again reopens them)."""
        with self._lock:
            for _, fh in self._open.values():
                fh.close()
            self._open.clear()

    def open_files(self) -> int:
        return len(self._open)

    # -- negative downsampling ---------------------------------------------------
    def keep_mask(self, u: Unit, labels: np.ndarray) -> np.ndarray:
        """Rows of unit u kept: every positive, and a negative when a hash of
        (seed, file, row in file) falls under the rate. The same whatever the world
        size, the epoch or the shuffle, so exact on resume."""
        rows = np.arange(u.first_row, u.first_row + len(labels), dtype=np.uint64)
        key = np.uint64(fnv1a64(f"rocketrec-sample/{self.seed}/{self.files[u.file]}") & _MASK64)
        with np.errstate(over="ignore"):
            z = rows * np.uint64(0x9E3779B97F4A7C15) + key  # splitmix64
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
        u01 = (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
        return (labels == 1) | (u01 < self.negative_sample_rate)

    def _labels_of(self, table: pa.Table, u: Unit) -> np.ndarray:
        col = table.column(self.spec.label_column)
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if arr.null_count:
            raise DataError(f"{self.files[u.file]}: column '{self.spec.label_column}' has nulls")
        return arr.to_numpy(zero_copy_only=False)

    def _sampled(self, u: Unit) -> Unit:
        t = self._file(u.file).read_row_group(u.row_group, columns=[self.spec.label_column])
        kept = int(self.keep_mask(u, self._labels_of(t, u)).sum())
        return Unit(u.file, u.row_group, kept, u.first_row)

    def _read_piece(self, p: Piece, cache: dict[Unit, pa.Table]) -> pa.Table:
        u = p.unit
        if u not in cache:
            cache.clear()  # keep one unit: a unit split over two windows is read once
            t = self._file(u.file).read_row_group(u.row_group, columns=self.columns)
            if self.target_types:
                t = conform(t, self.target_types, self.files[u.file])
            if self.negative_sample_rate < 1.0:
                t = t.filter(pa.array(self.keep_mask(u, self._labels_of(t, u))))
            cache[u] = t
        return cache[u].slice(p.first, p.count)  # zero-copy, in kept-row positions

    def _window_size(self) -> int:
        return self.shuffle_buffer or max(_READ_WINDOW, self.batch_size)

    def _window(self, pieces: list[Piece], w: int, cache: dict[Unit, pa.Table]) -> Decoded:
        """Rows [w S, (w + 1) S) of this rank's stream, permuted when shuffling.

        The Arrow rows are permuted (one C++ take) and decoded once per window; if
        decoding fails, the window's pieces are decoded one by one so that the error
        names the file that holds the bad value.
        """
        size = self._window_size()
        lo, hi = w * size, min((w + 1) * size, sum(p.count for p in pieces))
        parts: list[tuple[Piece, pa.Table]] = []
        start = 0
        for p in pieces:
            end = start + p.count
            a, b = max(lo, start), min(hi, end)
            if a < b:
                sub = Piece(p.unit, p.first + a - start, b - a)
                parts.append((sub, self._read_piece(sub, cache)))
            start = end
            if start >= hi:
                break
        table = (
            parts[0][1]
            if len(parts) == 1
            else pa.concat_tables(
                [t for _, t in parts],
                promote_options="default",  # nullability may differ
            )
        )
        files = list(dict.fromkeys(self.files[p.unit.file] for p, _ in parts))
        try:
            block = decode_table(table, self.spec, files[0], self.teacher_column)
            if self.shuffle_buffer:  # permute decoded ids (ints), cheaper than Arrow strings
                rng = np.random.default_rng([self.seed, self.epoch, self.rank, w, 0x5EED])
                block = block.take(rng.permutation(len(block)))
            return block
        except DataError:
            if len(files) == 1:
                raise
            for p, t in parts:  # find the file with the bad value
                decode_table(t, self.spec, self.files[p.unit.file], self.teacher_column)
            raise

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        """Put (Batch, position after it) for the rest of the current epoch on `out`."""
        try:
            pieces = self.pieces_for(self.epoch)
            n = sum(p.count for p in pieces)
            size = self._window_size()
            pos = self._pos
            cache: dict[Unit, pa.Table] = {}
            pending: list[Decoded] = []
            have = 0
            w = pos // size
            while w * size < n and not stop.is_set():
                block = self._window(pieces, w, cache)
                off = max(0, pos - w * size)  # > 0 only in the window a resume starts in
                while off < len(block):
                    take = min(self.batch_size - have, len(block) - off)
                    pending.append(block.slice(off, off + take))
                    have += take
                    off += take
                    if have == self.batch_size:
                        out.put((Decoded.concat(pending).to_batch(), w * size + off))
                        pending, have = [], 0
                        if stop.is_set():
                            return
                w += 1
            if pending and not self.drop_last and not stop.is_set():
                last = Decoded.concat(pending)
                if self.pad_last:
                    batch = last.pad_to(self.batch_size).to_batch()
                    batch.n_real = len(last)
                else:
                    batch = last.to_batch()
                out.put((batch, n))
            out.put(None)
        except BaseException as e:  # surface reader errors in the consumer thread
            out.put(e)

    def __iter__(self) -> Generator[Batch, None, None]:
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
                batch, pos = item  # the position right after this batch
                self._pos = pos
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
            self.close()  # files are reopened lazily by the next epoch
