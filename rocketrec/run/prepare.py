"""What both entry points do before and after training, once:

    spec, job = prepare_run(job)     the start-up checks, then RUN/config.yaml (written once);
                                     --resume resolved to the checkpoint it verified
    ... train (in this process: rocketrec train; on Ray workers: jobs/ads_train.py) ...
    summary = finish_run(job, metrics, seconds)
                                     RUN/curves.png, RUN/light.pt (unless --no-export),
                                     RUN/summary.json

so `rocketrec train` and `jobs/ads_train.py` leave the same run directory.
Every check here raises a user error (SpecError, DataError, ValueError,
FileNotFoundError) naming the file, field or flag, before anything is written
or any worker starts.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from rocketrec.checkpoint.files import latest_checkpoint, read_meta
from rocketrec.checkpoint.resume import check_resume_compatible
from rocketrec.data.reader import ParquetReader
from rocketrec.errors import CheckpointNotFound, ExportError, UserError
from rocketrec.run.config_file import portable_paths, write_resolved
from rocketrec.run.run_dir import RunDir
from rocketrec.serving.module import check_exportable
from rocketrec.spec import FeatureSpec, load_spec
from rocketrec.train.job import JobConfig


def _check_data(job: JobConfig, spec: FeatureSpec) -> None:
    bs, workers = job.train.batch_size, job.workers
    if job.train.follow:  # partitions arrive later: each is checked when it does
        if len(job.data.train) != 1:
            raise UserError(
                f"--follow: --train must be one directory, got {len(job.data.train)} paths "
                f"({' '.join(job.data.train)})"
            )
        root = Path(job.data.train[0])
        if not root.is_dir():
            what = "is a file, not a directory" if root.exists() else "does not exist"
            raise UserError(
                f"--follow: --train {root} {what} (the directory that partitions land in; "
                "create it first)"
            )
        if job.data.val:
            ParquetReader(list(job.data.val), spec, bs, shuffle=False).close()
        return
    probe = ParquetReader(list(job.data.train), spec, bs, shuffle=False)
    if probe.total_rows // workers < bs:
        who = f"{workers} workers: every worker" if workers > 1 else "1 worker: it"
        raise UserError(
            f"{' '.join(job.data.train)}: {probe.total_rows:,} rows for {who} needs at least "
            f"one batch of --batch-size {bs} rows"
        )
    probe.close()
    if job.data.val:
        ParquetReader(list(job.data.val), spec, bs, shuffle=False).close()


def prepare_run(job: JobConfig) -> tuple[FeatureSpec, JobConfig]:
    """Check everything a run needs before it starts; write RUN/config.yaml. Returns the
    spec and the job as it will run: `resume` resolved to the newest intact checkpoint,
    verified here once (its files' checksums), so no process verifies it again."""
    spec = load_spec(job.data.spec)
    job.check(spec)  # sharding: tables and kinds
    if not job.data.no_export:
        check_exportable(spec, job.model, job.loss.mode)  # never a run that cannot be served
    else:  # the run goes on, but a later `rocketrec export` would refuse it: say so now
        try:
            check_exportable(spec, job.model, job.loss.mode)
        except ExportError as e:
            print(
                f"rocketrec: warning: --no-export: {e} (a later export would refuse it)",
                file=sys.stderr,
            )
    out = Path(job.data.out)
    if job.resume:
        ck = latest_checkpoint(job.resume)
        if ck is None:
            raise CheckpointNotFound(f"--resume {job.resume}: no complete checkpoint found there")
        check_resume_compatible(read_meta(ck), spec, job.model, job.loss, job.train, str(ck))
        job = replace(job, resume=str(ck))
    elif latest_checkpoint(out, verify=False) is not None:
        raise UserError(
            f"{job.data.out} already holds a run's checkpoints: pass --resume {job.data.out} "
            "to continue it, or choose a new --out"
        )
    _check_data(job, spec)
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out)
    # every check passed: record the job (paths as a rerun finds them) and the spec's text
    write_resolved(run.config, portable_paths(job.to_dict(), Path.cwd()))
    spec_text = Path(job.data.spec).read_text(encoding="utf-8")
    if not run.spec.is_file() or run.spec.read_text(encoding="utf-8") != spec_text:
        tmp = run.spec.with_name(f".{run.spec.name}.tmp")
        tmp.write_text(spec_text, encoding="utf-8")
        tmp.replace(run.spec)
    return spec, job


def plot_curves(metrics_path: Path, out_png: Path) -> bool:
    """Validation AUC (and grouped AUC), logloss and normalized entropy of both towers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    ev = sorted((r for r in rows if "base_logloss" in r), key=lambda r: r["step"])
    if not ev:
        return False
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    steps = [r["step"] for r in ev]
    for tower, color in (("booster", "tab:red"), ("light", "tab:blue")):
        if f"{tower}_auc" not in ev[0]:
            continue  # not trained in this mode
        ax[0].plot(steps, [r[f"{tower}_auc"] for r in ev], "o-", color=color, label=f"{tower} auc")
        if f"{tower}_gauc" in ev[0]:
            gauc = [r[f"{tower}_gauc"] for r in ev]
            ax[0].plot(steps, gauc, "s--", color=color, label=f"{tower} gauc")
        ax[1].plot(steps, [r[f"{tower}_logloss"] for r in ev], "o-", color=color, label=tower)
        ne = [r.get(f"{tower}_ne", float("nan")) for r in ev]
        ax[2].plot(steps, ne, "o-", color=color, label=tower)
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


def finish_run(
    job: JobConfig, metrics: dict[str, Any], seconds: float, say: Any = print
) -> dict[str, Any]:
    """Curves, the export (unless --no-export) and summary.json of a finished run."""
    out = Path(job.data.out)
    run = RunDir(out)
    summary: dict[str, Any] = {
        "train_wall_seconds": seconds,
        "workers": job.workers,
        "metrics": metrics,
    }
    if run.metrics.is_file() and plot_curves(run.metrics, run.curves):
        summary["plot"] = str(run.curves)
    if not job.data.no_export and job.loss.mode == "booster_only":
        say(
            "[rocketrec] no export: --mode booster_only trains no light tower (the served one); "
            "`rocketrec export --booster` packages the booster for comparisons"
        )
    elif job.export:
        from rocketrec.data.synth import heldout_table
        from rocketrec.serving.export import export_checkpoint
        from rocketrec.train.tracking import log_model_artifact

        spec = load_spec(job.data.spec)
        val = list(job.data.val) if job.data.val else None
        rep = export_checkpoint(out, run.light, heldout=heldout_table(spec, val, 2048))
        summary["export"] = rep
        say(f"[rocketrec] exported {rep['out']}: parity max |diff| {rep['max_abs_diff']:.3g}")
        log_model_artifact(out, job.train.mlflow_uri, run.light)
    run.summary.write_text(json.dumps(summary, indent=1, default=str))
    return summary
