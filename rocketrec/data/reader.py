"""Parquet ad-log reader: rows balanced over ranks, shuffled, resumable, lazy on files.

Work unit = one (file, row group). For epoch e the list of all units is permuted
with a seeded RNG (seed, e) and laid end to end as one stream of T rows, cut into
windows of `shuffle_buffer` rows; each window's rows are permuted with a seeded
RNG (seed, e, window). That shuffled epoch stream depends on neither the rank nor
the world size. Rank r of W takes the contiguous range [r R / W, (r + 1) R / W) of
the epoch's *plan*: the stream rows still to be trained, as intervals (the whole
stream, R = T, unless a resume at another world size replanned the epoch). Every
row goes to exactly one rank and ranks differ by at most one row, so with
`drop_last` at most W x batch_size rows per epoch go unused.

Resume: a rank's position is one number, the rows of its range consumed, so
`load_state_dict` continues at exactly the next batch (also in the middle of a
window). At another world size, `load_states` takes every old rank's state and
makes the rows none of them trained the new plan, shared again by the new ranks:
each row of an interrupted epoch is trained exactly once whatever the worker
counts (2 -> 1 -> 3 -> 2 ...). Memory: one window of rows.

Decoding (Arrow -> numpy -> Batch) runs in a background thread feeding a
bounded queue; the position is that of the *consumer*.

Many files: each file's footer is read once (at construction, then closed);
files are opened when first needed, at most `max_open_files` at a time
(least recently used closed first), and a rank only opens the files of the
windows its range touches.

Near-line partitions (`pad_final`): no row is left out; every rank's last batch is
padded (`n_real` on every batch) and a rank with a batch fewer takes a filler, so all
ranks take the same steps. `verify` decodes a rank's share of the row groups up front.

Paths: files, directories (Hive partitions too) or globs (rocketrec.data.files).

One concept: one rank's resumable stream of batches over a set of Parquet files (its
plan, positions, padding and the reading behind them share the same row arithmetic,
so they stay in one module).
"""

from __future__ import annotations

