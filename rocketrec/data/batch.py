"""Arrow -> Batch: the one conversion used by training, evaluation and export checks.

`decode_table(table, spec, source)` turns a pyarrow Table (one row group or
more) into a `Decoded` block of numpy arrays, vectorised (no per-row Python):

    dense    float32 [n, C]   raw numeric inputs (dense features, then bucketized ones);
                              null/NaN -> NaN (missing), infinities rejected
    ids[f]   (values int64 [nnz_f], offsets int64 [n + 1]) per id feature (kind
             scalar/list), raw: strings hashed, no truncation
    labels   float32 [n]      in {0, 1}
    weights  float32 [n] or None

`Decoded.slice` / `Decoded.concat` cut and join blocks cheaply, and
`Decoded.to_batch()` builds the torch `Batch` with a feature-major
KeyedJaggedTensor (keys in spec order, lengths [F * B]). Raw int64 ids travel
untouched; bucketing (`id mod rows`) happens inside the model.

Every data error is a `DataError` naming the file and the column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from rocketrec.data.schema import DataError, column_of, conform, is_numeric, unify_schemas
from rocketrec.data.targets import decode_targets, decode_teacher, decode_true_ctr
from rocketrec.spec import DenseFeature, FeatureSpec, SparseFeature
from rocketrec.spec.hashing import hash_strings


@dataclass
class Batch(Pipelineable):
    """One training batch. B = batch size, D = dense features, F = sparse features.

    dense:   float32 [B, C] raw numeric inputs (NaN = missing), see Decoded
    sparse:  KeyedJaggedTensor, keys = the spec's id features, raw int64 ids
    labels:  float32 [B]
    weights: float32 [B] or None
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    weights: torch.Tensor | None = None
    n_real: int | None = None  # rows before padding (pad_last readers); None = all real
    teacher: torch.Tensor | None = None  # float32 [B] soft-label probabilities (experiments)
    group: torch.Tensor | None = None  # int64 [B] group ids (spec `group`), for grouped AUC

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        nb = non_blocking
        return Batch(
            self.dense.to(device, non_blocking=nb),
            self.sparse.to(device, non_blocking=nb),
            self.labels.to(device, non_blocking=nb),
            None if self.weights is None else self.weights.to(device, non_blocking=nb),
            self.n_real,
            None if self.teacher is None else self.teacher.to(device, non_blocking=nb),
            self.group,  # evaluation only: stays on the CPU
        )

    def to_proxy_tuple(self, model: Any) -> Any:
        """TorchRec's train pipeline traces the model with these `concrete_args`: the
        model says which Batch field feeds each of its inputs (RocketModel.trace_inputs)."""
        return model.trace_inputs()

    def record_stream(self, stream: Any) -> None:
        """TrainPipelineSparseDist (CUDA): the batch is used on another stream."""
        for t in (self.dense, self.labels, self.weights, self.teacher):
            if t is not None:
                t.record_stream(stream)
        self.sparse.record_stream(stream)


