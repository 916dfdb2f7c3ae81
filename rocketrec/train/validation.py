"""Evaluation during training: AUC (GAUC), logloss, NE and calibration of each tower
on the validation reader, plus the base-rate logloss.

Every rank scores its share of the validation rows with both towers (a
single-tower mode reports only the tower it trains); ranks that run out of
batches first run a filler batch so that the sharded collectives stay in
step, and drop its scores. Scores are gathered on every rank, so a group
spread over ranks is scored whole. Logits are corrected for negative
downsampling (p / (p + (1 - p) / r) == sigmoid(logit + log r)) before the
metrics, as the exported model corrects them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rocketrec.data.batch import Batch
from rocketrec.data.reader import ParquetReader
from rocketrec.train.metrics import base_rate_logloss, tower_metrics


def _filler(reader: ParquetReader) -> Batch:
    """A batch of padding (n_real = 0) for a rank that has run out of rows."""
    b = next(
        iter(
            ParquetReader(reader.path, reader.spec, reader.batch_size, shuffle=False, pad_last=True)
        )
    )
    b.n_real = 0
    return b


def _score(
    dmp: Any, reader: ParquetReader, world: int, device: torch.device, max_batches: int
) -> list[np.ndarray]:
    """[labels, weights, booster logits, light logits, groups, logged teacher logits
    (NaN = none)] of this rank's rows."""
    reader.set_epoch(0)
    n = max(reader.batches_per_epoch(0, r) for r in range(world))
    if max_batches:
        n = min(n, max_batches)
    cols: list[list[np.ndarray]] = [[], [], [], [], [], []]
    it = iter(reader)
    filler = None
    for _ in range(n):
        b = next(it, None)
        if b is None:  # this rank ran out: keep collectives in step, drop the scores
            filler = filler or _filler(reader)
            b = filler
        out = dmp(b.dense.to(device), b.sparse.to(device))  # both towers
        k = len(b) if b.n_real is None else b.n_real  # padded rows are dropped
        if not k:
            continue
        w = b.weights[:k].numpy() if b.weights is not None else np.ones(k, np.float32)
        cols[0].append(b.labels[:k].numpy())
        cols[1].append(w)
        cols[2].append(out.booster[:k].float().cpu().numpy())
        cols[3].append(out.light[:k].float().cpu().numpy())
        if b.group is not None:
            cols[4].append(b.group[:k].numpy())
        if b.teacher is not None:
            cols[5].append(b.teacher[:k].numpy())
    it.close()  # stop reading: the reader thread ends, the rest is never decoded
    empty = [np.zeros(0, np.float32)] * 4 + [np.zeros(0, np.int64), np.zeros(0, np.float32)]
    return [np.concatenate(c) if c else e for c, e in zip(cols, empty, strict=True)]


@torch.no_grad()
def evaluate(
    dmp: Any,
    reader: ParquetReader | None,
    towers: set[str],
    step: int,
    device: torch.device,
    max_batches: int = 0,
    negative_sample_rate: float = 1.0,
) -> dict[str, Any]:
    """Metrics of the towers in `towers` on `reader`'s rows (all ranks); {} without one."""
    if reader is None:
        return {}
    world = dist.get_world_size() if dist.is_initialized() else 1
    dmp.eval()
    try:
        local = _score(dmp, reader, world, device, max_batches)
    finally:
        dmp.train()
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, local)
        local = [np.concatenate([g[k] for g in gathered]) for k in range(6)]
    y, w, b_logits, l_logits, groups, t_logits = local
    offset = float(np.log(negative_sample_rate))
    spec = reader.spec
    w_arg = w if spec.weight_column else None
    g_arg = groups if spec.group_column else None
    res: dict[str, Any] = {"step": step, "eval_rows": int(len(y))}
    for name, z in (("booster", b_logits + offset), ("light", l_logits + offset)):
        if name in towers:  # a single-tower mode: the other tower is untrained noise
            for k, v in tower_metrics(y, z, w_arg, g_arg).items():
                res[f"{name}_{k}"] = v
    if spec.teacher_column and len(t_logits) == len(y):
        # the logged teacher on the same rows (those with a score); no downsampling offset:
        # production scored the real traffic
        k = ~np.isnan(t_logits)
        if k.any():
            for name, v in tower_metrics(
                y[k], t_logits[k], None if w_arg is None else w_arg[k], None
            ).items():
                res[f"teacher_{name}"] = v
    res["base_logloss"] = base_rate_logloss(y, w_arg)
    res["ctr"] = float(np.average(y, weights=w_arg))
    return res
