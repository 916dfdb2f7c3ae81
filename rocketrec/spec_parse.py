"""Parsing feature spec YAML: one parser per section (top, tables, sparse, dense, light).

`load_spec` and `spec_from_dict` are re-exported by rocketrec.spec; every user
error is a SpecError naming the file, the entry and the field.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

from rocketrec.spec import (
    ID_KINDS,
    POOLINGS,
    SPARSE_DTYPES,
    SPARSE_KINDS,
    SPEC_VERSION,
    TEACHER_KINDS,
    TRANSFORMS,
    DenseFeature,
    FeatureSpec,
    SparseFeature,
    SpecError,
    TableSpec,
    _table_name_ok,
    float32,
)


def _loader() -> Any:
    """A yaml SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the
    last). yaml is imported here only: the spec dataclasses need nothing beyond the
    standard library (the torch-only GPU check builds specs from dicts)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise SpecError(
                    f"duplicate key {key!r} (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1})"
                )
            seen[key] = key_node.start_mark.line
        return loader.construct_mapping(node, deep=deep)

    UniqueKeyLoader.add_constructor(
        yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping
    )
    return UniqueKeyLoader


class _Ctx:
    """Builds error messages of the form `file: where: field 'x': problem`."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, msg: str) -> SpecError:
        prefix = f"{self.source}: " + (f"{where}: " if where else "")
        return SpecError(prefix + msg)


def _check_keys(
    ctx: _Ctx, where: str, obj: Any, allowed: tuple[str, ...], required: tuple[str, ...]
) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ctx.fail(where, f"expected a mapping, got {type(obj).__name__} ({obj!r:.60})")
    for key in obj:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else f" (allowed: {', '.join(allowed)})"
            raise ctx.fail(where, f"unknown key '{key}'{extra}")
    for key in required:
        if key not in obj or obj[key] is None:
            raise ctx.fail(where, f"field '{key}' is required")
    return obj


def _str(ctx: _Ctx, where: str, obj: dict[str, Any], key: str) -> str:
    v = obj[key]
    if not isinstance(v, str) or not v.strip():
        raise ctx.fail(where, f"field '{key}' must be a non-empty string, got {v!r}")
    return v


def _int(ctx: _Ctx, where: str, obj: dict[str, Any], key: str, minimum: int) -> int:
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ctx.fail(where, f"field '{key}' must be an integer, got {v!r}")
    if v < minimum:
        raise ctx.fail(where, f"field '{key}' must be >= {minimum}, got {v}")
    return v


def _float(ctx: _Ctx, where: str, obj: dict[str, Any], key: str) -> float:
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ctx.fail(where, f"field '{key}' must be a finite number, got {v!r}")
    return float(v)


def _choice(ctx: _Ctx, where: str, obj: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    v = obj[key]
    if v not in choices:
        raise ctx.fail(where, f"field '{key}' must be one of {', '.join(choices)}, got {v!r}")
    return str(v)


def _list(ctx: _Ctx, where: str, obj: dict[str, Any], key: str) -> list[Any]:
    v = obj.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise ctx.fail(where, f"field '{key}' must be a list, got {type(v).__name__}")
    return v


def _column_block(ctx: _Ctx, where: str, raw: Any) -> str:
    if isinstance(raw, str):
        raw = {"column": raw}
    obj = _check_keys(ctx, where, raw, ("column",), ("column",))
    return _str(ctx, where, obj, "column")


def _parse_top(ctx: _Ctx, raw: Any) -> dict[str, Any]:
    if raw is None:
        raise ctx.fail("", "the file is empty")
    if not isinstance(raw, dict):
        raise ctx.fail("", f"top level must be a mapping, got {type(raw).__name__}")
    top = _check_keys(
        ctx,
        "",
        raw,
        (
            "version",
            "name",
            "label",
            "weight",
            "group",
            "teacher",
            "tables",
            "sparse",
            "dense",
            "light",
        ),
        ("version", "label", "tables", "sparse"),
    )
    version = _int(ctx, "", top, "version", 1)
    if version != SPEC_VERSION:
        raise ctx.fail(
            "", f"field 'version': this rocketrec reads version {SPEC_VERSION}, got {version}"
        )
    return top


def _parse_columns(ctx: _Ctx, top: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(label, weight, group) columns."""
    label = _column_block(ctx, "label", top["label"])
    weight = _column_block(ctx, "weight", top["weight"]) if top.get("weight") is not None else None
    group = _column_block(ctx, "group", top["group"]) if "group" in top else None
    if group is not None and group in (label, weight):
        raise ctx.fail("group", f"field 'column': '{group}' is the label or weight column")
    return label, weight, group


