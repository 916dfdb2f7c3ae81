"""The `sparse:` section: each feature's kind and the keys it takes, crosses, buckets,
and the checks that span features (cross inputs, sequences and their queries)."""

from __future__ import annotations

import difflib
import math
from typing import Any

from rocketrec.spec.fields import (
    Ctx,
    Names,
    entry,
    field_choice,
    field_int,
    field_list,
    field_str,
)
from rocketrec.spec.types import (
    ID_KINDS,
    SPARSE_DTYPES,
    SPARSE_KINDS,
    SparseFeature,
    TableSpec,
    float32,
)

_SPARSE_KEY_KINDS = {  # key -> kinds that take it
    "column": ("scalar", "list", "bucketize", "sequence"),
    "dtype": ID_KINDS,
    "max_ids": ("scalar", "list", "cross"),
    "inputs": ("cross",),
    "boundaries": ("bucketize",),
    "max_len": ("sequence",),
    "query": ("sequence",),
}


def _cross_inputs(ctx: Ctx, where: str, obj: dict[str, Any]) -> tuple[str, ...]:
    if obj.get("inputs") is None:
        raise ctx.fail(where, "field 'inputs' is required by kind 'cross'")
    raw_inputs = field_list(ctx, where, obj, "inputs")
    if len(raw_inputs) < 2 or not all(isinstance(x, str) and x for x in raw_inputs):
        raise ctx.fail(
            where, f"field 'inputs' must list at least two feature names, got {raw_inputs!r}"
        )
    if len(set(raw_inputs)) != len(raw_inputs):
        raise ctx.fail(where, "field 'inputs' lists a feature twice")
    return tuple(raw_inputs)


def _boundaries(ctx: Ctx, where: str, obj: dict[str, Any], table: TableSpec) -> tuple[float, ...]:
    if obj.get("boundaries") is None:
        raise ctx.fail(where, "field 'boundaries' is required by kind 'bucketize'")
    raw_b = field_list(ctx, where, obj, "boundaries")
    if not raw_b:
        raise ctx.fail(where, "field 'boundaries' must list at least one number")
    for x in raw_b:
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            raise ctx.fail(where, f"field 'boundaries': {x!r} is not a finite number")
    b32 = [float32(x) for x in raw_b]
    for a, b in zip(b32, b32[1:]):
        if not a < b:
            raise ctx.fail(
                where,
                f"field 'boundaries' must be strictly increasing (in float32), "
                f"got {a!r} then {b!r}",
            )
    boundaries = tuple(float(x) for x in raw_b)
    rows_needed = len(boundaries) + 2
    if table.rows < rows_needed:
        raise ctx.fail(
            where,
            f"table '{table.name}' has {table.rows} rows; {len(boundaries)} boundaries need at "
            f"least {rows_needed} (one per bucket plus one for null)",
        )
    return boundaries


