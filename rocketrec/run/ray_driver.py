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

The driver parses one JobConfig (rocketrec.run.flags), runs every start-up check
and writes RUN/config.yaml once (rocketrec.run.prepare.prepare_run) before Ray starts;
workers receive the job's serialized form. The run directory ends up as
`rocketrec train` leaves it (rocketrec.run.prepare.finish_run): metrics.jsonl,
checkpoints/, light.pt (the exported light tower, unless --no-export),
curves.png and summary.json.
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

from rocketrec.errors import UserError
from rocketrec.run.run_dir import RunDir

# Heavy imports (torchrec, fbgemm) happen inside the functions: a Ray worker unpickles
# `train_loop_per_worker` by importing this module, before its logging is quieted.


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (the process group is already initialised)."""
    from rocketrec.quiet import quiet_library_noise

    quiet_library_noise()  # before torchrec/fbgemm are imported in this worker
    import ray.train
    import torch.distributed as dist

    from rocketrec.run.run_dir import log_user_error
    from rocketrec.spec import spec_from_dict
    from rocketrec.train.job import JobConfig
    from rocketrec.train.loop import train_job
    from rocketrec.train.task import TrainingDiverged

    job = JobConfig.from_dict(config["job"])  # the driver's job, serialized
    spec = spec_from_dict(config["spec"], source=job.data.spec)
    out = Path(job.data.out)
    resume = _restart_point(job, config["run_id"])

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

    marker = out / USER_ERROR_FILE
    if marker.is_file():  # a user error stopped an earlier attempt: no retry (main says why)
        return
    try:
        from rocketrec.run.publish import publisher

        publish = publisher(job.train.max_ne_regression, job.train.keep_published)
        train_job(job, spec, resume=resume, report=report, run_id=config["run_id"], publish=publish)
    except UserError as e:
        # A user error (bad data, a damaged checkpoint, divergence) fails the same way on
        # every retry: record it for the driver (one line, exit 2; the traceback in
        # RUN/train.log) and fail this attempt; the restarted group sees the record and
        # returns at once instead of training again.
        rank = dist.get_rank() if dist.is_initialized() else 0
        log_user_error(out, e)
        tmp = marker.with_name(f".{marker.name}.{rank}")
        what = "training diverged: " if isinstance(e, TrainingDiverged) else ""
        first = str(e).splitlines()[0] if str(e) else repr(e)
        tmp.write_text(json.dumps({"error": what + first}))
        os.replace(tmp, marker)
        raise


def _restart_point(job: Any, run_id: str) -> str | None:
    """A restarted worker group continues from the newest complete checkpoint of this run:
    the last one Ray registered, or a newer one this run finished writing before the
    failure (checkpoints are atomic, and run_id tells this run's from another's)."""
    import ray.train

    from rocketrec.checkpoint.files import latest_checkpoint, read_meta, verify_checkpoint

    candidates = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        ref = _checkpoint_of_reference(Path(registered.path))
        if ref is not None and verify_checkpoint(ref) is None:  # else the newest intact one
            candidates.append(ref)
    own = latest_checkpoint(job.data.out, verify=False)
    if own is not None and read_meta(own).get("run_id") == run_id:
        own = latest_checkpoint(job.data.out)  # this run's own: the newest intact one
        if own is not None and read_meta(own).get("run_id") == run_id:
            candidates.append(own)
    if not candidates:
        return job.resume  # type: ignore[no-any-return]  # verified by the driver
    best = max(candidates, key=lambda c: int(read_meta(c)["step"]))
    print(
        f"[rocketrec] restarting from checkpoint {best} (step {read_meta(best)['step']})",
        flush=True,
    )
    return str(best)


REF_FILE = "rocketrec_checkpoint.json"
USER_ERROR_FILE = ".user_error.json"  # RUN/: a worker's user error, for the driver


def _checkpoint_of_reference(registered: Path) -> Path | None:
    """The rocketrec checkpoint a Ray-registered reference names, if it is still there."""
    from rocketrec.checkpoint.files import latest_checkpoint

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
    # Embedded local Ray: never expose it beyond this machine (see main()). address="local"
    # starts a new one even when a `ray start` cluster runs here (without it, ray.init
    # joins that cluster as a driver, with its CPUs, while we print "local").
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=num_cpus,
        log_to_driver=True,
        logging_config=logging_config,
    )
    return True


def build_parser() -> argparse.ArgumentParser:
    from rocketrec.run.flags import add_ray_args, add_train_args

    p = argparse.ArgumentParser(
        prog="ads_train.py",
        description="Train a rocketrec booster + light model on Ray (a cluster under `ray job "
        "submit`, or an embedded loopback-only local Ray), then export the light tower.",
    )
    add_train_args(p)
    add_ray_args(p)
    return p


def _error(msg: str) -> int:
    print(f"ads_train.py: error: {msg}", file=sys.stderr)
    return 2


def _cluster_cannot_hold(job: Any) -> str | None:
    """A worker group the cluster can never hold would wait for resources forever."""
    import ray

    have, r = ray.cluster_resources(), job.ray
    for res, per in (("CPU", r.cpus_per_worker), ("GPU", r.gpus_per_worker)):
        if per > 0 and r.workers * per > have.get(res, 0) + 1e-9:
            return (
                f"--workers {r.workers} x {per:g} {res} per worker needs {r.workers * per:g} "
                f"{res}, the Ray cluster has {have.get(res, 0):g}: use fewer workers, a "
                f"smaller --{res.lower()}s-per-worker, or a bigger cluster"
            )
    return None


def _fit(job: Any, spec: Any) -> Any:
    """Run the job on a Ray Train worker group; returns Ray's Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = job.ray
    use_gpu = r.gpus_per_worker > 0
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.to_dict(),
            "spec": spec.to_dict(),
            "run_id": uuid.uuid4().hex,
        },
        scaling_config=ScalingConfig(
            num_workers=r.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name="rocketrec",
            storage_path=str(RunDir(job.data.out).ray_results),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=r.max_failures),
        ),
    )
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    from rocketrec.quiet import quiet_library_noise

    quiet_library_noise()
    from rocketrec.run.flags import parse_job
    from rocketrec.run.prepare import finish_run, prepare_run

    try:
        job = parse_job(build_parser(), argv, ray=True)  # defaults < --config < flags
        spec, job = prepare_run(job)  # every check before Ray starts; then RUN/config.yaml
    except UserError as e:  # the input's fault: one line; anything else is a traceback
        return _error(str(e))
    out, rc = Path(job.data.out), job.ray
    assert rc is not None  # parse_job(..., ray=True)
    if not (rc.address or os.environ.get("RAY_ADDRESS")):
        # Must be set before `import ray`: Ray reads it at import time. With it, an
        # embedded local Ray binds every port to 127.0.0.1 only.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    local = _init_ray(rc.address, rc.local_cpus, rc.verbose)
    where = "local (127.0.0.1 only)" if local else "cluster"
    print(f"[rocketrec] Ray {where}: {ray.cluster_resources()}", flush=True)
    try:
        refused = _cluster_cannot_hold(job)
        if refused:
            return _error(refused)
        t0 = time.time()
        marker = out / USER_ERROR_FILE
        marker.unlink(missing_ok=True)
        result = _fit(job, spec)
        if marker.is_file():  # a user error in a worker: one line, exit 2, never retried
            err = json.loads(marker.read_text())["error"]
            marker.unlink()
            return _error(f"{err} (traceback: {out}/train.log)")
        if result.error is not None:
            print(f"ads_train.py: training failed: {result.error}", file=sys.stderr)
            return 1
        if not rc.verbose:
            quiet_library_noise()  # Ray Train configured the driver's logging again
        say = lambda m: print(m, flush=True)  # noqa: E731
        finish_run(job, result.metrics, time.time() - t0, say=say)
        print(f"[rocketrec] done in {time.time() - t0:.1f}s: {out}", flush=True)
        return 0
    finally:
        if local:
            ray.shutdown()
