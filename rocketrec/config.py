"""Command-line flags of a training job, shared by `rocketrec train` and jobs/ads_train.py,
and the one place they become a JobConfig (rocketrec.train.job):

    job = parse_job(parser, argv, ray=...)    defaults < --config YAML < flags

Flag groups are the JobConfig's sections (data, method = loss, model, training =
train, Ray = ray); the sections' dataclasses reject bad values with a message
naming the field, and `JobConfig.check(spec)` what needs the spec.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rocketrec.model.loss import HINTS, MODES, LossConfig
from rocketrec.model.model import ModelConfig
from rocketrec.model.towers import ATTENTIONS
from rocketrec.parallel.sharding import SHARDING_TYPES, SPARSE_OPTIMIZERS
from rocketrec.train.job import JobConfig, RayConfig, job_from_values
from rocketrec.train.train_config import TrainConfig


def _sizes(text: str) -> tuple[int, ...]:
    """'256,128,64' -> (256, 128, 64); '' or 'none' -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer sizes, got {text!r}"
        ) from None
    if any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"layer sizes must be >= 1, got {text!r}")
    return out


def _on_off(text: str) -> bool:
    t = text.lower()
    if t in ("on", "true", "1", "yes"):
        return True
    if t in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def sharding_arg(text: str) -> dict[str, dict[str, str]]:
    """'items=row_wise,users=table_wise' or a JSON object {table: {sharding_type: ...}}."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--sharding: bad JSON: {e}") from None
        if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
            raise argparse.ArgumentTypeError(
                "--sharding JSON must map table -> {sharding_type: ...}"
            )
        return obj
    out: dict[str, dict[str, str]] = {}
    for part in text.split(","):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"--sharding: expected table=type, got {part!r}")
        table, st = (x.strip() for x in part.split("=", 1))
        if st not in SHARDING_TYPES:
            raise argparse.ArgumentTypeError(
                f"--sharding: {table}: sharding type must be one of {', '.join(SHARDING_TYPES)}"
            )
        out[table] = {"sharding_type": st}
    return out


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every flag of a training job but Ray's (see `add_ray_args`)."""
    from rocketrec.run_config import add_config_arg

    add_config_arg(p)
    _data_args(p)
    _method_args(p)
    _model_args(p)
    _run_args(_train_args(p))


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--spec", required=True, help="feature spec YAML (see feature_specs/README.md)")
    g.add_argument(
        "--train",
        required=True,
        nargs="+",
        help="training Parquet: one or more files, directories (Hive partitions such as "
        "logs/date=2026-11-26/ too) or globs",
    )
    g.add_argument(
        "--val", default=None, nargs="+", help="validation Parquet, as --train (metrics per tower)"
    )
    g.add_argument("--out", required=True, help="run directory: metrics, checkpoints, export, plot")
    g.add_argument(
        "--no-export", action="store_true", help="do not export light.pt at the end of the run"
    )


def _method_args(p: argparse.ArgumentParser) -> None:
    d_l = LossConfig()
    g = p.add_argument_group("method (Rocket Launching)")
    g.add_argument(
        "--mode",
        choices=MODES,
        default=d_l.mode,
        help="rocket: booster and light together; booster_only / light_only: one tower; "
        "teacher_student: booster first, then the light tower against it",
    )
    g.add_argument(
        "--hint",
        choices=HINTS,
        default=d_l.hint,
        help="hint loss: mimic = MSE of logits (the paper), mse_prob = MSE of "
        "probabilities, kd = tempered BCE x T^2",
    )
    g.add_argument(
        "--hint-weight",
        "--lambda",
        dest="hint_weight",
        type=float,
        default=d_l.hint_weight,
        help="lambda, the hint loss weight",
    )
    g.add_argument("--temperature", type=float, default=d_l.temperature, help="T for --hint kd")
    g.add_argument(
        "--gradient-block",
        type=_on_off,
        default=d_l.gradient_block,
        help="on: the hint never reaches booster parameters (default on)",
    )
    g.add_argument(
        "--light-shared-grad-scale",
        type=float,
        default=d_l.light_shared_grad_scale,
        help="scale in [0,1] on the light losses' gradient into the shared tables "
        "(1 = the paper, 0 = light reads detached embeddings)",
    )
    g.add_argument(
        "--teacher-lambda",
        type=float,
        default=d_l.teacher_lambda,
        help="weight of the hint towards the spec's logged teacher score (teacher: in the "
        "spec), in every mode; 0 = off",
    )
    g.add_argument(
        "--teacher-booster",
        type=_on_off,
        default=d_l.teacher_booster,
        help="on: the booster also distils from the logged teacher (default off)",
    )


