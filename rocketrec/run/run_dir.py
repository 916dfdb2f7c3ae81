"""Every file name under a run directory `RUN/`, in one place.

RUN/config.yaml       the resolved job (rerun with --config RUN/config.yaml)
RUN/train.log         the console's lines
RUN/metrics.jsonl     one JSON record per logged step and evaluation
RUN/tb/               TensorBoard event files
RUN/checkpoints/      step_NNNNNNNNN/ checkpoints (rocketrec.checkpoint)
RUN/ray_results/      Ray Train's own storage (Ray runs only)
RUN/curves.png        loss and AUC curves, at the end
RUN/light.pt          the exported light tower, at the end (unless --no-export)
RUN/summary.json      the final metrics and where everything is, at the end
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def ray_results(self) -> Path:
        return self.root / "ray_results"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def light(self) -> Path:
        return self.root / "light.pt"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def spec(self) -> Path:
        return self.root / "spec.yaml"


def log_user_error(out: str | Path | None, err: BaseException) -> None:
    """Append a user error's full traceback to RUN/train.log (the console gets one line)."""
    if not out or "://" in str(out):
        return
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(RunDir(out).log, "a") as f:
            f.write("error: " + "".join(traceback.format_exception(err)))
    except OSError:
        pass
