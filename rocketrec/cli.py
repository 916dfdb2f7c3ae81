"""`rocketrec` console command: synth, validate, train, export, predict.

User errors (bad spec, bad data, bad flags, missing files) print one line,
`rocketrec: error: ...`, and exit 2; no traceback. Bugs still raise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from rocketrec.data.batch import DataError
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

        reader = ParquetReader(a.data, spec, batch_size=4096, shuffle=False)
        # decode the first batch too: catches bad values (labels, NaN), not only types
        first = next(iter(reader), None)
        print(
            f"ok: {a.data}: {len(reader.files)} file(s), {len(reader.units)} row group(s), "
            f"{reader.total_rows:,} rows; every column present with a usable type"
            + (f"; first batch of {len(first):,} rows decodes" if first is not None else "")
        )
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
    from rocketrec.train.loop import train

    spec = load_spec(a.spec)
    model_cfg, loss_cfg, train_cfg = configs_from_args(a)
    res = train(spec, a.train, a.val, a.out, model_cfg, loss_cfg, train_cfg, resume=a.resume)
    print(json.dumps({k: v for k, v in res.items()}, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rocketrec import __version__

    p = argparse.ArgumentParser(prog="rocketrec", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"rocketrec {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="check a feature spec (and data against it)")
    v.add_argument("spec", help="feature spec YAML")
    v.add_argument("--data", help="Parquet file, directory or glob to check against the spec")
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

    t = sub.add_parser("train", help="train in this process (no Ray; see jobs/ads_train.py)")
    from rocketrec.config import add_train_args

    add_train_args(t)
    t.set_defaults(fn=_cmd_train)

    from rocketrec.export import add_export_commands

    add_export_commands(sub)
    return p


def quiet_library_noise() -> None:
    """Hide third-party deprecation chatter so progress and errors stay readable."""
    import logging
    import warnings

    for mod in ("torch", "torchrec", "fbgemm_gpu", "ray"):
        warnings.filterwarnings("ignore", module=mod)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    for name in ("fbgemm_gpu", "torchrec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_library_noise()
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return int(a.fn(a) or 0)
    except (SpecError, DataError, UserError, FileNotFoundError) as e:
        print(f"rocketrec: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # config checks (__post_init__) and other bad values
        print(f"rocketrec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rocketrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
