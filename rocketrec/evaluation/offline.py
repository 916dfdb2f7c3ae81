"""Offline evaluation of one model on Parquet logs (`evaluate_model`); the package doc
(`rocketrec.evaluation`) says what it reports and how memory stays bounded."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rocketrec.data.reader import list_parquet_files
from rocketrec.data.schema import DataError
from rocketrec.data.targets import decode_targets
from rocketrec.errors import UserError
from rocketrec.model.loss import LossConfig, trained_towers
from rocketrec.spec import FeatureSpec, load_spec, spec_from_dict
from rocketrec.train.metrics import tower_metrics

BUCKETS = 10


EXACT_ROWS = 5_000_000  # scores kept for exact AUC up to this many rows (~130 MB)
HIST_BINS = 1 << 16  # beyond: per-tower histograms of the logit over [-HIST_Z, HIST_Z]
HIST_Z = 32.0


class _Hist:
    """Bounded per-tower state: weighted histograms of the logit per label, and exact
    streamed sums for logloss, calibration and the base rate."""

    def __init__(self) -> None:
        self.pos = np.zeros(HIST_BINS)
        self.neg = np.zeros(HIST_BINS)
        self.p_sum = np.zeros(HIST_BINS)  # weighted sum of probabilities per bin
        self.ll = self.w = self.wy = self.wp = 0.0

    def add(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        z = z.astype(np.float64)
        ww = np.ones_like(z) if w is None else w.astype(np.float64)
        y = y.astype(np.float64)
        p = 1.0 / (1.0 + np.exp(-z))
        pc = np.clip(p, 1e-7, 1 - 1e-7)
        self.ll += float((ww * -(y * np.log(pc) + (1 - y) * np.log(1 - pc))).sum())
        self.w += float(ww.sum())
        self.wy += float((ww * y).sum())
        self.wp += float((ww * p).sum())
        i = np.clip(((z + HIST_Z) / (2 * HIST_Z) * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
        self.pos += np.bincount(i, weights=ww * y, minlength=HIST_BINS)
        self.neg += np.bincount(i, weights=ww * (1 - y), minlength=HIST_BINS)
        self.p_sum += np.bincount(i, weights=ww * p, minlength=HIST_BINS)

    def metrics(self) -> dict[str, Any]:
        P, N = self.pos.sum(), self.neg.sum()
        below = np.concatenate([[0.0], np.cumsum(self.neg)[:-1]])
        auc = (
            float((self.pos * (below + 0.5 * self.neg)).sum() / (P * N))
            if P and N
            else float("nan")
        )
        ctr = self.wy / self.w
        ll = self.ll / self.w
        c = min(max(ctr, 1e-7), 1 - 1e-7)
        base = -(ctr * np.log(c) + (1 - ctr) * np.log(1 - c))
        out: dict[str, Any] = {
            "auc": auc,
            "logloss": ll,
            "calibration": (self.wp / self.w) / ctr if ctr > 0 else float("nan"),
            "ne": ll / base if base > 0 else float("nan"),
            "auc_method": f"histogram of {HIST_BINS} logit bins",
        }
        # deciles of the predicted probability from the histogram's cumulative weight
        tot = self.pos + self.neg
        cum = np.cumsum(tot)
        edges = np.searchsorted(cum, np.linspace(0, cum[-1], BUCKETS + 1)[1:-1])
        buckets = []
        for lo, hi in zip(np.r_[0, edges], np.r_[edges, HIST_BINS]):
            wsum = tot[lo:hi].sum()
            if wsum <= 0:
                continue
            pred = float(self.p_sum[lo:hi].sum() / wsum)
            obs = float(self.pos[lo:hi].sum() / wsum)
            buckets.append(
                {
                    "rows": float(wsum),
                    "predicted": pred,
                    "observed": obs,
                    "calibration": pred / obs if obs > 0 else float("nan"),
                }
            )
        out["buckets"] = buckets
        return out


class _Scores:
    """Per-tower logits, labels, weights and groups, appended batch by batch: exact up to
    `exact_rows` rows; past that, bounded histograms (AUC to ~1e-4, logloss, NE and
    calibration still exact; GAUC not computed)."""

    def __init__(self, towers: Sequence[str], exact_rows: int = EXACT_ROWS) -> None:
        self.towers = list(towers)
        self.exact_rows = exact_rows
        self.rows = 0
        self.z: dict[str, list[np.ndarray]] = {t: [] for t in towers}
        self.y: list[np.ndarray] = []
        self.w: list[np.ndarray] = []
        self.g: list[np.ndarray] = []
        self.hist: dict[str, _Hist] | None = None

    def _to_hist(self) -> None:
        self.hist = {t: _Hist() for t in self.towers}
        y = np.concatenate(self.y)
        w = np.concatenate(self.w) if self.w else None
        for t in self.towers:
            self.hist[t].add(np.concatenate(self.z[t]), y, w)
        self.z = {t: [] for t in self.towers}
        self.y, self.w, self.g = [], [], []

    def add(self, logits: dict[str, np.ndarray], y, w, g) -> None:  # type: ignore[no-untyped-def]
        self.rows += len(y)
        if self.hist is not None:
            for t in self.towers:
                self.hist[t].add(logits[t], y, w)
            return
        for t in self.towers:
            self.z[t].append(logits[t].astype(np.float32))
        self.y.append(y.astype(np.uint8))
        if w is not None:
            self.w.append(w.astype(np.float32))
        if g is not None:
            self.g.append(g.astype(np.int64))
        if self.rows > self.exact_rows:
            self._to_hist()

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": int(self.rows), "towers": {}}
        if self.hist is not None:
            for t in self.towers:
                out["towers"][t] = self.hist[t].metrics()
            return out
        y = np.concatenate(self.y).astype(np.float64) if self.y else np.zeros(0)
        w = np.concatenate(self.w).astype(np.float64) if self.w else None
        g = np.concatenate(self.g) if self.g else None
        for t in self.towers:
            z = np.concatenate(self.z[t]).astype(np.float64)
            m: dict[str, Any] = dict(tower_metrics(y, z, w, g)) if len(y) else {}
            m["auc_method"] = "exact"
            m["buckets"] = _buckets(y, z, w)
            out["towers"][t] = m
        return out


def _buckets(y: np.ndarray, z: np.ndarray, w: np.ndarray | None) -> list[dict[str, float]]:
    """Calibration by predicted-probability decile: rows, mean prediction, observed CTR."""
    if len(y) == 0:
        return []
    p = 1.0 / (1.0 + np.exp(-z))
    order = np.argsort(p, kind="mergesort")
    out = []
    for part in np.array_split(order, min(BUCKETS, len(order))):
        ww = None if w is None else w[part]
        pred = float(np.average(p[part], weights=ww))
        obs = float(np.average(y[part], weights=ww))
        out.append(
            {
                "rows": int(len(part)),
                "p_min": float(p[part].min()),
                "p_max": float(p[part].max()),
                "predicted": pred,
                "observed": obs,
                "calibration": pred / obs if obs > 0 else float("nan"),
            }
        )
    return out


class _Progress:
    def __init__(self, total: int, every: float = 5.0, quiet: bool = False) -> None:
        self.total, self.every, self.quiet = total, every, quiet
        self.t0 = self.last = time.time()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.time()
        if not self.quiet and now - self.last >= self.every:
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(
                f"evaluate: {self.done:,} / {self.total:,} rows, {rate:,.0f} rows/s, "
                f"ETA {eta:,.0f}s",
                file=sys.stderr,
                flush=True,
            )
            self.last = now


def _with_group(spec: FeatureSpec, group: str | None) -> FeatureSpec:
    if not group:
        return spec
    from dataclasses import replace

    return replace(spec, group_column=group)


def _tables(
    data: str | Sequence[str], columns: list[str], batch_rows: int
) -> Iterator[tuple[str, pa.Table]]:
    """(file, table) batches of every file in order, each file read with its own schema."""
    fs, files = list_parquet_files(data)
    for f in files:
        try:
            pf = pq.ParquetFile(fs.open_input_file(f))
        except (OSError, ValueError, pa.ArrowInvalid) as e:
            raise DataError(f"{f}: cannot read as Parquet: {e}") from None
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(
                f"{f}: column '{missing[0]}' not found (the model reads {', '.join(columns)})"
            )
        for rb in pf.iter_batches(batch_size=batch_rows, columns=columns):
            yield f, pa.Table.from_batches([rb])


def _total_rows(data: str | Sequence[str]) -> int:
    fs, files = list_parquet_files(data)
    n = 0
    for f in files:
        with fs.open_input_file(f) as fh:
            n += pq.read_metadata(fh).num_rows
    return n


def _is_export(path: Path) -> bool:
    import zipfile

    return path.is_file() and zipfile.is_zipfile(path)


def evaluate_model(
    model: str | Path,
    data: str | Sequence[str],
    spec_path: str | None = None,
    group: str | None = None,
    rows: int | None = None,
    batch_rows: int = 8192,
    quiet: bool = False,
    exact_rows: int = EXACT_ROWS,
) -> dict[str, Any]:
    """Evaluate an exported light.pt or a run/checkpoint on Parquet logs (module docstring).
    Raises ValueError / DataError (one line) on a model/data mismatch."""
    path = Path(model)
    if not path.exists():
        raise UserError(f"{model}: no such file or directory")
    t0 = time.time()
    if _is_export(path):
        limit = rows if rows is not None else _total_rows(data)
        rep = _evaluate_export(path, data, spec_path, group, limit, batch_rows, quiet, exact_rows)
    elif path.is_dir():
        rep = _evaluate_checkpoint(
            path, data, spec_path, group, rows, batch_rows, quiet, exact_rows
        )
    else:
        raise UserError(f"{model}: not a rocketrec export (light.pt) nor a run directory")
    rep.update(model=str(model), data=[data] if isinstance(data, str) else list(data))
    rep["seconds"] = time.time() - t0
    return rep


def _evaluate_export(
    path, data, spec_path, group, limit, batch_rows, quiet, exact_rows
) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from rocketrec.serving.manifest import read_manifest
    from rocketrec.serving.ops import load_model
    from rocketrec.serving.requests import raw_inputs_from_table

    man = read_manifest(path)  # ValueError if not a rocketrec export
    if "spec" not in man or "sparse_features" not in man:
        raise UserError(f"{path}: not a rocketrec export (its manifest has no spec)")
    spec = load_spec(spec_path) if spec_path else spec_from_dict(man["spec"], source=f"{path}")
    spec = _with_group(spec, group)
    if man.get("tower", "light") != "light":
        raise UserError(f"{path}: a {man.get('tower')} export (comparisons only), not light.pt")
    inputs = man["sparse_features"] + man["dense_features"]
    try:
        light = [spec.feature(f["name"]) for f in inputs]
    except (KeyError, ValueError):
        raise UserError(f"{path}: the model's inputs are not all in {spec.source}") from None
    cols = sorted(
        {spec.label_column, *(c for c in (spec.weight_column, spec.group_column) if c)}
        | {str(getattr(f, "column", "")) for f in light if getattr(f, "column", None)}
    )
    module = load_model(path)
    scores = _Scores(["light"], exact_rows)
    prog = _Progress(limit, quiet=quiet)
    for f, t in _tables(data, cols, batch_rows):
        if prog.done >= limit:
            break
        t = t.slice(0, limit - prog.done)
        y, w, g = decode_targets(t, spec, f)
        try:
            x = raw_inputs_from_table(t, spec)
        except DataError as e:
            raise DataError(f"{f}: {e}") from None
        with torch.inference_mode():
            p = module(*x).double().numpy()
        p = np.clip(p, 1e-12, 1 - 1e-12)
        scores.add({"light": np.log(p) - np.log1p(-p)}, y, w, g)
        prog.update(t.num_rows)
    rep = scores.report()
    rep["kind"] = "export"
    rep["negative_sample_rate"] = man.get("negative_sample_rate", 1.0)
    return rep


def _evaluate_checkpoint(
    path, data, spec_path, group, limit, batch_rows, quiet, exact_rows
) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from rocketrec.checkpoint.files import latest_checkpoint
    from rocketrec.checkpoint.meta import saved_config
    from rocketrec.checkpoint.tables import load_unsharded
    from rocketrec.data.reader import ParquetReader

    ck = latest_checkpoint(path)
    if ck is None:
        raise UserError(f"{path}: no checkpoint there (a run directory or checkpoint expected)")
    model, meta = load_unsharded(ck)
    spec: FeatureSpec = model.spec
    if spec_path:
        other = load_spec(spec_path)
        if other.to_dict()["sparse"] != spec.to_dict()["sparse"]:
            raise UserError(f"{spec_path}: its features differ from the checkpoint's spec ({ck})")
        spec = other
    spec = _with_group(spec, group)
    saved = saved_config(meta, "loss")
    towers = trained_towers(
        LossConfig(**{k: saved[k] for k in LossConfig.__dataclass_fields__ if k in saved})
    )
    rate = float(saved_config(meta, "train").get("negative_sample_rate", 1.0))
    offset = float(np.log(rate))
    # the run's batch size: the towers see the same batches as the run's own evaluation
    batch_rows = int(saved_config(meta, "train").get("batch_size", batch_rows))
    reader = ParquetReader(data, spec, batch_rows, shuffle=False, drop_last=False)
    limit = reader.total_rows if limit is None else min(limit, reader.total_rows)
    scores = _Scores(towers, exact_rows)
    # the logged teacher's own metrics, on the same rows (those with a score)
    teacher = _Scores(["teacher"], exact_rows) if spec.teacher_column else None
    prog = _Progress(limit, quiet=quiet)
    with torch.inference_mode():
        for b in reader:
            n = min(len(b), limit - prog.done)
            if n <= 0:
                break
            out = model(b.dense, b.sparse)
            z = {t: getattr(out, t)[:n].double().numpy() + offset for t in towers}
            y = b.labels[:n].numpy()
            w = b.weights[:n].numpy() if b.weights is not None and spec.weight_column else None
            g = b.group[:n].numpy() if b.group is not None and spec.group_column else None
            scores.add(z, y, w, g)
            if teacher is not None and b.teacher is not None:
                zt = b.teacher[:n].double().numpy()
                k = ~np.isnan(zt)
                teacher.add(
                    {"teacher": zt[k]},
                    y[k],
                    None if w is None else w[k],
                    None if g is None else g[k],
                )
            prog.update(n)
    reader.close()
    rep = scores.report()
    if teacher is not None:
        t_rep = teacher.report()
        rep["towers"]["teacher"] = {**t_rep["towers"]["teacher"], "rows": t_rep["rows"]}
    rep.update(
        kind="checkpoint", checkpoint=str(ck), step=meta.get("step"), negative_sample_rate=rate
    )
    return rep
