"""What `synth` measures over the rows it writes: Bayes AUC, the same without the
sequence terms, the teacher column's AUC."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Truth:
    """What a drawn table hides: labels and logits (for the report)."""

    y: np.ndarray
    logit: np.ndarray  # true logit (with the bias)
    logit_no_seq: np.ndarray | None  # the same without the sequence terms
    teacher: np.ndarray | None = None  # the teacher's logit
    teacher_ok: np.ndarray | None = None  # rows whose teacher score is not null


class _BinnedAuc:
    """Streaming ROC AUC: positives and negatives counted in fine logit bins (ties within
    a bin count a half); exact to ~1e-5 for logits in [-30, 30]."""

    LO, HI, BINS = -30.0, 30.0, 1 << 17

    def __init__(self) -> None:
        self.pos = np.zeros(self.BINS, np.int64)
        self.neg = np.zeros(self.BINS, np.int64)

    def add(self, y: np.ndarray, logit: np.ndarray) -> None:
        x = (np.asarray(logit, np.float64) - self.LO) * (self.BINS / (self.HI - self.LO))
        b = np.clip(x, 0, self.BINS - 1).astype(np.int64)
        pos = y.astype(bool)
        self.pos += np.bincount(b[pos], minlength=self.BINS)
        self.neg += np.bincount(b[~pos], minlength=self.BINS)

    def value(self) -> float:
        p, n = int(self.pos.sum()), int(self.neg.sum())
        if p == 0 or n == 0:
            return float("nan")
        below = np.cumsum(self.neg) - self.neg
        return float((self.pos * (below + 0.5 * self.neg)).sum() / (p * n))


@dataclass
class SynthReport:
    """Filled by `synth(..., report=...)`: AUCs over the rows written."""

    bayes: _BinnedAuc = field(default_factory=_BinnedAuc)
    bayes_no_seq: _BinnedAuc | None = None
    teacher: _BinnedAuc | None = None
    teacher_column: str | None = None
    teacher_noise: float = 0.0
    rows: int = 0
    teacher_rows: int = 0

    def add(self, t: Truth) -> None:
        self.rows += len(t.y)
        self.bayes.add(t.y, t.logit)
        if t.logit_no_seq is not None:
            if self.bayes_no_seq is None:
                self.bayes_no_seq = _BinnedAuc()
            self.bayes_no_seq.add(t.y, t.logit_no_seq)
        if t.teacher is not None and t.teacher_ok is not None:
            if self.teacher is None:
                self.teacher = _BinnedAuc()
            self.teacher.add(t.y[t.teacher_ok], t.teacher[t.teacher_ok])
            self.teacher_rows += int(t.teacher_ok.sum())

    def lines(self) -> list[str]:
        out = [f"bayes auc: {self.bayes.value():.4f} (true probability vs the labels written)"]
        if self.bayes_no_seq is not None:
            out.append(
                f"bayes auc without the sequence term: {self.bayes_no_seq.value():.4f} "
                "(what a model that ignores the histories can reach at best)"
            )
        if self.teacher is not None:
            out.append(
                f"teacher auc: {self.teacher.value():.4f} (column '{self.teacher_column}', "
                f"noise {self.teacher_noise:g}, on its {self.teacher_rows:,} non-null rows)"
            )
        return out
