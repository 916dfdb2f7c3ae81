"""What a model learns from, beside its inputs: labels, weights, groups (for grouped
AUC), the logged teacher score; decoded from Arrow with errors naming file and column."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rocketrec.data.schema import DataError, column_of, is_numeric
from rocketrec.spec import FeatureSpec
from rocketrec.spec.hashing import hash_strings


def decode_targets(
    table: pa.Table, spec: FeatureSpec, source: str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Labels float32 [n], weights float32 [n] or None, group ids int64 [n] or None (the
    same decoding as decode_table: evaluation of exported models reads only these)."""
    labels = _decode_labels(
        column_of(table, spec.label_column, "label", source), spec.label_column, source
    )
    weights = None
    if spec.weight_column:
        weights = _decode_weights(
            column_of(table, spec.weight_column, "weight", source), spec.weight_column, source
        )
    group = None
    if spec.group_column:
        group = _decode_group(
            column_of(table, spec.group_column, "group", source), spec.group_column, source
        )
    return labels, weights, group


def _decode_labels(col: pa.Array, name: str, source: str) -> np.ndarray:
    if not is_numeric(col.type):
        raise DataError(
            f"{source}: label column '{name}' has type {col.type}; expected 0/1 numbers"
        )
    if col.null_count:
        raise DataError(f"{source}: label column '{name}' has {col.null_count} null value(s)")
    y = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    bad = ~((y == 0.0) | (y == 1.0))
    if bad.any():
        raise DataError(
            f"{source}: label column '{name}' has {int(bad.sum())} value(s) outside {{0, 1}} "
            f"(first: {y[bad][0].item()!r})"
        )
    return y.astype(np.float32)


def _decode_weights(col: pa.Array, name: str, source: str) -> np.ndarray:
    if not is_numeric(col.type):
        raise DataError(f"{source}: weight column '{name}' has type {col.type}; expected numbers")
    if col.null_count:
        raise DataError(f"{source}: weight column '{name}' has {col.null_count} null value(s)")
    w = col.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float32)
    if not np.isfinite(w).all() or (w < 0).any():
        raise DataError(f"{source}: weight column '{name}' has negative or non-finite values")
    return w


def logit(p: np.ndarray) -> np.ndarray:
    """Probabilities (float64) -> logits float32, clamped to [1e-6, 1 - 1e-6] first."""
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p)).astype(np.float32)


def decode_teacher(table: pa.Table, column: str, kind: str, source: str) -> np.ndarray:
    """A logged teacher score column -> logits float32 [B], NaN where the score is null.
    kind probability: numbers in [0, 1]; kind logit: finite numbers. Anything else
    (NaN included: a null is how a missing score is written) names file and column."""
    col = column_of(table, column, f"teacher score ({kind})", source)
    if not (is_numeric(col.type) or pa.types.is_null(col.type)):
        raise DataError(
            f"{source}: teacher column '{column}' has type {col.type}; expected numbers "
            f"(a {kind} per row, null where production logged none)"
        )
    x = col.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> NaN
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    v = x[valid]
    if kind == "probability":
        bad = ~((v >= 0) & (v <= 1))
        want = "probabilities in [0, 1]"
    else:
        bad = ~np.isfinite(v)
        want = "finite logits"
    if bad.any():
        raise DataError(
            f"{source}: teacher column '{column}' must hold {want} or null; "
            f"{int(bad.sum())} value(s) are not (e.g. {v[bad][0]!r})"
        )
    out = np.full(len(x), np.nan, np.float32)
    out[valid] = logit(v) if kind == "probability" else v.astype(np.float32)
    return out


def decode_true_ctr(table: pa.Table, column: str, source: str) -> np.ndarray:
    """A true click probability column (synth's, for the perfect_teacher experiment) ->
    logits float32 [B]: non-null floats strictly inside (0, 1)."""
    col = column_of(table, column, "teacher probability", source)
    if not pa.types.is_floating(col.type) or col.null_count:
        raise DataError(f"{source}: teacher column '{column}' must be non-null floats")
    p = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    if not ((p > 0) & (p < 1)).all():
        raise DataError(f"{source}: teacher column '{column}' must lie in (0, 1)")
    return logit(p)


def _decode_group(col: pa.Array, name: str, source: str) -> np.ndarray:
    """Group ids as int64: integers as they are, strings hashed (FNV-1a 64); nulls form
    one group of their own."""
    if pa.types.is_integer(col.type):
        out = col.cast(pa.int64()).fill_null(np.iinfo(np.int64).min)
        return out.to_numpy(zero_copy_only=False).astype(np.int64)  # a writable copy
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return hash_strings(col.fill_null(""))
    raise DataError(
        f"{source}: column '{name}' (group) must hold integers or strings, got {col.type}"
    )