def _parse_tables(ctx: _Ctx, top: dict[str, Any]) -> list[TableSpec]:
    tables: list[TableSpec] = []
    for i, t in enumerate(_list(ctx, "", top, "tables")):
        tname0 = t.get("name") if isinstance(t, dict) else None
        where = (
            f"table '{tname0}'" if isinstance(tname0, str) and tname0.strip() else f"tables[{i}]"
        )
        obj = _check_keys(
            ctx, where, t, ("name", "rows", "dim", "pooling"), ("name", "rows", "dim")
        )
        tname = _str(ctx, where, obj, "name")
        where = f"table '{tname}'"
        if any(x.name == tname for x in tables):
            raise ctx.fail(where, "duplicate table name")
        if not _table_name_ok(tname):
            raise ctx.fail(
                where,
                f"field 'name': '{tname}' cannot name a table (TorchRec keeps tables in a "
                "torch ModuleDict, where it is taken or holds a '.'), e.g. use 'items_table'",
            )
        pooling = _choice(ctx, where, obj, "pooling", POOLINGS) if "pooling" in obj else "sum"
        dim = _int(ctx, where, obj, "dim", 1)
        if dim % 4:
            raise ctx.fail(
                where,
                f"field 'dim' must be a multiple of 4 (fbgemm's embedding kernels), got {dim}",
            )
        tables.append(TableSpec(tname, _int(ctx, where, obj, "rows", 1), dim, pooling))
    if not tables:
        raise ctx.fail("", "field 'tables' must list at least one table")
    return tables


class _Names:
    """Feature names seen so far (sparse and dense share one namespace)."""

    def __init__(self, ctx: _Ctx) -> None:
        self.ctx, self.seen = ctx, set()  # type: ignore[var-annotated]

    def new(self, where: str, obj: dict[str, Any]) -> str:
        fname = _str(self.ctx, where, obj, "name")
        if fname in self.seen:
            raise self.ctx.fail(f"feature '{fname}'", "duplicate feature name")
        self.seen.add(fname)
        return fname


def _where(kind: str, i: int, f: Any) -> str:
    """'feature NAME' when the entry names itself, else 'sparse[i]'."""
    name = f.get("name") if isinstance(f, dict) else None
    return f"feature '{name}'" if isinstance(name, str) and name.strip() else f"{kind}[{i}]"


def _entry(
    ctx: _Ctx,
    at: tuple[str, int, Any],
    names: _Names,
    allowed: tuple[str, ...],
    required: tuple[str, ...],
) -> tuple[dict[str, Any], str, str]:
    """One feature entry `at` = (section, index, raw): (its keys checked, its new name,
    'feature NAME' for messages)."""
    kind, i, f = at
    obj = _check_keys(ctx, _where(kind, i, f), f, allowed, required)
    fname = names.new(f"{kind}[{i}]", obj)
    return obj, fname, f"feature '{fname}'"


_SPARSE_KEY_KINDS = {  # key -> kinds that take it
    "column": ("scalar", "list", "bucketize", "sequence"),
    "dtype": ID_KINDS,
    "max_ids": ("scalar", "list", "cross"),
    "inputs": ("cross",),
    "boundaries": ("bucketize",),
    "max_len": ("sequence",),
    "query": ("sequence",),
}


