"""Per-tower evaluation metrics: AUC, logloss, calibration, and the base-rate logloss."""

from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Exact (tie-aware) ROC AUC via the Mann-Whitney statistic; NaN if one class only."""
    y = labels.astype(np.float64)
    w = np.ones_like(y) if weights is None else weights.astype(np.float64)
    order = np.argsort(scores, kind="mergesort")
    s, y, w = scores[order], y[order], w[order]
    # group ties: every member of a tie group gets the group's mean rank of negatives below
    _, starts = np.unique(s, return_index=True)
    ends = np.append(starts[1:], len(s))
    wneg = w * (1 - y)
    wpos = w * y
    cum_neg = np.concatenate([[0.0], np.cumsum(wneg)])
    neg_below = cum_neg[starts]
    neg_in = cum_neg[ends] - cum_neg[starts]
    pos_in = np.add.reduceat(wpos, starts) if len(s) else np.zeros(0)
    p, n = wpos.sum(), wneg.sum()
    if p == 0 or n == 0:
        return float("nan")
    return float((pos_in * (neg_below + 0.5 * neg_in)).sum() / (p * n))


def logloss(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> float:
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    ll = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    return float(np.average(ll, weights=weights))


def tower_metrics(
    labels: np.ndarray, logits: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, float]:
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    ctr = float(np.average(labels, weights=weights))
    return {
        "auc": auc(labels, logits, weights),
        "logloss": logloss(labels, probs, weights),
        # mean prediction / observed CTR: 1.0 is calibrated
        "calibration": float(np.average(probs, weights=weights) / ctr) if ctr > 0 else float("nan"),
    }


def base_rate_logloss(labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    ctr = float(np.average(labels, weights=weights))
    return logloss(labels, np.full(len(labels), ctr), weights)
