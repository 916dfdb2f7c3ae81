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
from typing import Any

from rocketrec.cli.models import add_eval_commands, add_serving_commands
from rocketrec.errors import UserError
from rocketrec.quiet import quiet_library_noise
from rocketrec.spec import load_spec


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
    from rocketrec.data.synth import SynthConfig, SynthReport, synth

    spec = load_spec(a.spec)
    if not a.teacher_noise >= 0:
        raise UserError(f"--teacher-noise must be >= 0, got {a.teacher_noise}")
    cfg = SynthConfig(
        rows=a.rows,
        seed=a.seed,
        world_seed=a.world_seed,
        files=a.files,
        row_group_size=a.row_group_size,
        ctr=a.ctr,
        label_noise=a.label_noise,
        true_ctr_column=a.true_ctr_column,
        teacher_noise=a.teacher_noise,
        partitions=a.partitions,
        first_partition=a.first_partition,
        drift=a.drift,
    )
    t = time.time()
    report = SynthReport()
    paths = synth(spec, a.out, cfg, progress=not a.quiet, report=report)
    dt = time.time() - t
    parts = f" in {a.partitions} partition(s)" if a.partitions else ""
    total = a.rows * max(a.partitions, 1)
    print(f"wrote {total:,} rows to {len(paths)} file(s){parts} under {a.out} in {dt:.1f}s")
    for line in report.lines():  # Bayes AUC (and without the sequences), teacher AUC
        print(line)
    return 0


def _cmd_train(job: Any) -> int:
    """`rocketrec train`: the same job as jobs/ads_train.py, in this process (no Ray)."""
    from rocketrec.run.prepare import finish_run, prepare_run
    from rocketrec.run.run_dir import log_user_error
    from rocketrec.train.loop import train_job
    from rocketrec.train.task import TrainingDiverged

    spec, job = prepare_run(job)  # every check, then RUN/config.yaml
    t0 = time.time()
    try:
        from rocketrec.run.publish import publisher

        res = train_job(
            job, spec, publish=publisher(job.train.max_ne_regression, job.train.keep_published)
        )
    except UserError as e:
        # user errors (bad data mid-run, damaged checkpoints, divergence): one line on the
        # console (main), the traceback in RUN/train.log
        log_user_error(job.data.out, e)
        what = "training diverged: " if isinstance(e, TrainingDiverged) else ""
        raise UserError(f"{what}{e} (traceback: {job.data.out}/train.log)") from None
    finish_run(job, res, time.time() - t0, say=lambda m: print(m, flush=True))
    print(json.dumps(res, default=str))  # the last line: the final metrics
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

    from rocketrec.model.model import RocketModel
    from rocketrec.model.towers import ModelConfig
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


def _add_validate(sub: Any) -> None:
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


def _add_synth(sub: Any) -> None:
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
    s.add_argument(
        "--teacher-noise",
        type=float,
        default=1.0,
        help="the spec's teacher column: true logit + N(0, s^2) (0 = a perfect teacher)",
    )
    s.add_argument(
        "--partitions",
        type=int,
        default=0,
        help="near-line logs: N partition directories OUT/hour=KKKK/ of --rows rows each, "
        "each with _SUCCESS written last (0: files directly under OUT)",
    )
    s.add_argument(
        "--first-partition",
        type=int,
        default=0,
        help="the index K of the first partition written (write them one at a time)",
    )
    s.add_argument(
        "--drift",
        type=float,
        default=0.0,
        help="with --partitions: the click model moves this many radians per partition "
        "towards a second hidden world (e.g. 0.05; 0: a fixed world)",
    )
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_synth)


def _add_plan(sub: Any) -> None:
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
    from rocketrec.parallel.sharding import SPARSE_OPTIMIZERS, sharding_arg
    from rocketrec.run.flags import flag_type

    pl.add_argument("--sharding", type=flag_type(sharding_arg), default={}, help="as for training")
    pl.add_argument("--sparse-optimizer", choices=SPARSE_OPTIMIZERS, default="rowwise_adagrad")
    pl.add_argument("--light-private-dim", type=int, default=0, help="as for training")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(fn=_cmd_plan)


TRAIN_HELP = "train in this process (no Ray; see jobs/ads_train.py)"


def _train_parser(t: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `train` command's flags (generated from the settings: rocketrec.run.flags)."""
    from rocketrec.run.flags import add_train_args

    t = t or argparse.ArgumentParser(prog="rocketrec train", description=TRAIN_HELP)
    add_train_args(t)
    t.set_defaults(fn=_cmd_train)
    return t


def build_parser() -> argparse.ArgumentParser:
    from rocketrec import __version__

    p = argparse.ArgumentParser(prog="rocketrec", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"rocketrec {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    _add_validate(sub)
    _add_synth(sub)
    _add_plan(sub)
    _train_parser(sub.add_parser("train", help=TRAIN_HELP))

    add_serving_commands(sub)
    add_eval_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    quiet_library_noise()
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "train":  # one JobConfig: defaults < --config < flags
            from rocketrec.run.flags import parse_job

            return _cmd_train(parse_job(_train_parser(), args[1:], ray=False))
        a = parser.parse_args(args)
        return int(a.fn(a) or 0)
    except UserError as e:  # the input's fault: one line; anything else is a traceback
        print(f"rocketrec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rocketrec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rocketrec predict ... | head`: the reader has what it wanted
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141


if __name__ == "__main__":
    sys.exit(main())
