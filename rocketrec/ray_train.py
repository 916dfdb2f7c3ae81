"""Ray driver: run rocketrec.train.loop on N Ray Train workers, then export and plot.

    python jobs/ads_train.py --spec S --train T --val V --out RUN --workers 2

Under `ray job submit` the script joins that cluster (RAY_ADDRESS is set by the
job supervisor). Run directly with no cluster, it starts an embedded local Ray
bound to 127.0.0.1 only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray
port on loopback; Ray's token authentication stays on).

Workers run `train_loop_per_worker`, which calls the plain training loop (no
Ray inside it) with a `report` hook: every checkpoint the loop writes (DCP,
all ranks) is registered with `ray.train.report`, so `FailureConfig`
restarts a failed worker group from the last *registered* checkpoint, with
every rank's reader position. `--out` must be storage that every worker sees
(one machine, or a shared file system).

The run directory ends up with metrics.jsonl, checkpoints/, light.pt (the
exported light tower, unless --no-export), curves.png and summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# Heavy imports (torchrec, fbgemm) happen inside the functions: a Ray worker unpickles
# `train_loop_per_worker` by importing this module, before its logging is quieted.


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (the process group is already initialised)."""
    from rocketrec.quiet import quiet_library_noise

    quiet_library_noise()  # before torchrec/fbgemm are imported in this worker
    import ray.train

    from rocketrec.config import configs_from_args
    from rocketrec.spec import spec_from_dict
    from rocketrec.train.checkpoint import (
        latest_checkpoint,
        log_user_error,
        read_meta,
        verify_checkpoint,
    )
    from rocketrec.train.loop import TrainingDiverged, train

    quiet_library_noise()
    import torch.distributed as dist

    args = argparse.Namespace(**config["args"])
    model_cfg, loss_cfg, train_cfg = configs_from_args(args)
    spec = spec_from_dict(config["spec"], source=config["spec_source"])
    resume = args.resume
    # A restarted worker group continues from the newest complete checkpoint of this run:
    # the last one Ray registered, or a newer one this run finished writing before the
    # failure (checkpoints are atomic, and run_id tells this run's from another's).
    candidates = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        ref = _checkpoint_of_reference(Path(registered.path))
        if ref is not None and verify_checkpoint(ref) is None:  # else the newest intact one
            candidates.append(ref)
    own = latest_checkpoint(args.out)
    if own is not None and read_meta(own).get("run_id") == config["run_id"]:
        candidates.append(own)
    if candidates:
        best = max(candidates, key=lambda c: int(read_meta(c)["step"]))
        resume = str(best)
        print(
            f"[rocketrec] restarting from checkpoint {resume} (step {read_meta(best)['step']})",
            flush=True,
        )

    def report(metrics: dict[str, Any], path: Path | None) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
        rank = dist.get_rank() if dist.is_initialized() else 0
        if not (path and rank == 0):
            ray.train.report(clean, checkpoint=None)
            return
        # Ray copies what it is given into its storage: give it a reference to the
        # checkpoint (a few bytes), not the DCP shards, so the run holds them once.
        with tempfile.TemporaryDirectory(prefix="rocketrec-ref-") as tmp:
            (Path(tmp) / REF_FILE).write_text(json.dumps({"checkpoint": str(path)}))
            ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    marker = Path(args.out) / USER_ERROR_FILE
    if marker.is_file():  # a user error stopped an earlier attempt: no retry (main says why)
        return
    try:
        train(
            spec,
            args.train,
            args.val,
            args.out,
            model_cfg,
            loss_cfg,
            train_cfg,
            resume=resume,
            report=report,
            run_id=config["run_id"],
            run_config=config.get("run_config"),
        )
    except (ValueError, FileNotFoundError, TrainingDiverged) as e:
        # A user error (bad data, a damaged checkpoint, divergence) fails the same way on
        # every retry: record it for the driver (one line, exit 2; the traceback in
        # RUN/train.log) and fail this attempt; the restarted group sees the record and
        # returns at once instead of training again.
        rank = dist.get_rank() if dist.is_initialized() else 0
        log_user_error(args.out, e)
        tmp = marker.with_name(f".{marker.name}.{rank}")
        what = "training diverged: " if isinstance(e, TrainingDiverged) else ""
        first = str(e).splitlines()[0] if str(e) else repr(e)
        tmp.write_text(json.dumps({"error": what + first}))
        os.replace(tmp, marker)
        raise


REF_FILE = "rocketrec_checkpoint.json"
USER_ERROR_FILE = ".user_error.json"  # RUN/: a worker's user error, for the driver


def _checkpoint_of_reference(registered: Path) -> Path | None:
    """The rocketrec checkpoint a Ray-registered reference names, if it is still there."""
    from rocketrec.train.checkpoint import latest_checkpoint

    ref = registered / REF_FILE
    if not ref.is_file():
        return latest_checkpoint(registered)  # a full checkpoint (older runs)
    target = Path(json.loads(ref.read_text())["checkpoint"])
    return target if (target / "meta.json").is_file() else None