@dataclass
class Decoded:
    dense: np.ndarray
    ids: list[tuple[np.ndarray, np.ndarray]]
    labels: np.ndarray
    weights: np.ndarray | None
    keys: tuple[str, ...]
    teacher: np.ndarray | None = None
    group: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def slice(self, a: int, b: int) -> Decoded:
        ids = []
        for values, offsets in self.ids:
            lo, hi = offsets[a], offsets[b]
            ids.append((values[lo:hi], offsets[a : b + 1] - lo))
        return Decoded(
            self.dense[a:b],
            ids,
            self.labels[a:b],
            None if self.weights is None else self.weights[a:b],
            self.keys,
            None if self.teacher is None else self.teacher[a:b],
            None if self.group is None else self.group[a:b],
        )

    @staticmethod
    def concat(parts: list[Decoded]) -> Decoded:
        if len(parts) == 1:
            return parts[0]
        ids = []
        for f in range(len(parts[0].ids)):
            vals = np.concatenate([p.ids[f][0] for p in parts])
            lens = np.concatenate([np.diff(p.ids[f][1]) for p in parts])
            ids.append((vals, _offsets(lens)))
        w = parts[0].weights
        t = parts[0].teacher
        g = parts[0].group
        return Decoded(
            np.concatenate([p.dense for p in parts]),
            ids,
            np.concatenate([p.labels for p in parts]),
            None if w is None else np.concatenate([p.weights for p in parts]),  # type: ignore[misc]
            parts[0].keys,
            None if t is None else np.concatenate([p.teacher for p in parts]),  # type: ignore[misc]
            None if g is None else np.concatenate([p.group for p in parts]),  # type: ignore[misc]
        )

    def pad_to(self, n: int) -> Decoded:
        """Repeat rows cyclically up to n rows (equal batch sizes across ranks)."""
        if len(self) >= n or len(self) == 0:
            return self
        return self.take(np.arange(n) % len(self))

    def take(self, idx: np.ndarray) -> Decoded:
        """Rows idx (int64 [m], any order, repeats allowed), bags included."""
        ids = []
        m = len(idx)
        one_each = np.arange(len(self) + 1, dtype=np.int64)
        for values, offsets in self.ids:
            if len(values) == len(self) and np.array_equal(offsets, one_each):
                # exactly one id per row (a scalar feature without nulls): a plain gather
                ids.append((values[idx], np.arange(m + 1, dtype=np.int64)))
                continue
            lens = np.diff(offsets)[idx]
            new_offsets = _offsets(lens)
            # each new position's source: its bag's old start + position inside the bag
            src = np.repeat(offsets[:-1][idx] - new_offsets[:-1], lens)
            src += np.arange(new_offsets[-1], dtype=np.int64)
            ids.append((values[src], new_offsets))
        return Decoded(
            self.dense[idx],
            ids,
            self.labels[idx],
            None if self.weights is None else self.weights[idx],
            self.keys,
            None if self.teacher is None else self.teacher[idx],
            None if self.group is None else self.group[idx],
        )

    def to_batch(self) -> Batch:
        values = np.concatenate([v for v, _ in self.ids]) if self.ids else np.empty(0, np.int64)
        lengths = np.concatenate([np.diff(o) for _, o in self.ids])
        kjt = KeyedJaggedTensor(
            keys=list(self.keys),
            values=torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)),
            lengths=torch.from_numpy(lengths.astype(np.int64, copy=False)),
        )
        return Batch(
            dense=torch.from_numpy(np.ascontiguousarray(self.dense)),
            sparse=kjt,
            labels=torch.from_numpy(np.ascontiguousarray(self.labels)),
            weights=None if self.weights is None else torch.from_numpy(self.weights),
            teacher=None if self.teacher is None else torch.from_numpy(self.teacher),
            group=None if self.group is None else torch.from_numpy(self.group),
        )


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _decode_numeric(col: pa.Array, f: DenseFeature | SparseFeature, source: str) -> np.ndarray:
    """A numeric input column -> float32 with NaN for null (missing); inf is an error."""
    what = "dense" if isinstance(f, DenseFeature) else "bucketized"
    if not is_numeric(col.type):
        raise DataError(
            f"{source}: column '{f.column}' ({what} feature '{f.name}') has type {col.type}; "
            "expected a number"
        )
    x = col.cast(pa.float32(), safe=False).to_numpy(zero_copy_only=False)  # null -> NaN
    if np.isinf(x).any():
        bad = int(np.isinf(x).sum())
        raise DataError(
            f"{source}: column '{f.column}' ({what} feature '{f.name}') has {bad} infinite "
            "value(s) (or values beyond float32)"
        )
    return x.astype(np.float32, copy=False)