def _model_args(p: argparse.ArgumentParser) -> None:
    d_m = ModelConfig()
    g = p.add_argument_group("model")
    g.add_argument("--booster-mlp", type=_sizes, default=d_m.booster_mlp, help="e.g. 256,128,64")
    g.add_argument("--cross-layers", type=int, default=d_m.cross_layers, help="DCN-v2 cross layers")
    g.add_argument(
        "--cross-rank", type=int, default=d_m.cross_rank, help="low rank of each cross layer"
    )
    g.add_argument("--light-mlp", type=_sizes, default=d_m.light_mlp, help="e.g. 32")
    g.add_argument(
        "--light-private-dim",
        type=int,
        default=d_m.light_private_dim,
        help="dim of a light-only embedding part beside the shared tables (0 = none)",
    )
    g.add_argument(
        "--attention",
        choices=ATTENTIONS,
        default=d_m.attention,
        help="how the booster reads a behaviour sequence: softmax = DIN's activation unit "
        "with a masked softmax, din = its raw weights, mean = mean pooling",
    )
    g.add_argument(
        "--attention-mlp",
        type=_sizes,
        default=d_m.attention_mlp,
        help="hidden sizes of the attention's activation unit, e.g. 32",
    )
    g.add_argument(
        "--shared-bottom",
        type=_sizes,
        default=d_m.shared_bottom,
        help="optional dense MLP shared by both towers, e.g. 64,32",
    )


def _train_args(p: argparse.ArgumentParser) -> Any:
    d_t = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d_t.epochs)
    g.add_argument(
        "--max-steps", type=int, default=d_t.max_steps, help="cap per phase (0 = epochs)"
    )
    g.add_argument("--batch-size", type=int, default=d_t.batch_size, help="per worker")
    g.add_argument("--dense-optimizer", choices=("adam", "adagrad"), default=d_t.dense_optimizer)
    g.add_argument("--dense-lr", type=float, default=d_t.dense_lr, help="towers' learning rate")
    g.add_argument(
        "--sparse-optimizer",
        choices=SPARSE_OPTIMIZERS,
        default=d_t.sparse_optimizer,
        help="fused optimizer of the tables",
    )
    g.add_argument("--sparse-lr", type=float, default=d_t.sparse_lr, help="tables' learning rate")
    g.add_argument("--warmup-steps", type=int, default=d_t.warmup_steps)
    g.add_argument("--grad-clip", type=float, default=d_t.grad_clip, help="0 = off")
    g.add_argument("--eval-every", type=int, default=d_t.eval_every, help="steps; 0 = at the end")
    g.add_argument("--eval-batches", type=int, default=d_t.eval_batches, help="0 = all")
    g.add_argument(
        "--checkpoint-every", type=int, default=d_t.checkpoint_every, help="steps; 0 = at the end"
    )
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=d_t.keep_checkpoints,
        help="finished checkpoints kept in RUN/checkpoints (the newest ones)",
    )
    g.add_argument(
        "--shuffle-buffer",
        type=int,
        default=d_t.shuffle_buffer,
        help="rows shuffled together across row groups before batching (0 = off)",
    )
    g.add_argument(
        "--negative-sample-rate",
        type=float,
        default=d_t.negative_sample_rate,
        help="train on every click and this share of non-clicks (0 < r <= 1); evaluation "
        "and the exported model correct the probabilities for it",
    )
    g.add_argument(
        "--step-path",
        choices=("pipeline", "plain"),
        default=d_t.step_path,
        help="pipeline: TorchRec's TrainPipelineSparseDist (one path for CPU and CUDA); "
        "plain: forward/backward/step in order",
    )
    return g


