"""Run tracking beyond metrics.jsonl: TensorBoard event files under RUN/tb/ (rank 0).

`Tracker(out, enabled)` receives every record the loop writes to metrics.jsonl
(`log(record)`): training loss terms (`train/...`), examples/s and learning
rates at logging steps, and per-tower evaluation metrics (`eval/...`). Scalars
are keyed by `step`. Tracking never stops training: if the writer cannot be
created or a write fails, one warning line and tracking is off for the run.

    tensorboard --logdir runs/
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

_SKIP = {"step", "phase", "epoch"}


class Tracker:
    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.writer: Any = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tb"), flush_secs=10)
        except Exception as e:  # no tensorboard package, read-only storage, ...
            self._off(e)

    def _off(self, e: BaseException) -> None:
        print(
            f"rocketrec: warning: TensorBoard tracking is off for this run ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})",
            file=sys.stderr,
            flush=True,
        )
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
        if self.writer is None or "step" not in rec:
            return
        try:
            step = int(rec["step"])
            for k, v in rec.items():
                if k in _SKIP or isinstance(v, bool) or not isinstance(v, int | float):
                    continue
                if math.isfinite(float(v)):
                    self.writer.add_scalar(self._tag(k, rec), float(v), step)
        except Exception as e:
            self._off(e)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass
            self.writer = None
