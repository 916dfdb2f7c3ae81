"""Per-tower evaluation metrics for CTR models.

- `auc`: exact, tie-aware, weighted ROC AUC (Mann-Whitney); NaN with one class.
- `logloss`: weighted binary cross-entropy of probabilities (clipped at 1e-7).
- calibration: weighted mean prediction / weighted observed CTR (1.0 = calibrated).
- `ne`: normalized entropy = logloss / logloss of always predicting the base rate
  (He et al., "Practical lessons from predicting clicks on ads at Facebook", 2014);
  below 1 means better than the base rate.
- `gauc`: grouped AUC (e.g. per user): the mean of per-group AUCs over the groups
  that have both clicks and non-clicks, each weighted by its impressions (its
  rows, or the sum of its sample weights when there are weights).

Every metric takes the whole evaluation set at once: the loop gathers scores,
labels, weights and group ids from every rank first, so a group whose rows are
spread over several ranks is scored as one group.
"""

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


def gauc(
    labels: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    weights: np.ndarray | None = None,
) -> float:
    """Impression-weighted mean of per-group AUC over groups with both classes; NaN if none."""
    if len(labels) == 0:
        return float("nan")
    order = np.argsort(groups, kind="mergesort")
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], len(g)]
    y, s = labels[order], scores[order]
    w = None if weights is None else weights[order]
    total = acc = 0.0
    for a, b in zip(starts, ends, strict=True):
        yy = y[a:b]
        if yy.min() == yy.max():
            continue  # one class only: no AUC for this group
        ww = None if w is None else w[a:b]
        imp = float(b - a) if ww is None else float(ww.sum())
        acc += imp * auc(yy, s[a:b], ww)
        total += imp
    return acc / total if total > 0 else float("nan")


def tower_metrics(
    labels: np.ndarray,
    logits: np.ndarray,
    weights: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    ctr = float(np.average(labels, weights=weights))
    ll = logloss(labels, probs, weights)
    base = base_rate_logloss(labels, weights)
    out = {
        "auc": auc(labels, logits, weights),
        "logloss": ll,
        # mean prediction / observed CTR: 1.0 is calibrated
        "calibration": float(np.average(probs, weights=weights) / ctr) if ctr > 0 else float("nan"),
        "ne": ll / base if base > 0 else float("nan"),
    }
    if groups is not None:
        out["gauc"] = gauc(labels, logits, groups, weights)
    return out


def base_rate_logloss(labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    ctr = float(np.average(labels, weights=weights))
    return logloss(labels, np.full(len(labels), ctr), weights)