def _cross_inputs(ctx: _Ctx, where: str, obj: dict[str, Any]) -> tuple[str, ...]:
    if obj.get("inputs") is None:
        raise ctx.fail(where, "field 'inputs' is required by kind 'cross'")
    raw_inputs = _list(ctx, where, obj, "inputs")
    if len(raw_inputs) < 2 or not all(isinstance(x, str) and x for x in raw_inputs):
        raise ctx.fail(
            where, f"field 'inputs' must list at least two feature names, got {raw_inputs!r}"
        )
    if len(set(raw_inputs)) != len(raw_inputs):
        raise ctx.fail(where, "field 'inputs' lists a feature twice")
    return tuple(raw_inputs)


def _boundaries(ctx: _Ctx, where: str, obj: dict[str, Any], table: TableSpec) -> tuple[float, ...]:
    if obj.get("boundaries") is None:
        raise ctx.fail(where, "field 'boundaries' is required by kind 'bucketize'")
    raw_b = _list(ctx, where, obj, "boundaries")
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
    ctx: _Ctx, i: int, f: Any, tables: dict[str, TableSpec], names: _Names
) -> SparseFeature:
    obj, fname, where = _entry(
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
    tname = _str(ctx, where, obj, "table")
    if tname not in tables:
        hint = difflib.get_close_matches(tname, list(tables), n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ctx.fail(where, f"field 'table': no table named '{tname}'{extra}")
    kind = _choice(ctx, where, obj, "kind", SPARSE_KINDS) if "kind" in obj else "scalar"
    for key, kinds in _SPARSE_KEY_KINDS.items():
        if key in obj and kind not in kinds:
            raise ctx.fail(where, f"field '{key}' does not apply to kind '{kind}'")
    if kind != "cross" and "column" not in obj:
        raise ctx.fail(where, "field 'column' is required")
    if kind == "sequence":
        for key in ("max_len", "query"):
            if obj.get(key) is None:
                raise ctx.fail(where, f"field '{key}' is required by kind 'sequence'")
        max_ids: int | None = _int(ctx, where, obj, "max_len", 1)
    else:
        max_ids = _int(ctx, where, obj, "max_ids", 1) if obj.get("max_ids") is not None else None
    return SparseFeature(
        name=fname,
        column=_str(ctx, where, obj, "column") if kind != "cross" else "",
        table=tname,
        dtype=_choice(ctx, where, obj, "dtype", SPARSE_DTYPES) if "dtype" in obj else "int64",
        kind=kind,
        max_ids=max_ids,
        inputs=_cross_inputs(ctx, where, obj) if kind == "cross" else None,
        boundaries=_boundaries(ctx, where, obj, tables[tname]) if kind == "bucketize" else None,
        query=_str(ctx, where, obj, "query") if kind == "sequence" else None,
    )


def _parse_sparse(
    ctx: _Ctx, top: dict[str, Any], tables: list[TableSpec], names: _Names
) -> list[SparseFeature]:
    by_table = {t.name: t for t in tables}
    sparse = [
        _sparse_one(ctx, i, f, by_table, names) for i, f in enumerate(_list(ctx, "", top, "sparse"))
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
    ctx: _Ctx,
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


def _parse_teacher(ctx: _Ctx, top: dict[str, Any], taken: set[str]) -> tuple[str | None, str]:
    """(column, kind) of the optional logged teacher score."""
    if top.get("teacher") is None:
        return None, "probability"
    obj = _check_keys(ctx, "teacher", top["teacher"], ("column", "kind"), ("column",))
    column = _str(ctx, "teacher", obj, "column")
    kind = _choice(ctx, "teacher", obj, "kind", TEACHER_KINDS) if "kind" in obj else "probability"
    if column in taken:
        raise ctx.fail(
            "teacher",
            f"field 'column': '{column}' is already the label, weight or a feature's column "
            "(a teacher score is never an input)",
        )
    return column, kind


def _dense_one(ctx: _Ctx, i: int, f: Any, names: _Names) -> DenseFeature:
    obj, fname, where = _entry(
        ctx,
        ("dense", i, f),
        names,
        ("name", "column", "fill", "transform", "min", "max", "mean", "std"),
        ("name", "column"),
    )
    transform = _choice(ctx, where, obj, "transform", TRANSFORMS) if "transform" in obj else "none"
    params = {k: _float(ctx, where, obj, k) for k in ("min", "max", "mean", "std") if k in obj}
    wanted = {"clip": ("min", "max"), "standardize": ("mean", "std")}.get(transform, ())
    for k in params:
        if k not in wanted:
            raise ctx.fail(where, f"field '{k}' does not apply to transform '{transform}'")
    if transform == "standardize":
        for k in ("mean", "std"):
            if k not in params:
                raise ctx.fail(where, f"field '{k}' is required by transform 'standardize'")
        if params["std"] <= 0:
            raise ctx.fail(where, f"field 'std' must be > 0, got {params['std']}")
    if transform == "clip":
        if not params:
            raise ctx.fail(where, "transform 'clip' needs field 'min' and/or 'max'")
        if "min" in params and "max" in params and params["min"] > params["max"]:
            raise ctx.fail(where, "field 'min' is greater than field 'max'")
    return DenseFeature(
        name=fname,
        column=_str(ctx, where, obj, "column"),
        fill=_float(ctx, where, obj, "fill") if "fill" in obj else 0.0,
        transform=transform,
        **params,  # type: ignore[arg-type]
    )


def _parse_dense(ctx: _Ctx, top: dict[str, Any], names: _Names) -> list[DenseFeature]:
    return [_dense_one(ctx, i, f, names) for i, f in enumerate(_list(ctx, "", top, "dense"))]


def _parse_light(
    ctx: _Ctx, top: dict[str, Any], sparse: list[SparseFeature], dense: list[DenseFeature]
) -> tuple[str, ...]:
    all_names = [f.name for f in sparse] + [f.name for f in dense]
    if top.get("light") is None:
        return tuple(all_names)
    lobj = _check_keys(ctx, "light", top["light"], ("features",), ("features",))
    lf = _list(ctx, "light", lobj, "features")
    if not lf:
        raise ctx.fail("light", "field 'features' must name at least one feature")
    for x in lf:
        if not isinstance(x, str) or x not in all_names:
            hint = difflib.get_close_matches(str(x), all_names, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ctx.fail("light", f"field 'features': unknown feature {x!r}{extra}")
    if len(set(lf)) != len(lf):
        raise ctx.fail("light", "field 'features' lists a feature twice")
    if not any(x in {f.name for f in sparse} for x in lf):
        raise ctx.fail("light", "field 'features' must include at least one sparse feature")
    return tuple(n for n in all_names if n in set(lf))  # spec order


def spec_from_dict(raw: Any, source: str = "<memory>") -> FeatureSpec:
    """Validate a parsed YAML document and build the frozen spec, section by section."""
    ctx = _Ctx(source)
    top = _parse_top(ctx, raw)
    label, weight, group = _parse_columns(ctx, top)
    tables = _parse_tables(ctx, top)
    names = _Names(ctx)
    sparse = _parse_sparse(ctx, top, tables, names)
    dense = _parse_dense(ctx, top, names)
    taken = {label, weight, group} | {f.column for f in sparse if f.column}
    taken |= {f.column for f in dense}
    teacher_column, teacher_kind = _parse_teacher(ctx, top, {c for c in taken if c})
    return FeatureSpec(
        name=_str(ctx, "", top, "name") if "name" in top else Path(source).stem,
        version=int(top["version"]),
        label_column=label,
        weight_column=weight,
        tables=tuple(tables),
        sparse=tuple(sparse),
        dense=tuple(dense),
        light_features=_parse_light(ctx, top, sparse, dense),
        source=source,
        group_column=group,
        teacher_column=teacher_column,
        teacher_kind=teacher_kind,
    )


def load_spec(path: str | Path) -> FeatureSpec:
    """Read and validate a spec file. Raises SpecError naming the file on any problem."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: cannot read: {e}") from None
    if not text.strip():
        raise SpecError(f"{p}: the file is empty")
    import yaml

    try:
        raw = yaml.load(text, Loader=_loader())  # noqa: S506 - SafeLoader subclass
    except SpecError as e:
        raise SpecError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{p}: not valid YAML{where}: {problem}") from None
    return spec_from_dict(raw, source=str(p))
