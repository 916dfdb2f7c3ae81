"""`rocketrec` commands on trained models: export, predict, requests, evaluate, compare."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rocketrec.errors import UserError

# -- serving: export, predict, requests -------------------------------------------------


def _cmd_export(a: argparse.Namespace) -> int:
    from rocketrec.serving.export import export_checkpoint

    t = time.time()
    rep = export_checkpoint(
        a.checkpoint,
        a.out,
        int8=a.int8,
        data=a.data,
        rows=a.rows,
        booster=a.booster,
        portable=a.portable,
        fmt=a.format,
    )
    kind = ("int8" if rep["int8"] else "fp32") + (
        ", portable" if rep["portable"] else ", fused op: needs librocketrec_ops.so"
    )
    if rep["format"] == "aoti":
        kind += f", AOTInductor package compiled in {rep['compile_seconds']:.0f}s"
    print(
        f"exported {rep['out']} ({rep['bytes']:,} bytes, {kind}): "
        f"parity max |diff| {rep['max_abs_diff']:.3g} <= {rep['tolerance']:g} on "
        f"{rep['rows_checked']} held-out rows; {time.time() - t:.1f}s"
    )
    return 0


def _cmd_publish(a: argparse.Namespace) -> int:
    from rocketrec.run.publish import publish_run

    rec = publish_run(
        a.run,
        a.data if len(a.data) > 1 else a.data[0],
        max_ne_regression=a.max_ne_regression,
        keep=a.keep_published,
        fmt=a.format,
        rows=a.rows,
    )
    if a.json:
        print(json.dumps(rec))
    return 0 if rec["published"] else 1


def _load_model(path: str):  # type: ignore[no-untyped-def]
    from rocketrec.serving.manifest import read_manifest
    from rocketrec.serving.ops import load_model

    try:
        return load_model(path), read_manifest(path)
    except UserError:
        raise  # already names the file and says what is wrong
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise UserError(f"{path}: cannot load the model: {msg[0] if msg else e}") from None


def _cmd_predict(a: argparse.Namespace) -> int:
    from pathlib import Path

    from rocketrec.serving.requests import score_lines

    model, manifest = _load_model(a.model)
    src = a.requests
    if src != "-" and not Path(src).is_file():
        raise UserError(f"{src}: no such file")
    name = "<stdin>" if src == "-" else src
    raw = sys.stdin.buffer.read() if src == "-" else Path(src).read_bytes()
    lines = []
    for ln, b in enumerate(raw.split(b"\n"), 1):
        try:
            lines.append(b.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{name}:{ln}: not valid UTF-8 ({e.reason})") from None
    for x in score_lines(model, lines, manifest, name):
        print(f"{x:.9g}")
    return 0


def _cmd_requests(a: argparse.Namespace) -> int:
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rocketrec.data.reader import list_parquet_files
    from rocketrec.serving import requests as rq

    if a.rows < 1:
        raise UserError(f"--rows must be >= 1, got {a.rows}")
    if a.candidates is not None and a.candidates < 1:
        raise UserError(f"--candidates must be >= 1, got {a.candidates}")
    _, manifest = _load_model(a.model)
    fs, files = list_parquet_files(a.data)
    inputs = manifest["sparse_features"] + manifest["dense_features"]
    cols = sorted({f["column"] for f in inputs})
    tables = []
    n = 0
    for f in files:  # row groups in order, across files, until --rows rows
        pf = pq.ParquetFile(fs.open_input_file(f))
        for rg in range(pf.metadata.num_row_groups):
            if n >= a.rows:
                break
            t = pf.read_row_group(rg, columns=cols).slice(0, a.rows - n)
            for i, field in enumerate(t.schema):  # dictionary strings: their values (as
                if pa.types.is_dictionary(field.type):  # the reader does), so files can mix
                    t = t.set_column(i, field.name, t.column(i).cast(field.type.value_type))
            tables.append(t)
            n += t.num_rows
        if n >= a.rows:
            break
    try:
        table = pa.concat_tables(tables, promote_options="permissive") if tables else None
    except (pa.ArrowTypeError, pa.ArrowInvalid) as e:  # pyarrow's message names the column
        raise UserError(f"{a.data}: its files' columns cannot be read together: {e}") from None
    if table is None or table.num_rows == 0:
        raise UserError(f"{a.data}: no rows")
    if a.candidates:
        context = a.context.split(",") if a.context else rq.default_context(manifest)
        lines, full = rq.candidate_requests_from_table(table, manifest, a.candidates, context)
        print(
            f"rocketrec: context inputs: {', '.join(context)}; {len(lines)} request(s) of up to "
            f"{a.candidates} candidates",
            file=sys.stderr,
        )
        if a.full_rows:
            Path(a.full_rows).write_text("\n".join(full) + "\n")
    else:
        lines = rq.requests_from_table(table, manifest)
    text = "\n".join(lines) + "\n"
    if a.out == "-":
        print(text, end="")
    else:
        Path(a.out).write_text(text)
        print(f"wrote {len(lines)} requests to {a.out}")
    if n < a.rows:
        print(
            f"rocketrec: note: {a.data} holds only {n} rows: used {n} of the {a.rows} asked for",
            file=sys.stderr,
        )
    return 0


# -- offline evaluation -----------------------------------------------------------------


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from rocketrec.evaluation import evaluate_model, format_report, reliability_plot

    if a.rows is not None and a.rows < 1:
        raise UserError(f"--rows must be >= 1, got {a.rows}")
    if a.exact_rows < 1:
        raise UserError(f"--exact-rows must be >= 1, got {a.exact_rows}")
    rep = evaluate_model(
        a.model, a.data, a.spec, a.group, a.rows, quiet=a.quiet, exact_rows=a.exact_rows
    )
    print(format_report(rep))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=1, default=str))
        png = Path(a.plot) if a.plot else out.with_suffix(".png")
        reliability_plot(rep, png)
        print(f"wrote {out} and {png}")
    elif a.plot:
        reliability_plot(rep, a.plot)
        print(f"wrote {a.plot}")
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from rocketrec.evaluation import compare_runs, format_comparison

    rows = compare_runs(a.runs, a.data, a.rows, quiet=a.quiet)
    print(json.dumps(rows, indent=1, default=str) if a.json else format_comparison(rows))
    return 0


def add_eval_commands(sub: Any) -> None:
    e = sub.add_parser(
        "evaluate",
        help="score an exported light.pt or a run/checkpoint on Parquet logs (AUC, GAUC, "
        "logloss, NE, calibration, reliability by decile)",
    )
    e.add_argument("model", help="exported light.pt, or a run directory / checkpoint")
    e.add_argument("--data", nargs="+", required=True, help="Parquet files, directories or globs")
    e.add_argument(
        "--spec", default=None, help="spec for the data's columns (default: the model's)"
    )
    e.add_argument("--group", default=None, help="group column for GAUC (default: the spec's)")
    e.add_argument("--rows", type=int, default=None, help="evaluate the first N rows only")
    e.add_argument("--out", default=None, help="report JSON (and a reliability PNG beside it)")
    e.add_argument("--plot", default=None, help="reliability diagram PNG")
    e.add_argument("--quiet", action="store_true", help="no progress lines")
    from rocketrec.evaluation.offline import EXACT_ROWS

    e.add_argument(
        "--exact-rows",
        type=int,
        default=EXACT_ROWS,
        help="exact metrics up to this many rows; beyond, bounded histograms (no GAUC) "
        f"(default {EXACT_ROWS:,})",
    )
    e.set_defaults(fn=_cmd_evaluate)
    c = sub.add_parser("compare", help="runs side by side (settings, speed, per-tower metrics)")
    c.add_argument("runs", nargs="+", help="run directories (the first is the baseline)")
    c.add_argument(
        "--data", nargs="+", default=None, help="evaluate every run on these rows (same rows)"
    )
    c.add_argument("--rows", type=int, default=None, help="with --data: the first N rows only")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.add_argument("--quiet", action="store_true", help="no progress lines")
    c.set_defaults(fn=_cmd_compare)


def add_serving_commands(sub: Any) -> None:
    e = sub.add_parser(
        "export", help="export the light tower (TorchScript or AOTInductor) for C++ serving"
    )
    e.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    e.add_argument("--out", required=True, help="output file, e.g. light.pt (light.pt2: aoti)")
    e.add_argument(
        "--format",
        choices=("torchscript", "aoti"),
        default="torchscript",
        help="torchscript (default): a TorchScript file, loaded by torch::jit::load; aoti: an "
        "AOTInductor package (.pt2) compiled ahead of time (needs a C++ compiler; tens of "
        "seconds), loaded by AOTIModelPackageLoader (deploy/README.md)",
    )
    e.add_argument("--int8", action="store_true", help="row-wise int8 tables")
    e.add_argument("--data", default=None, help="Parquet for the parity check (default: synthetic)")
    e.add_argument("--rows", type=int, default=2048, help="held-out rows for the parity check")
    e.add_argument(
        "--portable",
        action="store_true",
        help="plain torch ops only (no rocketrec op library needed by the server; slower)",
    )
    e.add_argument(
        "--booster",
        action="store_true",
        help="package the booster instead (all features; for latency comparisons only)",
    )
    e.set_defaults(fn=_cmd_export)
    u = sub.add_parser(
        "publish",
        help="export a run's newest checkpoint to RUN/published/<step>/ and publish it (the "
        "LATEST pointer) if it passes the parity gate and its NE on --data is no worse than "
        "the published model's",
    )
    u.add_argument("run", help="run directory")
    u.add_argument("--data", nargs="+", required=True, help="the newest traffic (Parquet)")
    u.add_argument(
        "--max-ne-regression",
        type=float,
        default=0.01,
        help="refuse a model whose NE on --data is worse than the published one's by more "
        "than this (relative; default 0.01 = 1%%)",
    )
    u.add_argument("--keep-published", type=int, default=3, help="candidates kept on disk")
    u.add_argument("--format", choices=("torchscript", "aoti"), default="torchscript")
    u.add_argument("--rows", type=int, default=None, help="evaluate on the first N rows only")
    u.add_argument("--json", action="store_true", help="print the attempt's record as JSON")
    u.set_defaults(fn=_cmd_publish)
    p = sub.add_parser(
        "predict",
        help="score JSON-lines requests (one-row or context+candidates) with an exported model",
    )
    p.add_argument("--model", required=True, help="exported .pt or .pt2 file")
    p.add_argument("--requests", required=True, help="JSON-lines file, or - for stdin")
    p.set_defaults(fn=_cmd_predict)
    r = sub.add_parser("requests", help="write JSON-lines requests for a model from Parquet rows")
    r.add_argument(
        "--model", required=True, help="exported .pt or .pt2 file (its manifest names the inputs)"
    )
    r.add_argument("--data", required=True, help="Parquet file, directory or glob")
    r.add_argument("--rows", type=int, default=16, help="how many rows")
    r.add_argument(
        "--candidates",
        type=int,
        default=None,
        help="write context+candidates requests: rows in groups of N, one context each",
    )
    r.add_argument(
        "--context",
        default=None,
        help="with --candidates: comma-separated inputs given in the context (from the "
        "group's first row; default: the inputs whose name mentions 'user', else the first input)",
    )
    r.add_argument(
        "--full-rows",
        default=None,
        help="with --candidates: also write the equivalent one-row requests to this file",
    )
    r.add_argument("--out", default="-", help="output file, or - for stdout")
    r.set_defaults(fn=_cmd_requests)
