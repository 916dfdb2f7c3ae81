"""Run tracking beyond metrics.jsonl: TensorBoard event files under RUN/tb/ and,
optionally, MLflow (rank 0 only).

`Tracker(out, enabled, mlflow_uri, params)` receives every record the loop writes
to metrics.jsonl (`log(record)`): training loss terms (`train/...`), examples/s
and learning rates at logging steps, and per-tower evaluation metrics
(`eval_light/...`, `eval_booster/...`). Scalars are keyed by `step`. With an
MLflow tracking URI the same metrics go to an MLflow run (experiment
`rocketrec`, run name = the run directory's name) with the resolved config as
its parameters; the run's id is kept in RUN/mlflow_run_id so that the driver
adds the exported model as an artifact (`log_artifact`). Tracking never stops
training: if a writer cannot be created or a write fails, one warning line and
that tracker is off for the run.

    tensorboard --logdir runs/
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from rocketrec.run.run_dir import RunDir

_SKIP = {"step", "phase", "epoch"}


MLFLOW_RUN_FILE = "mlflow_run_id"


def _warn(what: str, e: BaseException) -> None:
    print(
        f"rocketrec: warning: {what} tracking is off for this run ({e.__class__.__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''})",
        file=sys.stderr,
        flush=True,
    )


def _mlflow(uri: str) -> Any:
    import os

    if uri.startswith("file:") or "://" not in uri:
        # MLflow keeps its file store in maintenance mode behind this switch
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow


def _flat(d: Any, prefix: str = "") -> dict[str, str]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): str(d)[:500]}
    out: dict[str, str] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


class Tracker:
    def __init__(
        self,
        out: Path,
        enabled: bool = True,
        mlflow_uri: str | None = None,
        params: dict[str, Any] | None = None,
        active: bool = True,
    ) -> None:
        self.writer: Any = None
        self.mlflow: Any = None
        if not active:  # not rank 0
            return
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(RunDir(out).tensorboard), flush_secs=10)
            except Exception as e:  # no tensorboard package, read-only storage, ...
                _warn("TensorBoard", e)
        if mlflow_uri:
            try:
                mlflow = _mlflow(mlflow_uri)
                mlflow.set_experiment("rocketrec")
                run_file = out / MLFLOW_RUN_FILE
                run_id = run_file.read_text().strip() if run_file.is_file() else None
                run = mlflow.start_run(run_id=run_id, run_name=None if run_id else out.name)
                run_file.write_text(run.info.run_id)
                if params and not run_id:
                    items = list(_flat(params).items())
                    for i in range(0, len(items), 100):  # MLflow's batch limit
                        mlflow.log_params(dict(items[i : i + 100]))
                self.mlflow = mlflow
            except Exception as e:  # not installed, unreachable server, bad URI, ...
                _warn("MLflow", e)

    def _off(self, e: BaseException) -> None:
        _warn("TensorBoard", e)
        self.writer = None

    @staticmethod
    def _tag(key: str, rec: dict[str, Any]) -> str:
        if key.startswith("train_"):
            return "train/" + key[len("train_") :]
        if "base_logloss" in rec:  # an evaluation record
            for tower in ("booster", "light"):
                if key.startswith(tower + "_"):
                    return f"eval_{tower}/{key[len(tower) + 1 :]}"
            return "eval/" + key
        return "train/" + key

    def log(self, rec: dict[str, Any]) -> None:
        if "step" not in rec or (self.writer is None and self.mlflow is None):
            return
        step = int(rec["step"])
        scalars = {
            self._tag(k, rec): float(v)
            for k, v in rec.items()
            if k not in _SKIP
            and not isinstance(v, bool)
            and isinstance(v, int | float)
            and math.isfinite(float(v))
        }
        if self.writer is not None:
            try:
                for tag, v in scalars.items():
                    self.writer.add_scalar(tag, v, step)
            except Exception as e:
                self._off(e)
        if self.mlflow is not None:
            try:
                self.mlflow.log_metrics(scalars, step=step)
            except Exception as e:
                _warn("MLflow", e)
                self.mlflow = None

    def close(self) -> None:
        import contextlib

        for closer in (
            self.mlflow.end_run if self.mlflow is not None else None,
            self.writer.close if self.writer is not None else None,
        ):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer()
        self.mlflow = self.writer = None


def log_model_artifact(out: Path, mlflow_uri: str | None, model: Path) -> None:
    """Driver: add the exported model to the run's MLflow run (one warning on failure)."""
    run_file = out / MLFLOW_RUN_FILE
    if not mlflow_uri or not run_file.is_file():
        return
    try:
        mlflow = _mlflow(mlflow_uri)
        with mlflow.start_run(run_id=run_file.read_text().strip()):
            mlflow.log_artifact(str(model))
    except Exception as e:
        _warn("MLflow (model artifact)", e)
