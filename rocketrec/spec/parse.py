"""Parsing feature spec YAML: one parser per section (top, tables, sparse, dense, light).

`load_spec` and `spec_from_dict` are the package's entry points (`rocketrec.spec`);
every user error is a SpecError naming the file, the entry and the field.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from rocketrec.spec.fields import (
    Ctx,
    Names,
    check_keys,
    column_block,
    entry,
    field_choice,
    field_float,
    field_int,
    field_list,
    field_str,
)
from rocketrec.spec.sparse import parse_sparse
from rocketrec.spec.types import (
    POOLINGS,
    SPEC_VERSION,
    TEACHER_KINDS,
    TRANSFORMS,
    DenseFeature,
    FeatureSpec,
    SparseFeature,
    SpecError,
    TableSpec,
    table_name_ok,
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


def _parse_top(ctx: Ctx, raw: Any) -> dict[str, Any]:
    if raw is None:
        raise ctx.fail("", "the file is empty")
    if not isinstance(raw, dict):
        raise ctx.fail("", f"top level must be a mapping, got {type(raw).__name__}")
    top = check_keys(
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
    version = field_int(ctx, "", top, "version", 1)
    if version != SPEC_VERSION:
        raise ctx.fail(
            "", f"field 'version': this rocketrec reads version {SPEC_VERSION}, got {version}"
        )
    return top


def _parse_columns(ctx: Ctx, top: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(label, weight, group) columns."""
    label = column_block(ctx, "label", top["label"])
    weight = column_block(ctx, "weight", top["weight"]) if top.get("weight") is not None else None
    group = column_block(ctx, "group", top["group"]) if "group" in top else None
    if group is not None and group in (label, weight):
        raise ctx.fail("group", f"field 'column': '{group}' is the label or weight column")
    return label, weight, group


def _parse_tables(ctx: Ctx, top: dict[str, Any]) -> list[TableSpec]:
    tables: list[TableSpec] = []
    for i, t in enumerate(field_list(ctx, "", top, "tables")):
        tname0 = t.get("name") if isinstance(t, dict) else None
        where = (
            f"table '{tname0}'" if isinstance(tname0, str) and tname0.strip() else f"tables[{i}]"
        )
        obj = check_keys(ctx, where, t, ("name", "rows", "dim", "pooling"), ("name", "rows", "dim"))
        tname = field_str(ctx, where, obj, "name")
        where = f"table '{tname}'"
        if any(x.name == tname for x in tables):
            raise ctx.fail(where, "duplicate table name")
        if not table_name_ok(tname):
            raise ctx.fail(
                where,
                f"field 'name': '{tname}' cannot name a table (TorchRec keeps tables in a "
                "torch ModuleDict, where it is taken or holds a '.'), e.g. use 'items_table'",
            )
        pooling = field_choice(ctx, where, obj, "pooling", POOLINGS) if "pooling" in obj else "sum"
        dim = field_int(ctx, where, obj, "dim", 1)
        if dim % 4:
            raise ctx.fail(
                where,
                f"field 'dim' must be a multiple of 4 (fbgemm's embedding kernels), got {dim}",
            )
        tables.append(TableSpec(tname, field_int(ctx, where, obj, "rows", 1), dim, pooling))
    if not tables:
        raise ctx.fail("", "field 'tables' must list at least one table")
    return tables


def _parse_teacher(ctx: Ctx, top: dict[str, Any], taken: set[str]) -> tuple[str | None, str]:
    """(column, kind) of the optional logged teacher score."""
    if top.get("teacher") is None:
        return None, "probability"
    obj = check_keys(ctx, "teacher", top["teacher"], ("column", "kind"), ("column",))
    column = field_str(ctx, "teacher", obj, "column")
    kind = (
        field_choice(ctx, "teacher", obj, "kind", TEACHER_KINDS) if "kind" in obj else "probability"
    )
    if column in taken:
        raise ctx.fail(
            "teacher",
            f"field 'column': '{column}' is already the label, weight or a feature's column "
            "(a teacher score is never an input)",
        )
    return column, kind


def _dense_one(ctx: Ctx, i: int, f: Any, names: Names) -> DenseFeature:
    obj, fname, where = entry(
        ctx,
        ("dense", i, f),
        names,
        ("name", "column", "fill", "transform", "min", "max", "mean", "std"),
        ("name", "column"),
    )
    transform = (
        field_choice(ctx, where, obj, "transform", TRANSFORMS) if "transform" in obj else "none"
    )
    params = {k: field_float(ctx, where, obj, k) for k in ("min", "max", "mean", "std") if k in obj}
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
        column=field_str(ctx, where, obj, "column"),
        fill=field_float(ctx, where, obj, "fill") if "fill" in obj else 0.0,
        transform=transform,
        **params,  # type: ignore[arg-type]
    )


def _parse_dense(ctx: Ctx, top: dict[str, Any], names: Names) -> list[DenseFeature]:
    return [_dense_one(ctx, i, f, names) for i, f in enumerate(field_list(ctx, "", top, "dense"))]


def _parse_light(
    ctx: Ctx, top: dict[str, Any], sparse: list[SparseFeature], dense: list[DenseFeature]
) -> tuple[str, ...]:
    all_names = [f.name for f in sparse] + [f.name for f in dense]
    if top.get("light") is None:
        return tuple(all_names)
    lobj = check_keys(ctx, "light", top["light"], ("features",), ("features",))
    lf = field_list(ctx, "light", lobj, "features")
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
    ctx = Ctx(source)
    top = _parse_top(ctx, raw)
    label, weight, group = _parse_columns(ctx, top)
    tables = _parse_tables(ctx, top)
    names = Names(ctx)
    sparse = parse_sparse(ctx, top, tables, names)
    dense = _parse_dense(ctx, top, names)
    taken = {label, weight, group} | {f.column for f in sparse if f.column}
    taken |= {f.column for f in dense}
    teacher_column, teacher_kind = _parse_teacher(ctx, top, {c for c in taken if c})
    return FeatureSpec(
        name=field_str(ctx, "", top, "name") if "name" in top else Path(source).stem,
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
