"""Feature spec: the YAML an ad engineer writes, parsed once into frozen dataclasses.

YAML stays at the edge. `load_spec(path)` reads the file, rejects unknown keys
(with a "did you mean" hint), duplicate keys, wrong types and dangling
references, and returns a `FeatureSpec`. Every user error is a `SpecError`
(a `ValueError`) whose message names the file, the feature and the field, so
the CLI can print one line and exit non-zero.

Schema (documented with examples in feature_specs/README.md):

    version: 1
    name: ads_ctr
    label: {column: click}
    weight: {column: w}                  # optional
    tables:
      - {name: ads, rows: 100000, dim: 16, pooling: sum}
    sparse:
      - {name: ad_id, column: ad_id, dtype: int64, kind: scalar, table: ads, max_ids: 1}
    dense:
      - {name: price, column: price, fill: 0.0, transform: log1p}
    light:
      features: [ad_id, price]
"""

from __future__ import annotations

import difflib
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPEC_VERSION = 1
POOLINGS = ("sum", "mean")
SPARSE_DTYPES = ("int64", "string")
SPARSE_KINDS = ("scalar", "list", "cross", "bucketize")
ID_KINDS = ("scalar", "list")  # kinds read from an id column
TRANSFORMS = ("none", "log1p", "clip", "standardize")


class SpecError(ValueError):
    """A user error in a feature spec; the message names file, feature and field."""


@dataclass(frozen=True)
class TableSpec:
    name: str
    rows: int
    dim: int
    pooling: str = "sum"


@dataclass(frozen=True)
class SparseFeature:
    """An id feature looked up in `table`.

    kind scalar/list: raw ids from `column` (int64, or strings hashed with FNV-1a 64).
    kind cross: no column; the ids are `rocketrec.hashing.cross_hash` of one id from
    each of `inputs` (other sparse features), every combination of their bags.
    kind bucketize: a numeric `column` cut at `boundaries`; id 0 = null/NaN,
    id i + 1 = the number i of boundaries <= x (compared in float32).
    All of them are computed inside the model (rocketrec.model.preprocess).
    """

    name: str
    column: str  # "" for kind cross
    table: str
    dtype: str = "int64"  # "int64" | "string" (strings are hashed, see rocketrec.hashing)
    kind: str = "scalar"  # "scalar" | "list" (multi-hot) | "cross" | "bucketize"
    max_ids: int | None = None  # keep at most this many ids per example (list/cross features)
    inputs: tuple[str, ...] | None = None  # kind cross: the crossed features, in order
    boundaries: tuple[float, ...] | None = None  # kind bucketize: strictly increasing


