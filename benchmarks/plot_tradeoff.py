"""AUC against C++ serving latency: light_only, rocket light and the booster, from one comparison.

    python benchmarks/plot_tradeoff.py docs/results/synthetic [docs/results/criteo ...]

Reads RESULTS_DIR/results.json written by compare_modes.py (test AUC over
seeds/folds, and the C++ --bench latency of the light tower and the booster
exported from the same runs) and writes RESULTS_DIR/tradeoff.md and
RESULTS_DIR/tradeoff.png (AUC vs p50 latency at batch 1 and 256).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for d in map(Path, sys.argv[1:]):
        res = json.loads((d / "results.json").read_text())
        s, lat = res["summary"], res["latency"]
        light_lat = next(v for k, v in lat.items() if k.startswith("light"))
        boost_lat = next(v for k, v in lat.items() if k.startswith("booster"))
        rows = [
            ("light_only (light tower)", s["light_only"]["light_auc"], light_lat),
            ("rocket kd (light tower)", s["rocket_kd"]["light_auc"], light_lat),
            ("rocket kd scale 0 (light tower)", s["rocket_kd_scale0"]["light_auc"], light_lat),
            ("booster_only (booster)", s["booster_only"]["booster_auc"], boost_lat),
        ]
        md = [
            "| model | test AUC (mean ± sd) | p50 µs batch 1 | p50 µs batch 256 |",
            "|---|---|---|---|",
        ]
        for name, a, l in rows:
            md.append(
                f"| {name} | {a[0]:.4f} ± {a[1]:.4f} | {l['1']['p50_us']:.0f} | {l['256']['p50_us']:.0f} |"
            )
        (d / "tradeoff.md").write_text("\n".join(md) + "\n")
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for k, b in enumerate(("1", "256")):
            for (name, a, l), c in zip(rows, ("tab:gray", "tab:blue", "tab:green", "tab:red")):
                ax[k].errorbar(l[b]["p50_us"], a[0], yerr=a[1], fmt="o", color=c, label=name)
            ax[k].set_xscale("log")
            ax[k].set_xlabel(f"C++ p50 latency at batch {b} (µs, 1 thread)")
            ax[k].set_ylabel("test AUC")
            ax[k].grid(alpha=0.3)
        ax[0].legend(fontsize=7)
        fig.suptitle(f"{d.name}: what the light tower buys")
        fig.tight_layout()
        fig.savefig(d / "tradeoff.png", dpi=90)
        print("\n".join(md))


if __name__ == "__main__":
    main()
