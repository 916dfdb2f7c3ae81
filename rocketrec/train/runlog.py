"""Where a run's progress goes: one small object, made once per run.

    log = RunLog(out, active=rank == 0, tracker=Tracker(...))
    log.line("checkpoint: ...")        console + RUN/train.log
    log.record({"step": 100, ...})     RUN/metrics.jsonl + TensorBoard/MLflow (+ a console
                                       line for evaluation records)

Only rank 0 is `active`; the other ranks' RunLog writes nothing, so every
module calls it without asking which rank it runs on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rocketrec.run.run_dir import RunDir


def eta(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_eval(rec: dict[str, Any]) -> str:
    """'eval step 100: booster auc 0.7712 logloss ... | light auc ... | base logloss ...'"""
    parts = []
    for t in ("booster", "light"):
        if f"{t}_auc" not in rec:
            continue
        txt = f"{t} auc {rec[f'{t}_auc']:.4f}"
        if f"{t}_gauc" in rec:
            txt += f" gauc {rec[f'{t}_gauc']:.4f}"
        txt += (
            f" logloss {rec[f'{t}_logloss']:.4f} ne {rec[f'{t}_ne']:.4f}"
            f" cal {rec[f'{t}_calibration']:.3f}"
        )
        parts.append(txt)
    return (
        f"eval step {rec['step']}: "
        + " | ".join(parts)
        + (f" | base logloss {rec['base_logloss']:.4f}")
    )


class RunLog:
    def __init__(self, out: Path, active: bool, tracker: Any = None) -> None:
        self.out, self.active, self.tracker = Path(out), active, tracker
        self.history: list[dict[str, Any]] = []  # every record, on every rank
        if active:
            self.out.mkdir(parents=True, exist_ok=True)

    def line(self, msg: str) -> None:
        """A progress line: to the console and to RUN/train.log."""
        if not self.active:
            return
        print(msg, flush=True)
        with open(RunDir(self.out).log, "a") as f:
            f.write(msg + "\n")

    def record(self, rec: dict[str, Any]) -> None:
        """A metrics record: metrics.jsonl, the trackers, and a line for evaluations."""
        self.history.append(rec)
        if not self.active:
            return
        with open(RunDir(self.out).metrics, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tracker is not None:
            self.tracker.log(rec)
        if "base_logloss" in rec:
            self.line(format_eval(rec))

    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
