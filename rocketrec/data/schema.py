"""Schema evolution: the files of one dataset may store a column with different types.

Real log pipelines widen types and add columns over time. Each file is read with
its own schema and cast to one type per column where the cast is safe (integer
widening, int to float for numbers, float32/float64, string/large_string/
dictionary strings, list variants); extra columns are ignored. An unsafe
difference is a DataError naming the file and the column.
"""

from __future__ import annotations

import pyarrow as pa

from rocketrec.errors import UserError
from rocketrec.spec import DenseFeature, FeatureSpec, SparseFeature


class DataError(UserError):
    """Bad input data; the message names the file and the column."""


def is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


# -- schema evolution: files of one dataset may store a column with different types -------


def _string_like(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _int_like(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_integer(t)


def _list_value(t: pa.DataType) -> pa.DataType | None:
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return t.value_type
    return None


def _null_like(t: pa.DataType) -> bool:
    v = _list_value(t)
    return pa.types.is_null(t) or (v is not None and pa.types.is_null(v))


def column_roles(spec: FeatureSpec) -> dict[str, str]:
    """Column -> how the spec reads it: 'number' (label, weight, dense, bucketized), 'id'
    / 'ids' (scalar / list id feature), 'group'. Sparse roles win over numbers."""
    roles: dict[str, str] = {spec.label_column: "number"}
    if spec.weight_column:
        roles[spec.weight_column] = "number"
    if spec.teacher_column:
        roles[spec.teacher_column] = "number"
    numeric: list[DenseFeature | SparseFeature] = [*spec.dense, *spec.bucket_features]
    for f in numeric:
        roles.setdefault(str(f.column), "number")
    for g in spec.id_features:
        roles[str(g.column)] = "ids" if g.is_list else "id"
    if spec.group_column:
        roles.setdefault(spec.group_column, "group")
    return roles


def canonical_type(role: str, t: pa.DataType) -> pa.DataType | None:
    """The type every file's column is cast to when files disagree; None when `t` cannot
    be cast safely for this role (decoding then names the file and the column)."""
    if pa.types.is_null(t):  # an all-null column stored without a type
        return {"number": pa.float64(), "id": pa.int64(), "group": pa.int64()}.get(
            role, pa.large_list(pa.int64())
        )
    if role == "number":
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            return pa.float64()
        return None
    if role in ("id", "group"):
        if _int_like(t):
            return pa.int64()
        return pa.large_string() if _string_like(t) else None
    v = _list_value(t)
    if v is None:
        return None
    if pa.types.is_null(v) or _int_like(v):
        return pa.large_list(pa.int64())
    return pa.large_list(pa.large_string()) if _string_like(v) else None


def unify_schemas(
    schemas: dict[str, pa.Schema], spec: FeatureSpec
) -> tuple[dict[str, pa.DataType], list[str]]:
    """Target types for the spec's columns over files whose schemas may differ, and one
    note per column whose types differ ('col: int8 (2 files), int64 (1 file) -> float64').

    A column keeps its type where every file agrees; otherwise it gets the role's
    canonical type (integers widened to int64, numbers to float64, string, large_string
    and dictionary strings to large_string, list variants to large_list). A difference
    that cannot be cast safely (string vs integer ids, a list where a scalar is expected)
    raises DataError naming a file and the column."""
    roles = column_roles(spec)
    target: dict[str, pa.DataType] = {}
    notes: list[str] = []
    for col, role in roles.items():
        seen: dict[str, list[str]] = {}
        types: dict[str, pa.DataType] = {}
        for src, sch in schemas.items():
            i = sch.get_field_index(col)
            if i < 0:
                continue  # decoding that file names the missing column
            t = sch.field(i).type
            seen.setdefault(str(t), []).append(src)
            types[str(t)] = t
        only_null = len(types) == 1 and _null_like(next(iter(types.values())))
        if len(types) <= 1 and not only_null:
            continue
        canon = {k: canonical_type(role, t) for k, t in types.items()}
        bad = [k for k, c in canon.items() if c is None]
        kinds = {str(c) for c in canon.values() if c is not None}
        if bad or len(kinds) > 1:
            k = bad[0] if bad else sorted(types)[-1]
            others = ", ".join(f"{t} in {seen[t][0]}" for t in types if t != k)
            raise DataError(
                f"{seen[k][0]}: column '{col}' has type {k}, which cannot be read together "
                f"with {others} (the spec reads it as {_role_words(role)})"
            )
        target[col] = next(c for c in canon.values() if c is not None)
        parts = ", ".join(
            f"{t} ({len(fs)} file{'s' if len(fs) > 1 else ''})" for t, fs in seen.items()
        )
        if not only_null:
            notes.append(f"{col}: {parts} -> {target[col]}")
    return target, notes


def _role_words(role: str) -> str:
    return {
        "number": "numbers",
        "id": "scalar ids",
        "ids": "lists of ids",
        "group": "group ids",
    }[role]


def conform(table: pa.Table, target: dict[str, pa.DataType], source: str) -> pa.Table:
    """Cast `table`'s columns to the unified types (no-op where they already match)."""
    for col, t in target.items():
        i = table.schema.get_field_index(col)
        if i < 0 or table.schema.field(i).type == t:
            continue
        c = table.column(i)
        try:
            if pa.types.is_dictionary(c.type):
                c = c.cast(c.type.value_type)
            table = table.set_column(i, col, c.cast(t))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"{source}: column '{col}': cannot cast {c.type} to {t}: {e}") from None
    return table


def column_of(table: pa.Table, name: str, what: str, source: str) -> pa.Array:
    """Column `name` of `table` as one plain array (dictionary decoded); a missing
    column is a DataError naming the file, the column and what it was for."""
    if name not in table.column_names:
        cols = ", ".join(table.column_names[:12]) + (" ..." if table.num_columns > 12 else "")
        raise DataError(f"{source}: column '{name}' ({what}) not found; columns: {cols}")
    col = table.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    return col
