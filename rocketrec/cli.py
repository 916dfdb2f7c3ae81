"""`rocketrec` console command: synth, validate, train, export, predict, evaluate, compare.

User errors (bad spec, bad data, bad flags, missing files) print one line,
`rocketrec: error: ...`, and exit 2; no traceback. Bugs still raise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rocketrec.data.batch import DataError
from rocketrec.quiet import quiet_library_noise
from rocketrec.spec import SpecError, load_spec


class UserError(Exception):
    pass


def _cmd_validate(a: argparse.Namespace) -> int:
    spec = load_spec(a.spec)
    n_light = len(spec.light_features)
    print(
        f"ok: {spec.source}: spec '{spec.name}': {len(spec.tables)} tables, {len(spec.sparse)} sparse "
        f"and {len(spec.dense)} dense features; light tower reads {n_light} of "
        f"{len(spec.sparse) + len(spec.dense)}"
    )
    if a.data:
        from rocketrec.data.reader import ParquetReader

        reader = ParquetReader(a.data, spec, batch_size=65536, shuffle=False, drop_last=False)
        print(
            f"ok: {' '.join(a.data)}: {len(reader.files)} file(s), {len(reader.units)} row "
            f"group(s), {reader.total_rows:,} rows; every column present with a usable type"
        )
        if reader.schema_notes:  # accepted differences between files, in one line
            print(
                f"ok: {len(reader.schema_notes)} column(s) differ in type across files and are "
                f"read as one type: {'; '.join(reader.schema_notes)}"
            )
        # decode every row (or --max-rows): bad values (labels, nulls, inf) name their file
        limit = reader.total_rows if a.max_rows is None else min(a.max_rows, reader.total_rows)
        done, t0, last = 0, time.time(), time.time()
        for batch in reader:
            done += len(batch)
            if time.time() - last > 5:
                rate = done / max(time.time() - t0, 1e-9)
                print(f"  decoded {done:,} / {limit:,} rows ({rate:,.0f} rows/s)", flush=True)
                last = time.time()
            if done >= limit:
                break
        print(f"ok: {min(done, limit):,} rows decode (labels 0/1, no bad values)")
    return 0


def _cmd_synth(a: argparse.Namespace) -> int:
    from rocketrec.data.synth import SynthConfig, synth

    spec = load_spec(a.spec)
    cfg = SynthConfig(
        rows=a.rows,
        seed=a.seed,
        world_seed=a.world_seed,
        files=a.files,
        row_group_size=a.row_group_size,
        ctr=a.ctr,
        label_noise=a.label_noise,
        true_ctr_column=a.true_ctr_column,
    )
    t = time.time()
    paths = synth(spec, a.out, cfg, progress=not a.quiet)
    dt = time.time() - t
    print(f"wrote {a.rows:,} rows to {len(paths)} file(s) under {a.out} in {dt:.1f}s")
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from rocketrec.config import configs_from_args
    from rocketrec.run_config import resolved_config
    from rocketrec.serving.module import check_exportable
    from rocketrec.train.checkpoint import latest_checkpoint, log_user_error
    from rocketrec.train.loop import TrainingDiverged, train

    spec = load_spec(a.spec)
    model_cfg, loss_cfg, train_cfg = configs_from_args(a)
    check_exportable(spec, model_cfg, loss_cfg.mode)  # never a run that cannot be served
    if latest_checkpoint(a.out, verify=False) is not None and not a.resume:
        raise UserError(
            f"{a.out} already holds a run's checkpoints: pass --resume {a.out} to continue it, "
            "or choose a new --out"
        )
    cfg = resolved_config(a._parser, a, getattr(a, "_argv", None))
    try:
        res = train(
            spec,
            a.train,
            a.val,
            a.out,
            model_cfg,
            loss_cfg,
            train_cfg,
            resume=a.resume,
            run_config=cfg,
        )
    except (ValueError, FileNotFoundError, TrainingDiverged) as e:
        # user errors (bad data mid-run, damaged checkpoints, divergence): one line on the
        # console (main), the traceback in RUN/train.log
        log_user_error(a.out, e)
        what = "training diverged: " if isinstance(e, TrainingDiverged) else ""
        raise UserError(f"{what}{e} (traceback: {a.out}/train.log)") from None
    print(json.dumps({k: v for k, v in res.items()}, default=str))
    return 0


def _shards_text(shards: tuple) -> str:
    sizes = sorted({sz for _, _, sz in shards})
    ranks = sorted({r for r, _, _ in shards})
    rtxt = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {','.join(map(str, ranks))}"
    if len(ranks) > 6:
        rtxt = f"{len(ranks)} ranks ({ranks[0]}..{ranks[-1]})"
    each = ", ".join(f"{r:,} x {c}" for r, c in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
    return f"{len(shards)} shard(s) on {rtxt}: {each}"


def _cmd_plan(a: argparse.Namespace) -> int:
    import torch

    from rocketrec.model.model import ModelConfig, RocketModel
    from rocketrec.parallel.sharding import (
        describe_plan,
        memory_per_rank,
        plan_tables,
        worker_memory_bytes,
    )

    spec = load_spec(a.spec)
    if a.workers < 1:
        raise UserError(f"--workers must be >= 1, got {a.workers}")
    if a.memory_per_worker is not None:
        mem = int(a.memory_per_worker * 1e9)
    elif a.device == "cpu":
        import os

        os.environ.setdefault("LOCAL_WORLD_SIZE", str(a.workers))
        mem = worker_memory_bytes(torch.device("cpu"))
    else:
        raise UserError("--device cuda needs --memory-per-worker GB (e.g. 80 for an H100)")
    model = RocketModel(
        spec, ModelConfig(light_private_dim=a.light_private_dim), table_device=torch.device("meta")
    )
    plan = plan_tables(model, a.workers, a.device, mem, a.sparse_optimizer, 0.1, a.sharding or None)
    shards = describe_plan(plan, model)
    per = memory_per_rank(shards, a.workers, a.sparse_optimizer)
    if a.json:
        print(
            json.dumps(
                {
                    "workers": a.workers,
                    "device": a.device,
                    "memory_per_worker": mem,
                    "tables": [vars(t) for t in shards],
                    "per_rank": per,
                },
                default=list,
            )
        )
        return 0
    print(
        f"plan: spec '{spec.name}' on {a.workers} {a.device} worker(s) with "
        f"{mem / 1e9:.2f} GB each (the planner keeps 15% for everything but tables)"
    )
    print(f"{'table':<22} {'rows x dim':>22} {'sharding':<18} {'kernel':<8} shards")
    for t in sorted(shards, key=lambda t: -t.rows * t.dim):
        dims = f"{t.rows:,} x {t.dim}"
        print(
            f"{t.table:<22} {dims:>22} {t.sharding_type:<18} {t.compute_kernel:<8} "
            f"{_shards_text(t.shards)}"
        )
    where = "GPU" if a.device == "cuda" else "RAM"
    print(
        f"{'rank':>5} {'weights GB':>11} {'optimizer GB':>13} {where + ' GB':>9} "
        f"{'host (UVM) GB':>14}"
    )
    rows = [
        tuple(round(m[k] / 1e9, 3) for k in ("weights", "optimizer", "device", "host")) for m in per
    ]  # consecutive ranks with the same figures share a line
    r = 0
    while r < len(rows):
        e = r
        while e + 1 < len(rows) and rows[e + 1] == rows[r]:
            e += 1
        w, o, d, h = rows[r]
        label = str(r) if e == r else f"{r}-{e}"
        print(f"{label:>5} {w:>11.3f} {o:>13.3f} {d:>9.3f} {h:>14.3f}")
        r = e + 1
    worst = max(m["device"] for m in per)
    host = max(m["host"] for m in per)
    uvm = f"; UVM tables keep {host / 1e9:.3f} GB per worker in host memory" if host else ""
    print(
        f"fits: the fullest worker needs {worst / 1e9:.3f} GB of {where} for tables of "
        f"{mem / 1e9:.2f} GB ({100 * worst / mem:.1f}%){uvm}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rocketrec import __version__

    p = argparse.ArgumentParser(prog="rocketrec", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"rocketrec {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="check a feature spec (and data against it)")
    v.add_argument("spec", help="feature spec YAML")
    v.add_argument(
        "--data",
        nargs="+",
        help="Parquet files, directories (Hive partitions too) or globs to check against the spec",
    )
    v.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="decode at most this many rows (default: every row of every file)",
    )
    v.set_defaults(fn=_cmd_validate)

    s = sub.add_parser("synth", help="write synthetic ad logs for a spec")
    s.add_argument("--spec", required=True, help="feature spec YAML")
    s.add_argument("--rows", type=int, required=True, help="number of rows")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--seed", type=int, default=0, help="which rows are drawn")
    s.add_argument(
        "--world-seed",
        type=int,
        default=0,
        help="the hidden ground truth (keep equal for train and validation)",
    )
    s.add_argument("--files", type=int, default=1, help="number of Parquet files")
    s.add_argument("--row-group-size", type=int, default=65536, help="rows per row group")
    s.add_argument("--ctr", type=float, default=0.05, help="target click rate")
    s.add_argument("--label-noise", type=float, default=0.0, help="fraction of labels flipped")
    s.add_argument(
        "--true-ctr-column",
        default=None,
        help="also write the true click probability in this column (never a feature)",
    )
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_synth)

    pl = sub.add_parser(
        "plan",
        help="dry-run the table sharding planner for N workers (no devices needed)",
        description="Prints each table's sharding type and shards, the memory per worker "
        "(weights and optimizer state) and whether the plan fits. Training uses the same "
        "planner settings, capped at the workers' real memory.",
    )
    pl.add_argument("spec", help="feature spec YAML")
    pl.add_argument("--workers", type=int, required=True, help="number of workers (ranks)")
    pl.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    pl.add_argument(
        "--memory-per-worker",
        type=float,
        default=None,
        help="GB per worker (default on cpu: this machine's RAM / workers; needed for cuda)",
    )
    from rocketrec.config import _sharding
    from rocketrec.parallel.sharding import SPARSE_OPTIMIZERS

    pl.add_argument("--sharding", type=_sharding, default={}, help="as for training")
    pl.add_argument("--sparse-optimizer", choices=SPARSE_OPTIMIZERS, default="rowwise_adagrad")
    pl.add_argument("--light-private-dim", type=int, default=0, help="as for training")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(fn=_cmd_plan)

    t = sub.add_parser("train", help="train in this process (no Ray; see jobs/ads_train.py)")
    from rocketrec.config import add_train_args

    add_train_args(t)
    t.set_defaults(fn=_cmd_train, _parser=t)

    add_serving_commands(sub)
    add_eval_commands(sub)
    return p


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
    )
    kind = ("int8" if rep["int8"] else "fp32") + (
        ", portable" if rep["portable"] else ", fused op: needs librocketrec_ops.so"
    )
    print(
        f"exported {rep['out']} ({rep['bytes']:,} bytes, {kind}): "
        f"parity max |diff| {rep['max_abs_diff']:.3g} <= {rep['tolerance']:g} on "
        f"{rep['rows_checked']} held-out rows; {time.time() - t:.1f}s"
    )
    return 0


def _load_model(path: str):  # type: ignore[no-untyped-def]
    from rocketrec.serving.manifest import read_manifest
    from rocketrec.serving.ops import load_model

    try:
        return load_model(path), read_manifest(path)
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
            tables.append(t)
            n += t.num_rows
        if n >= a.rows:
            break
    import pyarrow as pa

    table = pa.concat_tables(tables, promote_options="permissive") if tables else None
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
    from rocketrec.evaluate import evaluate_model, format_report, reliability_plot

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
    from rocketrec.evaluate import compare_runs, format_comparison

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
    e.add_argument(
        "--exact-rows",
        type=int,
        default=5_000_000,
        help="exact metrics up to this many rows; beyond, bounded histograms (no GAUC)",
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
    e = sub.add_parser("export", help="export the light tower to TorchScript for C++ serving")
    e.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    e.add_argument("--out", required=True, help="output file, e.g. light.pt")
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
    p = sub.add_parser(
        "predict",
        help="score JSON-lines requests (one-row or context+candidates) with an exported model",
    )
    p.add_argument("--model", required=True, help="exported .pt file")
    p.add_argument("--requests", required=True, help="JSON-lines file, or - for stdin")
    p.set_defaults(fn=_cmd_predict)
    r = sub.add_parser("requests", help="write JSON-lines requests for a model from Parquet rows")
    r.add_argument(
        "--model", required=True, help="exported .pt file (its manifest names the inputs)"
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
        "group's first row; default: the inputs whose name mentions 'user')",
    )
    r.add_argument(
        "--full-rows",
        default=None,
        help="with --candidates: also write the equivalent one-row requests to this file",
    )
    r.add_argument("--out", default="-", help="output file, or - for stdout")
    r.set_defaults(fn=_cmd_requests)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_library_noise()
    parser = build_parser()
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        if args and args[0] == "train":
            from rocketrec.run_config import apply_config

            sub = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr,index]
            apply_config(sub, args[1:])
    except ValueError as e:
        print(f"rocketrec: error: {e}", file=sys.stderr)
        return 2
    a = parser.parse_args(argv)
    a._argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(a.fn(a) or 0)
    except (SpecError, DataError, UserError, FileNotFoundError) as e:
        print(f"rocketrec: error: {e}", file=sys.stderr)
        return 2
    except (
        ValueError
    ) as e:  # config checks, plans that do not fit (__post_init__) and other bad values
        print(f"rocketrec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rocketrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
