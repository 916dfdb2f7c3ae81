"""Where does the booster's guidance pay? Rocket light vs light_only vs a perfect teacher.

    python benchmarks/sweep_regimes.py --out docs/results/regimes [--seeds 0 1 2]

Synthetic ads_ctr data (correlated ids: ad -> campaign -> category and user ->
segment latents, so visible features proxy hidden ones); one clean test set
(seed 3, 100k rows) with the true click probability for the Bayes ceiling.
Regimes: training rows (50k, 200k, 800k), label noise 0.1, the light tower on
all features instead of its subset, a bigger light tower (128-64). Variants per
regime and seed: light_only, rocket (defaults: kd T=2, lambda 1), rocket with
light_shared_grad_scale 0, and perfect_teacher (the light tower distilled from
the generator's true probability: the most any teacher's soft labels can add).
Differences are paired per seed against light_only; '(noise)' = within 2
standard errors. Writes OUT/results.json, OUT/table.md, OUT/chart.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REGIMES = {
    "rows 50k": {"rows": 50_000},
    "rows 200k": {"rows": 200_000},
    "rows 800k": {"rows": 800_000},
    "rows 200k, label noise 0.1": {"rows": 200_000, "label_noise": 0.1},
    "rows 200k, light on all features": {"rows": 200_000, "light_all": True},
    "rows 200k, light MLP 128-64": {"rows": 200_000, "light_mlp": (128, 64)},
}
VARIANTS = {
    "light_only": {"mode": "light_only"},
    "rocket": {},
    "rocket_scale0": {"light_shared_grad_scale": 0.0},
    "perfect_teacher": {"mode": "perfect_teacher"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES))
    ap.add_argument("--batch-size", type=int, default=512)
    a = ap.parse_args()
    from rocketrec.cli import quiet_library_noise

    quiet_library_noise()
    import numpy as np
    import pyarrow.parquet as pq

    from rocketrec.data.synth import SynthConfig, synth
    from rocketrec.model.loss import LossConfig
    from rocketrec.model.model import ModelConfig
    from rocketrec.spec import load_spec
    from rocketrec.train.loop import TrainConfig, train
    from rocketrec.train.metrics import auc

    base = load_spec(ROOT / "feature_specs" / "ads_ctr.yaml")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="regimes_"))
    synth(base, str(tmp / "test"), SynthConfig(rows=100_000, seed=3, true_ctr_column="p_true"))
    t = pq.read_table(tmp / "test")
    bayes = auc(t["click"].to_numpy(), t["p_true"].to_numpy())
    print(f"Bayes AUC on the test set: {bayes:.4f}", flush=True)
    runs = []
    for name in a.regimes:
        r = REGIMES[name]
        data = tmp / f"train_{r['rows']}_{r.get('label_noise', 0)}"
        if not data.exists():
            synth(
                base,
                str(data),
                SynthConfig(
                    rows=r["rows"],
                    seed=1,
                    row_group_size=16384,
                    label_noise=r.get("label_noise", 0.0),
                    true_ctr_column="p_true",
                ),
            )
        spec = base
        if r.get("light_all"):
            spec = dataclasses.replace(
                base, light_features=tuple(base.sparse_names + base.dense_names)
            )
        mc = ModelConfig(light_mlp=r.get("light_mlp", ModelConfig().light_mlp))
        for seed in a.seeds:
            for v, kw in VARIANTS.items():
                tc = TrainConfig(
                    batch_size=a.batch_size,
                    seed=seed,
                    log_every=0,
                    keep_checkpoints=1,
                    teacher_column="p_true" if v == "perfect_teacher" else None,
                )
                res = train(
                    spec,
                    str(data),
                    str(tmp / "test"),
                    str(tmp / f"run_{len(runs)}"),
                    mc,
                    LossConfig(**kw),
                    tc,
                )
                runs.append(
                    {
                        "regime": name,
                        "seed": seed,
                        "variant": v,
                        "light_auc": res.get("light_auc", float("nan")),
                        "booster_auc": res.get("booster_auc", float("nan")),
                        "light_logloss": res["light_logloss"],
                    }
                )
                print(
                    f"{name} | seed {seed} | {v}: light AUC {res.get('light_auc', float('nan')):.4f}"
                    + (f" booster AUC {res['booster_auc']:.4f}" if v.startswith("rocket") else ""),
                    flush=True,
                )
    lines = [
        f"Test set: 100,000 synthetic rows (seed 3), Bayes AUC {bayes:.4f}. Seeds {a.seeds}; 1 epoch, "
        f"batch {a.batch_size}; Δ = paired difference in light AUC against light_only (mean ± sd); "
        "'(noise)' = within 2 standard errors.",
        "",
        "| regime | light_only AUC | rocket Δ | rocket scale0 Δ | perfect teacher Δ | rocket booster AUC |",
        "|---|---|---|---|---|---|",
    ]
    summary = {}
    for name in a.regimes:
        rs = {(x["seed"], x["variant"]): x for x in runs if x["regime"] == name}
        lo = np.array([rs[(s, "light_only")]["light_auc"] for s in a.seeds])
        row = [name, f"{lo.mean():.4f} ± {lo.std(ddof=1):.4f}"]
        summary[name] = {"light_only": float(lo.mean())}
        for v in ("rocket", "rocket_scale0", "perfect_teacher"):
            d = np.array(
                [rs[(s, v)]["light_auc"] - rs[(s, "light_only")]["light_auc"] for s in a.seeds]
            )
            sd = d.std(ddof=1)
            noise = abs(d.mean()) <= 2 * sd / math.sqrt(len(d))
            row.append(f"{d.mean():+.4f} ± {sd:.4f}" + (" (noise)" if noise else ""))
            summary[name][v] = (float(d.mean()), float(sd), bool(noise))
        ba = np.array([rs[(s, "rocket")]["booster_auc"] for s in a.seeds])
        row.append(f"{ba.mean():.4f}")
        lines.append("| " + " | ".join(row) + " |")
    md = "\n".join(lines) + "\n"
    (out / "table.md").write_text(md)
    (out / "results.json").write_text(
        json.dumps({"bayes_auc": bayes, "runs": runs, "summary": summary}, indent=1)
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    names = list(summary)
    for k, (v, c) in enumerate(
        (("rocket", "tab:blue"), ("rocket_scale0", "tab:green"), ("perfect_teacher", "tab:orange"))
    ):
        ys = [summary[n][v][0] for n in names]
        es = [summary[n][v][1] for n in names]
        ax.errorbar(
            [i + 0.15 * (k - 1) for i in range(len(names))], ys, yerr=es, fmt="o", color=c, label=v
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("light AUC − light_only")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "chart.png", dpi=90)
    print(md)
    os._exit(0)


if __name__ == "__main__":
    main()
