"""JSON-lines requests: the Python twin of deploy/cpp's parser (same forms, same errors).

One request per line, in one of three forms (features named as in the manifest's
`sparse_features` and `dense_features`):

    {"user_id": 42, "user_interests": [3, 17], "advertiser_id": "adv:9", "ad_price": 12.5}
    {"sparse": {"user_id": 42, "advertiser_id": "adv:9"}, "dense": [12.5, null]}
    {"context": {...}, "candidates": [{...}, {...}]}      one context against N ads

A missing sparse feature is an empty bag (null, [] and null list elements are no
ids, as in training data), a missing (or null) number is NaN (the model's fill). In the candidates form every feature is given either in the context
or in the candidates, never in both. Limits (as in deploy/cpp's `Limits`):
MAX_LINE_BYTES per line, MAX_DEPTH of nesting, MAX_CANDIDATES per request,
MAX_IDS_PER_BAG.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from rocketrec.data.batch import decode_inputs
from rocketrec.data.schema import DataError
from rocketrec.spec import FeatureSpec
from rocketrec.spec.hashing import fnv1a64

MAX_LINE_BYTES = 1 << 20  # 1 MiB
MAX_DEPTH = 32
MAX_CANDIDATES = 100_000
MAX_IDS_PER_BAG = 100_000


@dataclass
class Row:
    bags: list[list[int]]
    dense: list[float]


@dataclass
class Candidates:
    context: Row
    candidates: list[Row] = field(default_factory=list)


class Inputs:
    """The model's inputs, from its manifest."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.sparse = [(f["name"], f.get("dtype", "int64")) for f in manifest["sparse_features"]]
        self.dense = [f["name"] for f in manifest["dense_features"]]
        self.sparse_index = {n: i for i, (n, _) in enumerate(self.sparse)}
        self.dense_index = {n: i for i, n in enumerate(self.dense)}

    def all_names(self) -> str:
        return ", ".join([n for n, _ in self.sparse] + self.dense)


def _depth(obj: Any) -> int:
    depth, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict | list):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in (o.values() if isinstance(o, dict) else o))
    return depth


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DataError(f"duplicate key '{k}'")
        out[k] = v
    return out


def _num(v: Any, name: str, pre: str = "") -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise DataError(f"{pre}dense feature '{name}' expects a number, got {v!r}")
    try:
        x = float(v)
    except OverflowError:
        x = float("inf")
    with np.errstate(over="ignore"):
        finite = bool(np.isfinite(np.float32(x)))  # as C++ casts: round to float32
    if not finite:
        raise DataError(f"{pre}dense feature '{name}': {v!r:.40} is not a finite float32")
    return x


def _no_constants(token: str) -> float:
    raise DataError(f"bad JSON: {token} is not a JSON number")


def parse_row(obj: Any, inp: Inputs, where: str = "") -> Row:
    """One request object (named or sparse/dense form) -> Row."""
    pre = f"{where}: " if where else ""
    if not isinstance(obj, dict):
        raise DataError(f"{pre}a request must be a JSON object")
    bags: list[list[int]] = [[] for _ in inp.sparse]
    dense = [float("nan")] * len(inp.dense)
    items = dict(obj)
    positional = False  # the numbers were given by position ('dense')
    if "sparse" in items or "dense" in items and isinstance(items.get("dense"), list):
        sp = items.pop("sparse", {})
        dv = items.pop("dense", None)
        if items:
            raise DataError(f"{pre}unexpected key '{sorted(items)[0]}' beside 'sparse'/'dense'")
        if not isinstance(sp, dict):
            raise DataError(f"{pre}'sparse' must be an object")
        if dv is not None:
            if not isinstance(dv, list) or len(dv) != len(inp.dense):
                got = len(dv) if isinstance(dv, list) else type(dv).__name__
                raise DataError(
                    f"{pre}'dense' must be a list of {len(inp.dense)} numbers "
                    f"({', '.join(inp.dense)}), got {got}"
                )
            for i, v in enumerate(dv):  # null = missing -> the feature's fill
                dense[i] = float("nan") if v is None else _num(v, inp.dense[i], pre)
            positional = True
        items = sp
    for k, v in items.items():
        if k in inp.sparse_index:
            i = inp.sparse_index[k]
            dtype = inp.sparse[i][1]
            for x in [] if v is None else v if isinstance(v, list) else [v]:
                if x is None:  # a null list element is no id (as in training data)
                    continue
                if dtype == "string":
                    if not isinstance(x, str):
                        raise DataError(f"{pre}feature '{k}' expects string ids, got {x!r}")
                    bags[i].append(fnv1a64(x))
                else:
                    if isinstance(x, bool) or not isinstance(x, int):
                        raise DataError(f"{pre}feature '{k}' expects int64 ids, got {x!r}")
                    if not -(1 << 63) <= x < (1 << 63):
                        raise DataError(f"{pre}feature '{k}': id {x} does not fit int64")
                    bags[i].append(x)
            if len(bags[i]) > MAX_IDS_PER_BAG:
                raise DataError(f"{pre}feature '{k}': more than {MAX_IDS_PER_BAG} ids")
        elif k in inp.dense_index:
            if positional:  # one value would silently win over the other
                raise DataError(f"{pre}'{k}' is given in 'sparse' and in 'dense': give it once")
            dense[inp.dense_index[k]] = float("nan") if v is None else _num(v, k, pre)
        else:
            raise DataError(f"{pre}unknown feature '{k}' (the model reads: {inp.all_names()})")
    return Row(bags, dense)