def _sparse_one(
    ctx: Ctx, i: int, f: Any, tables: dict[str, TableSpec], names: Names
) -> SparseFeature:
    obj, fname, where = entry(
        ctx,
        ("sparse", i, f),
        names,
        (
            "name",
            "column",
            "table",
            "dtype",
            "kind",
            "max_ids",
            "inputs",
            "boundaries",
            "max_len",
            "query",
        ),
        ("name", "table"),
    )
    tname = field_str(ctx, where, obj, "table")
    if tname not in tables:
        hint = difflib.get_close_matches(tname, list(tables), n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ctx.fail(where, f"field 'table': no table named '{tname}'{extra}")
    kind = field_choice(ctx, where, obj, "kind", SPARSE_KINDS) if "kind" in obj else "scalar"
    for key, kinds in _SPARSE_KEY_KINDS.items():
        if key in obj and kind not in kinds:
            raise ctx.fail(where, f"field '{key}' does not apply to kind '{kind}'")
    if kind != "cross" and "column" not in obj:
        raise ctx.fail(where, "field 'column' is required")
    if kind == "sequence":
        for key in ("max_len", "query"):
            if obj.get(key) is None:
                raise ctx.fail(where, f"field '{key}' is required by kind 'sequence'")
        max_ids: int | None = field_int(ctx, where, obj, "max_len", 1)
    else:
        max_ids = (
            field_int(ctx, where, obj, "max_ids", 1) if obj.get("max_ids") is not None else None
        )
    return SparseFeature(
        name=fname,
        column=field_str(ctx, where, obj, "column") if kind != "cross" else "",
        table=tname,
        dtype=field_choice(ctx, where, obj, "dtype", SPARSE_DTYPES) if "dtype" in obj else "int64",
        kind=kind,
        max_ids=max_ids,
        inputs=_cross_inputs(ctx, where, obj) if kind == "cross" else None,
        boundaries=_boundaries(ctx, where, obj, tables[tname]) if kind == "bucketize" else None,
        query=field_str(ctx, where, obj, "query") if kind == "sequence" else None,
    )


def parse_sparse(
    ctx: Ctx, top: dict[str, Any], tables: list[TableSpec], names: Names
) -> list[SparseFeature]:
    by_table = {t.name: t for t in tables}
    sparse = [
        _sparse_one(ctx, i, f, by_table, names)
        for i, f in enumerate(field_list(ctx, "", top, "sparse"))
    ]
    by_name = {f.name: f for f in sparse}
    for f in sparse:
        for x in f.inputs or ():
            src = by_name.get(x)
            if src is None:
                hint = difflib.get_close_matches(x, list(by_name), n=1)
                extra = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ctx.fail(
                    f"feature '{f.name}'",
                    f"field 'inputs': no sparse feature named '{x}'{extra} "
                    "(inputs name sparse features of kind scalar, list or bucketize)",
                )
            if src.kind == "cross":
                raise ctx.fail(
                    f"feature '{f.name}'",
                    f"field 'inputs': '{x}' is itself a cross (list its inputs instead)",
                )
            if src.kind == "sequence":
                raise ctx.fail(
                    f"feature '{f.name}'",
                    f"field 'inputs': '{x}' is a sequence (crosses take bags, not histories)",
                )
    _check_sequences(ctx, sparse, by_name, by_table)
    if not sparse:
        raise ctx.fail("", "field 'sparse' must list at least one feature")
    used = {f.table for f in sparse}
    for t in tables:
        if t.name not in used:
            raise ctx.fail(f"table '{t.name}'", "no sparse feature uses this table")
    return sparse


def _check_sequences(
    ctx: Ctx,
    sparse: list[SparseFeature],
    by_name: dict[str, SparseFeature],
    by_table: dict[str, TableSpec],
) -> None:
    """A sequence's query is a candidate-side sparse feature of the same table or of a
    table of the same dim; every table a sequence uses has one dim (TorchRec's
    EmbeddingCollection holds them all and requires it)."""
    seqs = [f for f in sparse if f.kind == "sequence"]
    for f in seqs:
        where = f"feature '{f.name}'"
        q = by_name.get(str(f.query))
        if q is None:
            hint = difflib.get_close_matches(str(f.query), list(by_name), n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ctx.fail(where, f"field 'query': no sparse feature named '{f.query}'{extra}")
        if q.kind == "sequence":
            raise ctx.fail(
                where, f"field 'query': '{q.name}' is a sequence; name a candidate-side feature"
            )
        qd, sd = by_table[q.table].dim, by_table[f.table].dim
        if q.table != f.table and qd != sd:
            raise ctx.fail(
                where,
                f"field 'query': '{q.name}' reads table '{q.table}' (dim {qd}), the sequence "
                f"reads table '{f.table}' (dim {sd}): a query needs the same table or the "
                "same dim",
            )
    dims = {by_table[f.table].dim: f for f in seqs}
    if len(dims) > 1:
        a, b = sorted(dims)[:2]
        raise ctx.fail(
            f"feature '{dims[b].name}'",
            f"field 'table': sequence tables must share one dim (TorchRec's "
            f"EmbeddingCollection), got {a} ('{dims[a].table}') and {b} ('{dims[b].table}')",
        )