def _run_args(g: Any) -> None:
    """More of the `training` group: logging, seeds, sharding, resume and warm start."""
    d_t = TrainConfig()
    g.add_argument("--log-every", type=int, default=d_t.log_every)
    g.add_argument("--seed", type=int, default=d_t.seed)
    g.add_argument(
        "--sharding",
        type=sharding_arg,
        default={},
        help="per-table constraints: 'table=row_wise,other=table_wise' or JSON (others: "
        "the planner's choice, never data_parallel; table_wise on one worker)",
    )
    g.add_argument("--resume", default=None, help="continue from this run or checkpoint directory")
    g.add_argument(
        "--init-from",
        default=None,
        help="start a new run from another run's weights (tables by name; grown tables keep "
        "their rows; towers where shapes match)",
    )
    g.add_argument(
        "--init-from-allow-shrink",
        action="store_true",
        help="with --init-from: allow tables with fewer rows (keep the first) or another dim (fresh)",
    )
    g.add_argument(
        "--no-tensorboard",
        action="store_true",
        help="do not write TensorBoard event files under RUN/tb/ (written by default)",
    )
    g.add_argument(
        "--mlflow-uri",
        default=None,
        help="also log metrics, the config and the exported model to MLflow (e.g. "
        "file:///shared/mlruns or http://mlflow:5000); needs the mlflow package",
    )
    g.add_argument(
        "--teacher-column",
        default=None,
        help="experiments: probability column used as soft label by --mode perfect_teacher",
    )


def add_ray_args(p: argparse.ArgumentParser) -> None:
    d = RayConfig()
    g = p.add_argument_group("Ray")
    g.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers (ranks)")
    g.add_argument(
        "--cpus-per-worker",
        type=float,
        default=d.cpus_per_worker,
        help="fractional CPUs leave room for Ray's own tasks on small machines",
    )
    g.add_argument(
        "--gpus-per-worker", type=float, default=d.gpus_per_worker, help="1 on GPU nodes (nccl)"
    )
    g.add_argument(
        "--max-failures",
        type=int,
        default=d.max_failures,
        help="restarts of the worker group from the last registered checkpoint",
    )
    g.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else local)")
    g.add_argument("--local-cpus", type=int, default=None, help="CPUs of the embedded local Ray")
    g.add_argument(
        "--verbose", action="store_true", help="keep Ray's and the libraries' own log lines"
    )


def _abs(v: str) -> str:
    return v if "://" in v else str(Path(v).resolve())


def parse_job(p: argparse.ArgumentParser, argv: list[str] | None, ray: bool) -> JobConfig:
    """Defaults < `--config` YAML (or RUN/config.yaml on --resume) < flags -> JobConfig.
    Paths become absolute (workers may start elsewhere). Raises ValueError (ConfigError)
    naming the file, key or flag; argparse exits 2 on a bad flag."""
    from rocketrec.run_config import apply_config, run_meta

    argv = list(sys.argv[1:] if argv is None else argv)
    apply_config(p, argv)
    a = vars(p.parse_args(argv))
    a["train"] = [_abs(v) for v in a["train"]]
    a["val"] = [_abs(v) for v in a["val"]] if a["val"] else None
    for k in ("spec", "out", "resume", "init_from"):
        if a.get(k):
            a[k] = _abs(a[k])
    return job_from_values(a, ray=ray, run=run_meta(argv))
