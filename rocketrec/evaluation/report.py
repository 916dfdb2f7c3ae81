"""An evaluation report as text (`format_report`) and as a reliability plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def reliability_plot(rep: dict[str, Any], out_png: str | Path) -> None:
    """Observed CTR against mean prediction per decile, per tower (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo, hi = 1.0, 0.0
    for tower, m in rep["towers"].items():
        bs = [b for b in m.get("buckets", []) if b["observed"] > 0 and b["predicted"] > 0]
        if not bs:
            continue
        xs, ys = [b["predicted"] for b in bs], [b["observed"] for b in bs]
        lo, hi = min(lo, *xs, *ys), max(hi, *xs, *ys)
        ax.plot(xs, ys, "o-", label=f"{tower} (AUC {m.get('auc', float('nan')):.4f})")
    if hi > lo:
        ax.plot([lo, hi], [lo, hi], "--", color="gray", label="calibrated")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("mean predicted probability (decile)")
    ax.set_ylabel("observed CTR")
    ax.set_title(f"reliability: {rep['rows']:,} rows")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"{rep['rows']:,} rows of {', '.join(rep['data'])} ({rep['seconds']:.1f}s)"]
    for tower, m in rep["towers"].items():
        txt = f"  {tower:<8} auc {m.get('auc', float('nan')):.4f}"
        if "gauc" in m:
            txt += f" gauc {m['gauc']:.4f}"
        txt += (
            f" logloss {m.get('logloss', float('nan')):.4f} ne {m.get('ne', float('nan')):.4f} "
            f"calibration {m.get('calibration', float('nan')):.3f}"
        )
        lines.append(txt)
    return "\n".join(lines)