@dataclass(frozen=True)
class DenseFeature:
    """A float feature: nulls become `fill`, then `transform` applies.

    Transforms: none; log1p = log(1 + max(x, 0)); clip to [min, max];
    standardize = (x - mean) / std.
    """

    name: str
    column: str
    fill: float = 0.0
    transform: str = "none"
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    version: int
    label_column: str
    weight_column: str | None
    tables: tuple[TableSpec, ...]
    sparse: tuple[SparseFeature, ...]
    dense: tuple[DenseFeature, ...]
    light_features: tuple[str, ...]
    source: str = field(default="<memory>", compare=False)
    group_column: str | None = None  # e.g. the user id: evaluation reports grouped AUC

    # -- derived views ---------------------------------------------------------
    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense]

    @property
    def id_features(self) -> list[SparseFeature]:
        """Sparse features read from an id column (kind scalar or list)."""
        return [f for f in self.sparse if f.kind in ID_KINDS]

    @property
    def bucket_features(self) -> list[SparseFeature]:
        return [f for f in self.sparse if f.kind == "bucketize"]

    def feature(self, name: str) -> SparseFeature | DenseFeature:
        for sf in self.sparse:
            if sf.name == name:
                return sf
        for df in self.dense:
            if df.name == name:
                return df
        raise KeyError(name)

    @property
    def light_sparse(self) -> list[SparseFeature]:
        keep = set(self.light_features)
        return [f for f in self.sparse if f.name in keep]

    @property
    def light_dense(self) -> list[DenseFeature]:
        keep = set(self.light_features)
        return [f for f in self.dense if f.name in keep]

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def columns(self) -> list[str]:
        cols = [self.label_column]
        if self.weight_column:
            cols.append(self.weight_column)
        if self.group_column and self.group_column not in cols:
            cols.append(self.group_column)
        for column in [f.column for f in self.sparse] + [f.column for f in self.dense]:
            if column and column not in cols:
                cols.append(column)
        return cols

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form that `spec_from_dict` reads back (checkpoints, manifests)."""
        d: dict[str, Any] = {
            "version": self.version,
            "name": self.name,
            "label": {"column": self.label_column},
            "tables": [vars(t).copy() for t in self.tables],
            "sparse": [_sparse_dict(f) for f in self.sparse],
            "dense": [{k: v for k, v in vars(f).items() if v is not None} for f in self.dense],
            "light": {"features": list(self.light_features)},
        }
        if self.weight_column:
            d["weight"] = {"column": self.weight_column}
        if self.group_column:
            d["group"] = {"column": self.group_column}
        return d


PRIVATE_SUFFIX = "__light"


def _table_name_ok(name: str) -> bool:
    """A table name must be usable as a key of TorchRec's ModuleDict of tables: no '.',
    not an attribute of nn.ModuleDict ('items', 'keys', 'values', 'forward', ...)."""
    if not name or "." in name:
        return False
    import torch

    return not hasattr(torch.nn.ModuleDict(), name)


def private_table_name(table: str) -> str:
    """Name of the light tower's private table beside shared table `table` (and of a
    light feature's private twin)."""
    return f"{table}{PRIVATE_SUFFIX}"


def _sparse_dict(f: SparseFeature) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in vars(f).items():
        if v is None or (k == "column" and f.kind == "cross"):
            continue
        if k == "dtype" and f.kind not in ID_KINDS:
            continue
        d[k] = list(v) if isinstance(v, tuple) else v
    return d


# -- parsing ------------------------------------------------------------------


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


