"""`rocketrec compare`: runs side by side (settings, speed, per-tower metrics), optionally
each evaluated on the same rows (rocketrec.evaluation).

A followed run (`--follow`) is judged by its progressive metrics: each partition scored
before it was trained on. Its row carries their mean over its partitions (weighted by
rows; those scored at step 0, by an untrained model, left out; column `on` says
`prog:N`, N the partitions averaged) and `partitions`, the metrics partition by partition,
which `format_comparison` shows as a second table, one line per partition."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rocketrec.errors import UserError
from rocketrec.evaluation.offline import evaluate_model
from rocketrec.run.run_dir import RunDir

_COLUMNS = ("auc", "gauc", "ne", "calibration")
_PROG = "progressive_"
_PER_PARTITION = ("light_auc", "light_ne", "booster_auc")


def progressive_by_partition(recs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """partition -> its progressive metrics (the last record of each: a restart may have
    scored a partition again before training it), in the order first scored."""
    out: dict[str, dict[str, Any]] = {}
    for r in recs:
        if "partition" in r:
            m = {k.removeprefix(_PROG): v for k, v in r.items() if k.startswith(_PROG)}
            out[r["partition"]] = {"step": r.get("step"), **m}
    return out


def _weighted_means(parts: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each tower metric's mean over these partitions, weighted by their rows."""
    out = {}
    for t in ("booster", "light"):
        for k in _COLUMNS:
            pairs = [
                (m[f"{t}_{k}"], m.get("eval_rows") or 1)
                for m in parts.values()
                if isinstance(m.get(f"{t}_{k}"), float) and np.isfinite(m[f"{t}_{k}"])
            ]
            if pairs:
                v, w = np.array(pairs, dtype=float).T
                out[f"{t}_{k}"] = float((v * w).sum() / w.sum())
    return out


def _run_row(run: Path, data: Any, rows: int | None, quiet: bool) -> dict[str, Any]:
    from rocketrec.checkpoint.files import latest_checkpoint, read_meta
    from rocketrec.checkpoint.meta import saved_config

    ck = latest_checkpoint(run)
    if ck is None:
        raise UserError(f"{run}: no checkpoint there (a run directory expected)")
    meta = read_meta(ck)
    loss = saved_config(meta, "loss")
    row: dict[str, Any] = {
        "run": str(run),
        "mode": loss.get("mode"),
        "hint": loss.get("hint"),
        "lambda": loss.get("hint_weight"),
        "steps": meta.get("step"),
        "examples_per_s": None,
        "on": "val",
    }
    mpath = RunDir(run).metrics
    recs: list[dict[str, Any]] = []
    if mpath.is_file():
        recs = [json.loads(x) for x in mpath.read_text().splitlines() if x.strip()]
        rates = [r["train_examples_per_s"] for r in recs if "train_examples_per_s" in r]
        fin = [r for r in recs if "steps" in r and "rows_seen" in r]
        if fin and fin[-1].get("step_seconds"):
            row["examples_per_s"] = fin[-1]["rows_seen"] / fin[-1]["step_seconds"]
        elif rates:
            row["examples_per_s"] = float(np.median(rates))
    parts = progressive_by_partition(recs)
    if parts:
        row["partitions"] = parts
    if data:
        rep = evaluate_model(run, data, rows=rows, quiet=quiet)
        row["rows"], row["on"] = rep["rows"], "data"
        for t, m in rep["towers"].items():
            for k in _COLUMNS:
                if k in m:
                    row[f"{t}_{k}"] = m[k]
    elif parts:
        used = {k: m for k, m in parts.items() if m.get("step") != 0} or parts
        row["on"] = f"prog:{len(used)}"
        row["rows"] = sum(int(m.get("eval_rows") or 0) for m in used.values())
        row.update(_weighted_means(used))
    else:
        m = meta.get("metrics") or {}
        row["rows"] = m.get("eval_rows")
        for t in ("booster", "light"):
            for k in _COLUMNS:
                if f"{t}_{k}" in m:
                    row[f"{t}_{k}"] = m[f"{t}_{k}"]
    return row


def compare_runs(
    runs: Sequence[str], data: Any = None, rows: int | None = None, quiet: bool = False
) -> list[dict[str, Any]]:
    out = [_run_row(Path(r), data, rows, quiet) for r in runs]
    first = out[0]
    for row in out[1:]:
        for k, v in list(row.items()):
            if k.endswith(_COLUMNS) and isinstance(v, float) and isinstance(first.get(k), float):
                row[f"diff_{k}"] = v - first[k]
    return out


def format_comparison(rows: list[dict[str, Any]]) -> str:
    metric_cols = [
        f"{t}_{k}"
        for t in ("booster", "light")
        for k in _COLUMNS
        if any(f"{t}_{k}" in r for r in rows)
    ]

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    head = ["run", "mode", "hint", "lambda", "steps", "ex/s", "on", *metric_cols]
    table = [head]
    for i, r in enumerate(rows):
        table.append(
            [
                Path(r["run"]).name,
                str(r["mode"]),
                str(r["hint"]),
                num(r["lambda"], "g"),
                num(r["steps"], "d"),
                num(r["examples_per_s"], ",.0f"),
                str(r.get("on", "val")),
                *[num(r.get(c), ".4f") for c in metric_cols],
            ]
        )
        if i > 0:
            table.append(
                ["  vs first", "", "", "", "", "", ""]
                + [num(r.get(f"diff_{c}"), "+.4f") for c in metric_cols]
            )
    text = _align(table)
    if any(r.get("partitions") for r in rows):
        text += "\n\n" + _partition_table(rows)
    return text


def _align(table: list[list[str]]) -> str:
    widths = [max(len(row[j]) for row in table) for j in range(len(table[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table)


def _partition_table(rows: list[dict[str, Any]]) -> str:
    """Followed runs' progressive metrics, one line per partition (in the order the first
    run that has it scored it), a column group per followed run."""
    followed = [r for r in rows if r.get("partitions")]
    names: list[str] = []
    for r in followed:
        names += [p for p in r["partitions"] if p not in names]
    head = ["partition"] + [
        f"{Path(r['run']).name}:{c}" for r in followed for c in ("rows", *_PER_PARTITION)
    ]
    table = [head]
    for p in names:
        line = [p]
        for r in followed:
            m = r["partitions"].get(p, {})
            line.append("-" if m.get("eval_rows") is None else f"{m['eval_rows']:,}")
            line += ["-" if m.get(c) is None else f"{m[c]:.4f}" for c in _PER_PARTITION]
        table.append(line)
    return "progressive metrics (each partition scored before training on it):\n" + _align(table)