import bisect
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
        pad_final: bool = False,
    ) -> None:
        """pad_final (near-line training: no row of a partition left out): every rank
        trains the most batches any rank has (`steps_all_ranks`); its last real batch is
        padded and ranks with one batch less add a filler batch; every batch carries
        `n_real` (the rows that count: B, fewer, or 0 for a filler), and the training
        step weighs the padding 0."""
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
        self.pad_final = pad_final
        self.drop_last = drop_last and not pad_final
        # pad the short last batch (Batch.n_real says how many are real)
        self.pad_last = pad_last or pad_final
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
        self._plan: list[tuple[int, int]] | None = None  # None: the whole epoch stream
        self._layout_cache: tuple[int, list[Unit], list[int]] | None = None
        self._pos = 0  # rows of this rank's epoch stream already consumed
        self._trained_pos = 0  # ... and trained on (see `take`)
        # (position after it, batch) of each batch `take` handed out and not yet trained
        self._handed: deque[tuple[int, Batch | None]] = deque()
        self.trace: Any = None  # called with each trained batch (tests count rows with it)

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

    def _layout(self, epoch: int) -> tuple[list[Unit], list[int]]:
        """The epoch's unit order and each unit's first row in the stream (+ the end)."""
        if self._layout_cache is None or self._layout_cache[0] != epoch:
            order = self._order(epoch)
            starts = [0]
            for u in order:
                starts.append(starts[-1] + u.rows)
            self._layout_cache = (epoch, order, starts)
        return self._layout_cache[1], self._layout_cache[2]

    def _plan_of(self, epoch: int) -> list[tuple[int, int]]:
        """The stream rows of `epoch` to train, as intervals (the whole stream unless a
        resume at another world size replanned the current epoch)."""
        if epoch == self.epoch and self._plan is not None:
            return self._plan
        return [(0, self.total_rows)]

    def _bounds(self, rank: int, epoch: int) -> tuple[int, int]:
        total, w = sum(b - a for a, b in self._plan_of(epoch)), self.world_size
        return rank * total // w, (rank + 1) * total // w

    def stream_rows(self, epoch: int, rank: int | None = None) -> list[tuple[int, int]]:
        """This rank's rows of `epoch`, as intervals of the shuffled epoch stream, in order."""
        lo, hi = self._bounds(self.rank if rank is None else rank, epoch)
        return _slice_plan(self._plan_of(epoch), lo, hi)

    def rows_for(self, epoch: int, rank: int | None = None) -> int:
        lo, hi = self._bounds(self.rank if rank is None else rank, epoch)
        return hi - lo

    def batches_per_epoch(self, epoch: int = 0, rank: int | None = None) -> int:
        return self._batches(self.rows_for(epoch, rank))

    def _batches(self, rows: int) -> int:
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def min_batches_all_ranks(self, epoch: int = 0) -> int:
        """Batches every rank can serve this epoch (distributed steps must agree)."""
        return min(self.batches_per_epoch(epoch, r) for r in range(self.world_size))

    def steps_all_ranks(self, epoch: int = 0) -> int:
        """The steps every rank takes this epoch: the fewest batches of any rank (its
        extra rows unused), or with pad_final the most (short ranks pad and fill)."""
        if not self.pad_final:
            return self.min_batches_all_ranks(epoch)
        return max(self.batches_per_epoch(epoch, r) for r in range(self.world_size))

    def full_epoch_batches(self) -> int:
        """min_batches_all_ranks of an epoch that is not replanned (the whole stream)."""
        t, w = self.total_rows, self.world_size
        return min(self._batches((r + 1) * t // w - r * t // w) for r in range(w))

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
    STREAM = 2  # the stream's definition (2: windows of the whole epoch stream, plans)

    def state_dict(self) -> dict[str, Any]:
        keys = {k: getattr(self, k) for k in self._STATE_KEYS}
        plan = [list(x) for x in self._plan] if self._plan is not None else None
        return {
            "epoch": self.epoch,
            "pos": self._pos,
            "rank": self.rank,
            "stream": self.STREAM,
            "plan": plan,
            **keys,
        }

    def _check_state(self, state: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
        for k in self._STATE_KEYS:
            if k not in skip and k in state and state.get(k) != getattr(self, k):
                raise CheckpointError(
                    f"reader state was saved with {k}={state.get(k)}, this reader has "
                    f"{k}={getattr(self, k)}"
                )
        if "pos" not in state or state.get("stream") != self.STREAM:
            raise CheckpointError(
                "reader state from an older rocketrec (another stream definition): its "
                "position cannot be continued"
            )

    @classmethod
    def continuable(cls, state: dict[str, Any]) -> bool:
        """Whether `state` holds a position of this stream definition."""
        return "pos" in state and state.get("stream") == cls.STREAM

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` (this rank, the same world size) stopped."""
        self._check_state(state)
        self.epoch = int(state["epoch"])
        plan = state.get("plan")
        self._plan = [(int(a), int(b)) for a, b in plan] if plan is not None else None
        self._pos = self._trained_pos = int(state["pos"])
        self._handed.clear()

    def load_states(self, states: list[dict[str, Any]]) -> int:
        """Continue the epoch that `states` (every rank of another world size, in rank
        order) stopped in: the rows none of them consumed become this epoch's plan,
        shared by this reader's world. Returns the rows left."""
        if not states or len(states) != int(states[0].get("world_size", -1)):
            raise CheckpointError("reader states: one per rank of the saved world size expected")
        for st in states:
            self._check_state(st, skip=("world_size",))
        epoch = int(states[0]["epoch"])
        if any(int(st["epoch"]) != epoch for st in states):
            raise CheckpointError("reader states of different epochs")
        raw = states[0].get("plan")
        plan = [(int(a), int(b)) for a, b in raw] if raw is not None else [(0, self.total_rows)]
        total, w = sum(b - a for a, b in plan), len(states)
        left: list[tuple[int, int]] = []
        for r, st in enumerate(states):
            lo, hi = r * total // w, (r + 1) * total // w
            left += _slice_plan(plan, min(hi, lo + int(st["pos"])), hi)
        merged: list[tuple[int, int]] = []
        for a, b in sorted(left):
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        self.epoch, self._plan = epoch, merged
        self._pos = self._trained_pos = 0
        self._handed.clear()
        return sum(b - a for a, b in merged)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning."""
        self.epoch, self._pos, self._trained_pos = epoch, 0, 0
        self._plan = None
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
                self._handed.append((self._pos, b if self.trace is not None else None))
                yield b
        finally:
            it.close()  # never exhausts the epoch: `next_epoch` moves on explicitly

    def mark_trained(self) -> None:
        """The oldest batch handed out by `take` is trained: resume after it."""
        self._trained_pos, batch = self._handed.popleft()
        if self.trace is not None and batch is not None:
            self.trace(batch)

    def trained_state(self) -> dict[str, Any]:
        """state_dict() at the last trained batch (what a checkpoint saves)."""
        return {**self.state_dict(), "pos": self._trained_pos}

    def next_epoch(self, epoch: int | None = None) -> None:
        """Start the next epoch (or `epoch`) from its beginning."""
        self.set_epoch(self.epoch + 1 if epoch is None else epoch)

    def rows_unused(self, epoch: int, n_batches: int) -> int:
        """Rows of `epoch` no step trains on when every rank stops after `n_batches`."""
        if self.pad_final:
            return 0
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
            t = self._unit_table(u)
            if self.negative_sample_rate < 1.0:
                t = t.filter(pa.array(self.keep_mask(u, self._labels_of(t, u))))
            cache[u] = t
        return cache[u].slice(p.first, p.count)  # zero-copy, in kept-row positions

    def _unit_table(self, u: Unit) -> pa.Table:
        """Unit u's rows (the spec's columns), cast to the reader's one type per column."""
        t = self._file(u.file).read_row_group(u.row_group, columns=self.columns)
        return conform(t, self.target_types, self.files[u.file]) if self.target_types else t

    def verify(self, part: int = 0, parts: int = 1) -> None:
        """Read and decode every row group whose index % parts == part (one rank's share
        of a check, the others doing the rest): a DataError naming the file and row group
        if its pages are corrupt past the footer or its values do not decode as the spec
        says. The near-line loop checks a partition this way before any row is trained."""
        for i, u in enumerate(self.units):
            if i % parts != part:
                continue
            f = self.files[u.file]
            try:
                decode_table(self._unit_table(u), self.spec, f, self.teacher_column)
            except DataError:
                raise
            except (OSError, ValueError, pa.ArrowException) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataError(f"{f}: row group {u.row_group} cannot be read: {first}") from None
        self.close()

    def _window_size(self) -> int:
        return self.shuffle_buffer or max(_READ_WINDOW, self.batch_size)

    def _window_pieces(self, epoch: int, w: int, s: int, e: int) -> list[Piece]:
        """Pieces of units holding rows [s, e) of window w of the epoch stream."""
        order, starts = self._layout(epoch)
        lo = w * self._window_size()
        a0, b0 = lo + s, lo + e
        out = []
        i = max(0, bisect.bisect_right(starts, a0) - 1)
        while i < len(order) and starts[i] < b0:
            a, b = max(a0, starts[i]), min(b0, starts[i + 1])
            if a < b:
                out.append(Piece(order[i], a - starts[i], b - a))
            i += 1
        return out

    def _window(self, epoch: int, w: int, s: int, e: int, cache: dict[Unit, pa.Table]) -> Decoded:
        """Rows [s, e) of window w of the shuffled epoch stream, decoded.

        The window's rows are permuted by (seed, epoch, w) when shuffling: a whole window
        is decoded once and its decoded rows permuted; a part of one takes its Arrow rows
        first. If decoding fails, the pieces are decoded one by one so that the error
        names the file that holds the bad value.
        """
        size = min(self._window_size(), self.total_rows - w * self._window_size())
        whole = s == 0 and e == size
        perm = None
        if self.shuffle_buffer:
            perm = np.random.default_rng([self.seed, epoch, w, 0x5EED]).permutation(size)
        span = (0, size) if perm is not None else (s, e)
        pieces = self._window_pieces(epoch, w, *span)
        parts = [(p, self._read_piece(p, cache)) for p in pieces]
        table = (
            parts[0][1]
            if len(parts) == 1
            else pa.concat_tables([t for _, t in parts], promote_options="default")
        )
        if perm is not None and not whole:
            table = table.take(pa.array(perm[s:e]))
        files = list(dict.fromkeys(self.files[p.unit.file] for p, _ in parts))
        try:
            block = decode_table(table, self.spec, files[0], self.teacher_column)
        except DataError:
            if len(files) == 1:
                raise
            for p, t in parts:  # find the file with the bad value
                decode_table(t, self.spec, self.files[p.unit.file], self.teacher_column)
            raise
        if perm is not None and whole:  # permute decoded ids (ints), cheaper than Arrow strings
            block = block.take(perm)
        return block

    def _filler(self, epoch: int, cache: dict[Unit, pa.Table]) -> Batch:
        """A batch of no real rows (n_real 0: the step weighs it 0) for a rank with one
        batch less than the others: the epoch stream's first rows, repeated."""
        k = min(self.batch_size, self._window_size(), self.total_rows)
        batch = self._window(epoch, 0, 0, k, cache).pad_to(self.batch_size).to_batch()
        batch.n_real = 0
        return batch

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        """Put (Batch, position after it) for the rest of the current epoch on `out`."""
        try:
            epoch, size = self.epoch, self._window_size()
            intervals = self.stream_rows(epoch)
            n = sum(b - a for a, b in intervals)
            cur = self._pos  # rank-stream position of the next row
            cache: dict[Unit, pa.Table] = {}
            pending: list[Decoded] = []
            have = 0
            done = 0
            for a, b in intervals:
                if stop.is_set():
                    return
                if done + (b - a) <= cur:
                    done += b - a
                    continue
                x = a + (cur - done)
                while x < b and not stop.is_set():
                    w = x // size
                    e = min(b, (w + 1) * size)
                    block = self._window(epoch, w, x - w * size, e - w * size, cache)
                    off = 0
                    while off < len(block):
                        take = min(self.batch_size - have, len(block) - off)
                        pending.append(block.slice(off, off + take))
                        have += take
                        off += take
                        cur += take
                        if have == self.batch_size:
                            full = Decoded.concat(pending).to_batch()
                            if self.pad_final:
                                full.n_real = self.batch_size
                            out.put((full, cur))
                            pending, have = [], 0
                            if stop.is_set():
                                return
                    x = e
                done += b - a
            if pending and not self.drop_last and not stop.is_set():
                last = Decoded.concat(pending)
                if self.pad_last:
                    batch = last.pad_to(self.batch_size).to_batch()
                    batch.n_real = len(last)
                else:
                    batch = last.to_batch()
                out.put((batch, n))
            if self.pad_final and not stop.is_set():
                for _ in range(self.steps_all_ranks(epoch) - self.batches_per_epoch(epoch)):
                    out.put((self._filler(epoch, cache), n))
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


def _slice_plan(plan: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """Rows [lo, hi) of the concatenation of `plan`'s intervals, as stream intervals."""
    out, start = [], 0
    for a, b in plan:
        n = b - a
        s, e = max(lo, start), min(hi, start + n)
        if s < e:
            out.append((a + s - start, a + e - start))
        start += n
        if start >= hi:
            break
    return out