def _ids_of(values: pa.Array, f: SparseFeature, source: str) -> np.ndarray:
    """Non-null flat id values -> int64 ids (hash strings, cast integers)."""
    t = values.type
    if f.dtype == "string":
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise DataError(
                f"{source}: column '{f.column}' (sparse feature '{f.name}') holds {t}; "
                "the spec says dtype string"
            )
        return hash_strings(values)
    if not pa.types.is_integer(t):
        raise DataError(
            f"{source}: column '{f.column}' (sparse feature '{f.name}') holds {t}; "
            "the spec says dtype int64 (integer ids)"
        )
    try:
        return values.cast(pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid as e:
        raise DataError(f"{source}: column '{f.column}': ids do not fit int64: {e}") from None


def _decode_sparse(col: pa.Array, f: SparseFeature, source: str) -> tuple[np.ndarray, np.ndarray]:
    n = len(col)
    t = col.type
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if f.kind == "scalar" and is_list:
        raise DataError(
            f"{source}: column '{f.column}' (sparse feature '{f.name}') is a list ({t}); "
            "the spec says kind scalar (use kind: list for multi-hot)"
        )
    if f.is_list and not is_list:
        raise DataError(
            f"{source}: column '{f.column}' (sparse feature '{f.name}') is {t}, not a list; "
            f"the spec says kind {f.kind}"
        )
    if not is_list:
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        ids = _ids_of(col.drop_null() if col.null_count else col, f, source)
        return ids, _offsets(valid.astype(np.int64))
    # list column: null lists and null elements become nothing (empty bags)
    lens = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    flat = col.flatten()  # respects slicing; null lists contribute nothing
    if pa.types.is_dictionary(flat.type):
        flat = flat.dictionary_decode()
    lens = lens.astype(np.int64)
    if flat.null_count:
        parent = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
        keep = flat.is_valid().to_numpy(zero_copy_only=False)
        lens = np.bincount(parent[keep], minlength=n).astype(np.int64)
        flat = flat.drop_null()
    ids = _ids_of(flat, f, source)
    offsets = _offsets(lens)
    return ids, offsets


def check_schema(schema: pa.Schema, spec: FeatureSpec, source: str) -> None:
    """Check every spec column exists with a usable type (no data read)."""
    empty = schema.empty_table()
    target, _ = unify_schemas({source: schema}, spec)  # all-null (untyped) columns
    empty = conform(empty, target, source)
    decode_table(empty, spec, source)


def decode_table(
    table: pa.Table | pa.RecordBatch,
    spec: FeatureSpec,
    source: str,
    teacher_column: str | None = None,
) -> Decoded:
    """Arrow table -> Decoded numpy block. Raises DataError naming file and column.

    teacher_column: optional probability column (e.g. synth's true CTR) used as a soft
    label by the `perfect_teacher` experiment mode; never a feature. Without it, the
    spec's logged teacher column, if any. Either way `teacher` holds logits (float32
    [B], NaN where a logged score is null).
    """
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    labels, weights, group = decode_targets(table, spec, source)
    numeric: list[DenseFeature | SparseFeature] = [*spec.dense, *spec.bucket_features]
    dense, ids = decode_inputs(table, spec.id_features, numeric, source)
    teacher = None
    if teacher_column:
        teacher = decode_true_ctr(table, teacher_column, source)
    elif spec.teacher_column:
        teacher = decode_teacher(table, spec.teacher_column, spec.teacher_kind, source)
    keys = tuple(f.name for f in spec.id_features)
    return Decoded(dense, ids, labels, weights, keys, teacher, group)


def decode_inputs(
    table: pa.Table,
    id_features: list[SparseFeature],
    numeric_features: list[DenseFeature | SparseFeature],
    source: str,
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Raw model inputs of `table`: numeric [n, C] float32 and (values, offsets) per id
    feature. Training (decode_table) and serving requests (rocketrec.serving) share it."""
    n = table.num_rows
    if numeric_features:
        dense = np.stack(
            [
                _decode_numeric(column_of(table, f.column, _what(f), source), f, source)
                for f in numeric_features
            ],
            axis=1,
        )
    else:
        dense = np.zeros((n, 0), dtype=np.float32)
    ids = [
        _decode_sparse(column_of(table, f.column, f"sparse feature '{f.name}'", source), f, source)
        for f in id_features
    ]
    return dense, ids


def _what(f: DenseFeature | SparseFeature) -> str:
    return f"{'dense' if isinstance(f, DenseFeature) else 'bucketized'} feature '{f.name}'"


def arrow_to_batch(
    table: pa.Table | pa.RecordBatch, spec: FeatureSpec, source: str = "<arrow>"
) -> Batch:
    return decode_table(table, spec, source).to_batch()
