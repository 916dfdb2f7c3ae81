"""`rocketrec compare`: runs side by side (settings, speed, per-tower metrics), optionally
each evaluated on the same rows (rocketrec.evaluation)."""

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
    }
    mpath = RunDir(run).metrics
    if mpath.is_file():
        recs = [json.loads(x) for x in mpath.read_text().splitlines() if x.strip()]
        rates = [r["train_examples_per_s"] for r in recs if "train_examples_per_s" in r]
        fin = [r for r in recs if "steps" in r and "rows_seen" in r]
        if fin and fin[-1].get("step_seconds"):
            row["examples_per_s"] = fin[-1]["rows_seen"] / fin[-1]["step_seconds"]
        elif rates:
            row["examples_per_s"] = float(np.median(rates))
    if data:
        rep = evaluate_model(run, data, rows=rows, quiet=quiet)
        row["rows"] = rep["rows"]
        for t, m in rep["towers"].items():
            for k in _COLUMNS:
                if k in m:
                    row[f"{t}_{k}"] = m[k]
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

    head = ["run", "mode", "hint", "lambda", "steps", "ex/s", *metric_cols]
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
                *[num(r.get(c), ".4f") for c in metric_cols],
            ]
        )
        if i > 0:
            table.append(
                ["  vs first", "", "", "", "", ""]
                + [num(r.get(f"diff_{c}"), "+.4f") for c in metric_cols]
            )
    widths = [max(len(row[j]) for row in table) for j in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table)