def float32(x: float) -> float:
    """x rounded to float32 (as the model compares numbers)."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


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


def spec_from_dict(raw: Any, source: str = "<memory>") -> FeatureSpec:
    """Validate a parsed YAML document and build the frozen spec."""
    ctx = _Ctx(source)
    if raw is None:
        raise ctx.fail("", "the file is empty")
    if not isinstance(raw, dict):
        raise ctx.fail("", f"top level must be a mapping, got {type(raw).__name__}")
    top = _check_keys(
        ctx,
        "",
        raw,
        ("version", "name", "label", "weight", "group", "tables", "sparse", "dense", "light"),
        ("version", "label", "tables", "sparse"),
    )
    version = _int(ctx, "", top, "version", 1)
    if version != SPEC_VERSION:
        raise ctx.fail(
            "", f"field 'version': this rocketrec reads version {SPEC_VERSION}, got {version}"
        )
    name = _str(ctx, "", top, "name") if "name" in top else Path(source).stem
    label = _column_block(ctx, "label", top["label"])
    weight = _column_block(ctx, "weight", top["weight"]) if top.get("weight") is not None else None
    group = _column_block(ctx, "group", top["group"]) if "group" in top else None
    if group is not None and group in (label, weight):
        raise ctx.fail("group", f"field 'column': '{group}' is the label or weight column")

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
    table_names = [t.name for t in tables]

    names: set[str] = set()

    def _new_name(where: str, obj: dict[str, Any]) -> str:
        fname = _str(ctx, where, obj, "name")
        if fname in names:
            raise ctx.fail(f"feature '{fname}'", "duplicate feature name")
        names.add(fname)
        return fname

    def _where(kind: str, i: int, f: Any) -> str:
        """'feature NAME' when the entry names itself, else 'sparse[i]'."""
        name = f.get("name") if isinstance(f, dict) else None
        return f"feature '{name}'" if isinstance(name, str) and name.strip() else f"{kind}[{i}]"

    sparse: list[SparseFeature] = []
    for i, f in enumerate(_list(ctx, "", top, "sparse")):
        obj = _check_keys(
            ctx,
            _where("sparse", i, f),
            f,
            ("name", "column", "table", "dtype", "kind", "max_ids", "inputs", "boundaries"),
            ("name", "table"),
        )
        fname = _new_name(f"sparse[{i}]", obj)
        where = f"feature '{fname}'"
        tname = _str(ctx, where, obj, "table")
        if tname not in table_names:
            hint = difflib.get_close_matches(tname, table_names, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ctx.fail(where, f"field 'table': no table named '{tname}'{extra}")
        kind = _choice(ctx, where, obj, "kind", SPARSE_KINDS) if "kind" in obj else "scalar"
        rules = {  # key -> kinds that take it
            "column": ("scalar", "list", "bucketize"),
            "dtype": ID_KINDS,
            "max_ids": ("scalar", "list", "cross"),
            "inputs": ("cross",),
            "boundaries": ("bucketize",),
        }
        for key, kinds in rules.items():
            if key in obj and kind not in kinds:
                raise ctx.fail(where, f"field '{key}' does not apply to kind '{kind}'")
        if kind != "cross" and "column" not in obj:
            raise ctx.fail(where, "field 'column' is required")
        inputs: tuple[str, ...] | None = None
        boundaries: tuple[float, ...] | None = None
        if kind == "cross":
            if obj.get("inputs") is None:
                raise ctx.fail(where, "field 'inputs' is required by kind 'cross'")
            raw_inputs = _list(ctx, where, obj, "inputs")
            if len(raw_inputs) < 2 or not all(isinstance(x, str) and x for x in raw_inputs):
                raise ctx.fail(
                    where,
                    f"field 'inputs' must list at least two feature names, got {raw_inputs!r}",
                )
            if len(set(raw_inputs)) != len(raw_inputs):
                raise ctx.fail(where, "field 'inputs' lists a feature twice")
            inputs = tuple(raw_inputs)
        if kind == "bucketize":
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
            trows = next(t.rows for t in tables if t.name == tname)
            if trows < rows_needed:
                raise ctx.fail(
                    where,
                    f"table '{tname}' has {trows} rows; {len(boundaries)} boundaries need at "
                    f"least {rows_needed} (one per bucket plus one for null)",
                )
        sparse.append(
            SparseFeature(
                name=fname,
                column=_str(ctx, where, obj, "column") if kind != "cross" else "",
                table=tname,
                dtype=_choice(ctx, where, obj, "dtype", SPARSE_DTYPES)
                if "dtype" in obj
                else "int64",
                kind=kind,
                max_ids=_int(ctx, where, obj, "max_ids", 1)
                if obj.get("max_ids") is not None
                else None,
                inputs=inputs,
                boundaries=boundaries,
            )
        )
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
    if not sparse:
        raise ctx.fail("", "field 'sparse' must list at least one feature")
    used = {f.table for f in sparse}
    for t in tables:
        if t.name not in used:
            raise ctx.fail(f"table '{t.name}'", "no sparse feature uses this table")

    dense: list[DenseFeature] = []
    for i, f in enumerate(_list(ctx, "", top, "dense")):
        obj = _check_keys(
            ctx,
            _where("dense", i, f),
            f,
            ("name", "column", "fill", "transform", "min", "max", "mean", "std"),
            ("name", "column"),
        )
        fname = _new_name(f"dense[{i}]", obj)
        where = f"feature '{fname}'"
        transform = (
            _choice(ctx, where, obj, "transform", TRANSFORMS) if "transform" in obj else "none"
        )
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
        dense.append(
            DenseFeature(
                name=fname,
                column=_str(ctx, where, obj, "column"),
                fill=_float(ctx, where, obj, "fill") if "fill" in obj else 0.0,
                transform=transform,
                **params,  # type: ignore[arg-type]
            )
        )

    all_names = [f.name for f in sparse] + [f.name for f in dense]
    if top.get("light") is None:
        light = tuple(all_names)
    else:
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
        light = tuple(n for n in all_names if n in set(lf))  # spec order

    return FeatureSpec(
        name=name,
        version=version,
        label_column=label,
        weight_column=weight,
        tables=tuple(tables),
        sparse=tuple(sparse),
        dense=tuple(dense),
        light_features=light,
        source=source,
        group_column=group,
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
