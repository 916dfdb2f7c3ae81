"""Typed reads of one spec field each, with errors of the form
`file: where: field 'x': problem` (a SpecError)."""

from __future__ import annotations

import difflib
import math
from typing import Any

from rocketrec.spec.types import SpecError


class Ctx:
    """Builds error messages of the form `file: where: field 'x': problem`."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, msg: str) -> SpecError:
        prefix = f"{self.source}: " + (f"{where}: " if where else "")
        return SpecError(prefix + msg)


def check_keys(
    ctx: Ctx, where: str, obj: Any, allowed: tuple[str, ...], required: tuple[str, ...]
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


def field_str(ctx: Ctx, where: str, obj: dict[str, Any], key: str) -> str:
    v = obj[key]
    if not isinstance(v, str) or not v.strip():
        raise ctx.fail(where, f"field '{key}' must be a non-empty string, got {v!r}")
    return v


def field_int(ctx: Ctx, where: str, obj: dict[str, Any], key: str, minimum: int) -> int:
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ctx.fail(where, f"field '{key}' must be an integer, got {v!r}")
    if v < minimum:
        raise ctx.fail(where, f"field '{key}' must be >= {minimum}, got {v}")
    return v


def field_float(ctx: Ctx, where: str, obj: dict[str, Any], key: str) -> float:
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ctx.fail(where, f"field '{key}' must be a finite number, got {v!r}")
    return float(v)


def field_choice(
    ctx: Ctx, where: str, obj: dict[str, Any], key: str, choices: tuple[str, ...]
) -> str:
    v = obj[key]
    if v not in choices:
        raise ctx.fail(where, f"field '{key}' must be one of {', '.join(choices)}, got {v!r}")
    return str(v)


def field_list(ctx: Ctx, where: str, obj: dict[str, Any], key: str) -> list[Any]:
    v = obj.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise ctx.fail(where, f"field '{key}' must be a list, got {type(v).__name__}")
    return v


def column_block(ctx: Ctx, where: str, raw: Any) -> str:
    if isinstance(raw, str):
        raw = {"column": raw}
    obj = check_keys(ctx, where, raw, ("column",), ("column",))
    return field_str(ctx, where, obj, "column")


class Names:
    """Feature names seen so far (sparse and dense share one namespace)."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx, self.seen = ctx, set()  # type: ignore[var-annotated]

    def new(self, where: str, obj: dict[str, Any]) -> str:
        fname = field_str(self.ctx, where, obj, "name")
        if fname in self.seen:
            raise self.ctx.fail(f"feature '{fname}'", "duplicate feature name")
        self.seen.add(fname)
        return fname


def where_of(kind: str, i: int, f: Any) -> str:
    """'feature NAME' when the entry names itself, else 'sparse[i]'."""
    name = f.get("name") if isinstance(f, dict) else None
    return f"feature '{name}'" if isinstance(name, str) and name.strip() else f"{kind}[{i}]"


def entry(
    ctx: Ctx,
    at: tuple[str, int, Any],
    names: Names,
    allowed: tuple[str, ...],
    required: tuple[str, ...],
) -> tuple[dict[str, Any], str, str]:
    """One feature entry `at` = (section, index, raw): (its keys checked, its new name,
    'feature NAME' for messages)."""
    kind, i, f = at
    obj = check_keys(ctx, where_of(kind, i, f), f, allowed, required)
    fname = names.new(f"{kind}[{i}]", obj)
    return obj, fname, f"feature '{fname}'"