def parse_line(line: str, inp: Inputs) -> Row | Candidates:
    """One JSON line -> Row or Candidates. Raises DataError (no file/line prefix)."""
    if len(line.encode("utf-8")) > MAX_LINE_BYTES:
        raise DataError(f"line longer than {MAX_LINE_BYTES} bytes")
    try:
        obj = json.loads(line, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as e:
        raise DataError(f"bad JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(f"bad JSON: nesting deeper than {MAX_DEPTH}") from None
    if _depth(obj) > MAX_DEPTH:
        raise DataError(f"bad JSON: nesting deeper than {MAX_DEPTH}")
    if isinstance(obj, dict) and ("context" in obj or "candidates" in obj):
        extra = sorted(set(obj) - {"context", "candidates"})
        if extra:
            raise DataError(f"unexpected key '{extra[0]}' beside 'context'/'candidates'")
        cands = obj.get("candidates")
        if not isinstance(cands, list) or not cands:
            raise DataError("'candidates' must be a non-empty list of requests")
        if len(cands) > MAX_CANDIDATES:
            raise DataError(f"more than {MAX_CANDIDATES} candidates")
        ctx = parse_row(obj.get("context", {}), inp, "context")
        rows = [parse_row(c, inp, f"candidate {j}") for j, c in enumerate(cands)]
        for j, r in enumerate(rows):
            for i, (name, _) in enumerate(inp.sparse):
                if ctx.bags[i] and r.bags[i]:
                    raise DataError(
                        f"feature '{name}' is given in the context and in candidate {j}"
                    )
            for i, name in enumerate(inp.dense):
                if not np.isnan(ctx.dense[i]) and not np.isnan(r.dense[i]):
                    raise DataError(
                        f"feature '{name}' is given in the context and in candidate {j}"
                    )
        return Candidates(ctx, rows)
    return parse_row(obj, inp)


def tensors(rows: list[Row], inp: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows -> (values, lengths [I*B] input-major, dense [B, C])."""
    values: list[int] = []
    lengths: list[int] = []
    for i in range(len(inp.sparse)):
        for r in rows:
            values.extend(r.bags[i])
            lengths.append(len(r.bags[i]))
    dense = torch.tensor([r.dense for r in rows], dtype=torch.float32).reshape(
        len(rows), len(inp.dense)
    )
    return (
        torch.tensor(values, dtype=torch.int64),
        torch.tensor(lengths, dtype=torch.int64),
        dense,
    )


def _parsed(lines: list[str], inp: Inputs, source: str) -> Iterator[tuple[int, Row | Candidates]]:
    """(line number, request) of every non-blank line; errors name the line."""
    for ln, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield ln, parse_line(line, inp)
        except DataError as e:
            raise DataError(f"{source}:{ln}: {e}") from None


def parse_requests(lines: list[str], manifest: dict[str, Any], source: str = "<requests>"):
    """One-row JSON lines -> (values, lengths, dense) of the batch. Errors name the line."""
    inp = Inputs(manifest)
    rows: list[Row] = []
    for ln, r in _parsed(lines, inp, source):
        if isinstance(r, Candidates):
            raise DataError(f"{source}:{ln}: a context+candidates request (use score_lines)")
        rows.append(r)
    if not rows:
        raise DataError(f"{source}: no requests")
    return tensors(rows, inp)


def score_lines(
    model: Any, lines: list[str], manifest: dict[str, Any], source: str = "<requests>"
) -> list[float]:
    """Score JSON lines of any form, in order: consecutive one-row requests in one batch,
    each context+candidates request with `score_candidates`."""
    inp = Inputs(manifest)
    out: list[float] = []
    batch: list[Row] = []

    def call(fn: Any, *args: torch.Tensor) -> list[float]:
        with torch.no_grad():
            try:
                return fn(*args).tolist()
            except Exception as e:  # the module's own input checks
                raise DataError(str(e).strip().splitlines()[-1]) from None

    def flush() -> None:
        if batch:
            out.extend(call(model, *tensors(batch, inp)))
            batch.clear()

    for _, r in _parsed(lines, inp, source):
        if isinstance(r, Row):
            batch.append(r)
            continue
        flush()
        if not hasattr(model, "score_candidates"):
            raise DataError(
                "this model file has no score_candidates entry point (exported by an older "
                "rocketrec): send one-row requests or export it again"
            )
        out.extend(call(model.score_candidates, *tensors([r.context, *r.candidates], inp)))
    flush()
    if not out:
        raise DataError(f"{source}: no requests")
    return out


# -- from Parquet rows --------------------------------------------------------------


def raw_inputs_from_table(
    table: pa.Table, spec: FeatureSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arrow rows -> the served module's raw inputs (values, lengths, dense), as a serving
    client sends them: the same decoding as training (rocketrec.data.batch)."""
    from rocketrec.model.preprocess import Preprocess

    pre = Preprocess(spec, spec.light_features)
    numeric = [spec.feature(n) for n in pre.numeric_inputs]
    dense, ids = decode_inputs(table, pre.id_inputs, numeric, "<request>")  # type: ignore[arg-type]
    values = [v for v, _ in ids]
    lengths = [np.diff(o) for _, o in ids]
    return (
        torch.from_numpy(
            np.concatenate(values).astype(np.int64) if values else np.zeros(0, np.int64)
        ),
        torch.from_numpy(
            np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
        ),
        torch.from_numpy(np.ascontiguousarray(dense)),
    )


def _request_dicts(table: pa.Table, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    feats = manifest["sparse_features"] + manifest["dense_features"]

    def clean(v: Any) -> Any:  # NaN = missing: JSON null (NaN is not JSON)
        return None if isinstance(v, float) and v != v else v

    return [{f["name"]: clean(row.get(f["column"])) for f in feats} for row in table.to_pylist()]


def requests_from_table(table: pa.Table, manifest: dict[str, Any]) -> list[str]:
    """Parquet rows -> one-row JSON-lines requests in the named form."""
    return [json.dumps(r) for r in _request_dicts(table, manifest)]


def default_context(manifest: dict[str, Any]) -> list[str]:
    """Inputs put in the context by default: those whose name mentions 'user' (none: the first input)."""
    names = [f["name"] for f in manifest["sparse_features"] + manifest["dense_features"]]
    return [n for n in names if "user" in n.lower()] or names[:1]


def candidate_requests_from_table(
    table: pa.Table, manifest: dict[str, Any], n: int, context: list[str]
) -> tuple[list[str], list[str]]:
    """Rows in groups of n -> (context+candidates lines, the equivalent one-row lines).

    Each group's context takes the `context` inputs of its first row; each candidate the
    other inputs of its own row. The one-row lines are the merged rows that the
    candidates lines score (for comparisons)."""
    names = {f["name"] for f in manifest["sparse_features"] + manifest["dense_features"]}
    unknown = [c for c in context if c not in names]
    if unknown:
        raise DataError(
            f"--context: unknown input '{unknown[0]}' (inputs: {', '.join(sorted(names))})"
        )
    rows = _request_dicts(table, manifest)
    grouped, full = [], []
    for g in range(0, len(rows), n):
        group = rows[g : g + n]
        ctx = {k: v for k, v in group[0].items() if k in context}
        cands = [{k: v for k, v in r.items() if k not in context} for r in group]
        grouped.append(json.dumps({"context": ctx, "candidates": cands}))
        full += [json.dumps({**ctx, **c}) for c in cands]
    return grouped, full