def _init_ray(address: str | None, num_cpus: int | None, verbose: bool = False) -> bool:
    """Connect to a cluster, or start a loopback-only local Ray. Returns True if local.

    Unless verbose, the job's Ray processes log at ERROR: library chatter (Ray Train's
    placement-group monitor, fbgemm's "Successfully loaded" lines) stays out of the job
    log; rocketrec's own progress lines are prints and always come through."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging_config = None if verbose else ray.LoggingConfig(log_level="ERROR")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_config=logging_config)
        return False
    # Embedded local Ray: never expose it beyond this machine (see main()).
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=num_cpus,
        log_to_driver=True,
        logging_config=logging_config,
    )
    return True


def plot_curves(metrics_path: Path, out_png: Path) -> bool:
    """Validation AUC (and grouped AUC), logloss and normalized entropy of both towers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    ev = [r for r in rows if "base_logloss" in r]
    if not ev:
        return False
    ev.sort(key=lambda r: r["step"])
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    steps = [r["step"] for r in ev]
    for tower, color in (("booster", "tab:red"), ("light", "tab:blue")):
        if f"{tower}_auc" not in ev[0]:
            continue  # not trained in this mode
        ax[0].plot(steps, [r[f"{tower}_auc"] for r in ev], "o-", color=color, label=f"{tower} auc")
        if f"{tower}_gauc" in ev[0]:
            ax[0].plot(
                steps, [r[f"{tower}_gauc"] for r in ev], "s--", color=color, label=f"{tower} gauc"
            )
        ax[1].plot(steps, [r[f"{tower}_logloss"] for r in ev], "o-", color=color, label=tower)
        ax[2].plot(
            steps, [r.get(f"{tower}_ne", float("nan")) for r in ev], "o-", color=color, label=tower
        )
    ax[1].plot(steps, [r["base_logloss"] for r in ev], "--", color="gray", label="base rate")
    ax[2].axhline(1.0, ls="--", color="gray", label="base rate")
    ax[0].set_title("validation AUC" + (" / GAUC" if "light_gauc" in ev[0] else ""))
    ax[1].set_title("validation logloss")
    ax[2].set_title("normalized entropy (logloss / base)")
    for a in ax:
        a.set_xlabel("step")
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    from rocketrec.config import add_train_args

    p = argparse.ArgumentParser(
        prog="ads_train.py",
        description="Train a rocketrec booster + light model on Ray (a cluster under `ray job "
        "submit`, or an embedded loopback-only local Ray), then export the light tower.",
    )
    add_train_args(p)
    g = p.add_argument_group("Ray")
    g.add_argument("--workers", type=int, default=2, help="Ray Train workers (ranks)")
    g.add_argument(
        "--cpus-per-worker",
        type=float,
        default=0.5,
        help="fractional CPUs leave room for Ray's own tasks on small machines",
    )
    g.add_argument("--gpus-per-worker", type=float, default=0.0, help="1 on GPU nodes (nccl)")
    g.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="restarts of the worker group from the last registered checkpoint",
    )
    g.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else local)")
    g.add_argument("--local-cpus", type=int, default=None, help="CPUs of the embedded local Ray")
    g.add_argument("--no-export", action="store_true", help="skip exporting light.pt at the end")
    g.add_argument(
        "--verbose", action="store_true", help="keep Ray's and the libraries' own log lines"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from rocketrec.config import configs_from_args
    from rocketrec.quiet import quiet_library_noise

    quiet_library_noise()
    p = build_parser()
    from rocketrec.run_config import apply_config, resolved_config, write_resolved

    try:
        apply_config(p, argv)
    except ValueError as e:
        print(f"ads_train.py: error: {e}", file=sys.stderr)
        return 2
    a = p.parse_args(argv)
    from rocketrec.data.batch import DataError
    from rocketrec.spec import SpecError, load_spec

    try:
        spec = load_spec(a.spec)
        model_cfg, loss_cfg, train_cfg = configs_from_args(a)  # bad values: before any worker
        if not a.no_export:
            from rocketrec.serving.module import check_exportable

            check_exportable(spec, model_cfg, loss_cfg.mode)  # not after the run
        if a.resume:
            from rocketrec.train.checkpoint import latest_checkpoint as _latest
            from rocketrec.train.checkpoint import read_meta as _read_meta
            from rocketrec.train.loop import check_resume_compatible

            ck = _latest(a.resume)
            if ck is None:
                raise FileNotFoundError(f"--resume {a.resume}: no complete checkpoint found there")
            check_resume_compatible(_read_meta(ck), spec, model_cfg, loss_cfg, train_cfg, str(ck))
        if a.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {a.workers}")
        from rocketrec.data.reader import ParquetReader

        probe = ParquetReader(a.train, spec, a.batch_size, shuffle=False)
        if probe.total_rows // a.workers < a.batch_size:
            raise ValueError(
                f"{' '.join(a.train)}: {probe.total_rows:,} rows for {a.workers} workers: every "
                f"worker needs at least one batch of --batch-size {a.batch_size} rows"
            )
        probe.close()
        if a.val:
            ParquetReader(a.val, spec, a.batch_size, shuffle=False)
    except (SpecError, DataError, ValueError, FileNotFoundError) as e:
        print(f"ads_train.py: error: {e}", file=sys.stderr)
        return 2

    out = Path(a.out).resolve()
    from rocketrec.train.checkpoint import latest_checkpoint

    if latest_checkpoint(out, verify=False) is not None and not a.resume:
        print(
            f"ads_train.py: error: {out} already holds a run's checkpoints: pass --resume {a.out} "
            "to continue it, or choose a new --out",
            file=sys.stderr,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)

    def _abs(v: str) -> str:
        return v if "://" in v else str(Path(v).resolve())

    a.train = [_abs(v) for v in a.train]
    a.val = [_abs(v) for v in a.val] if a.val else None
    for k in ("spec", "out", "resume", "init_from"):
        v = getattr(a, k)
        if v:
            setattr(a, k, _abs(v))
    run_config = resolved_config(p, a, list(sys.argv[1:] if argv is None else argv))
    write_resolved(out / "config.yaml", run_config)  # resume checks passed above

    if not (a.address or os.environ.get("RAY_ADDRESS")):
        # Must be set before `import ray`: Ray reads it at import time. With it, an
        # embedded local Ray binds every port to 127.0.0.1 only.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    local = _init_ray(a.address, a.local_cpus, a.verbose)
    print(
        f"[rocketrec] Ray {'local (127.0.0.1 only)' if local else 'cluster'}: "
        f"{ray.cluster_resources()}",
        flush=True,
    )
    use_gpu = a.gpus_per_worker > 0
    # a worker group the cluster can never hold would wait for resources forever: refuse
    have = ray.cluster_resources()
    for res, per in (("CPU", a.cpus_per_worker), ("GPU", a.gpus_per_worker)):
        if per > 0 and a.workers * per > have.get(res, 0) + 1e-9:
            print(
                f"ads_train.py: error: --workers {a.workers} x {per:g} {res} per worker needs "
                f"{a.workers * per:g} {res}, the Ray cluster has {have.get(res, 0):g}: use fewer "
                f"workers, a smaller --{res.lower()}s-per-worker, or a bigger cluster",
                file=sys.stderr,
            )
            if local:
                ray.shutdown()
            return 2
    resources = {"CPU": a.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = a.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "args": vars(a),
            "spec": spec.to_dict(),
            "spec_source": str(a.spec),
            "run_id": uuid.uuid4().hex,
            "run_config": run_config,
        },
        scaling_config=ScalingConfig(
            num_workers=a.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name="rocketrec",
            storage_path=str(out / "ray_results"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=a.max_failures),
        ),
    )
    t0 = time.time()
    marker = out / USER_ERROR_FILE
    marker.unlink(missing_ok=True)
    result = trainer.fit()
    if marker.is_file():  # a user error in a worker: one line, exit 2, never retried
        err = json.loads(marker.read_text())["error"]
        marker.unlink()
        print(f"ads_train.py: error: {err} (traceback: {out}/train.log)", file=sys.stderr)
        if local:
            ray.shutdown()
        return 2
    if result.error is not None:
        print(f"ads_train.py: training failed: {result.error}", file=sys.stderr)
        return 1
    train_s = time.time() - t0
    summary: dict[str, Any] = {
        "train_wall_seconds": train_s,
        "workers": a.workers,
        "metrics": result.metrics,
    }
    if plot_curves(out / "metrics.jsonl", out / "curves.png"):
        summary["plot"] = str(out / "curves.png")
    if not a.no_export and a.mode == "booster_only":
        print(
            "[rocketrec] no export: --mode booster_only trains no light tower (the served one); "
            "`rocketrec export --booster` packages the booster for comparisons",
            flush=True,
        )
    elif not a.no_export:
        if not a.verbose:
            quiet_library_noise()  # Ray Train configured the driver's logging again
        from rocketrec.serving.export import export_checkpoint

        rep = export_checkpoint(out, out / "light.pt", data=a.val)
        summary["export"] = rep
        print(
            f"[rocketrec] exported {rep['out']}: parity max |diff| {rep['max_abs_diff']:.3g}",
            flush=True,
        )
        from rocketrec.train.tracking import log_model_artifact

        log_model_artifact(out, a.mlflow_uri, out / "light.pt")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"[rocketrec] done in {train_s:.1f}s: {out}", flush=True)
    if local:
        ray.shutdown()
    return 0
