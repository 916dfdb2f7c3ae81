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

    python benchmarks/sweep_regimes.py --sequences --out docs/results/seq_regimes

`--sequences`: the behaviour-sequence spec (feature_specs/ads_seq.yaml: the booster
attends over the last 50 clicked ads and their categories; a logged `pctr` column)
instead. Variants: light_only, booster_only (attention), rocket (kd), the light tower
with the sequences mean-pooled (light_seq_mean), and for a logged teacher of three
qualities (`--teacher-noises`, the teacher's logit = true logit + N(0, s^2)): plain
distillation from it (light_only_teacher) and rocket with it (rocket_teacher). Each is
reported as light AUC and the share of the booster-light gap it closes,
(light - light_only) / (booster_only - light_only), paired per seed.
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


SEQ_VARIANTS = {
    "light_only": ({"mode": "light_only"}, False),
    "booster_only": ({"mode": "booster_only"}, False),
    "rocket": ({}, False),
    "light_seq_mean": ({"mode": "light_only"}, True),  # the light tower reads the sequences
}
TEACHER_VARIANTS = {
    "light_only_teacher": {"mode": "light_only", "teacher_lambda": 1.0},
    "rocket_teacher": {"teacher_lambda": 1.0},
}


def sequence_regimes(a: argparse.Namespace) -> None:
    """The sequence spec: booster with attention, light with and without the sequences,
    a logged teacher of several qualities alone and with the booster."""
    import numpy as np
    import pyarrow.parquet as pq

    from rocketrec.data.synth import SynthConfig, synth
    from rocketrec.model.loss import LossConfig
    from rocketrec.model.towers import ModelConfig
    from rocketrec.spec import load_spec
    from rocketrec.train.loop import train
    from rocketrec.train.metrics import auc
    from rocketrec.train.train_config import TrainConfig

    spec = load_spec(ROOT / "feature_specs" / "ads_seq.yaml")
    seq_light = dataclasses.replace(
        spec,
        light_features=tuple(
            n
            for n in spec.sparse_names + spec.dense_names
            if n in set(spec.light_features) | {f.name for f in spec.sequences}
        ),
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="seq_regimes_"))
    data, teacher_auc = {}, {}
    for s in a.teacher_noises:
        d = tmp / f"noise{s}"
        synth(
            spec,
            str(d / "train"),
            SynthConfig(rows=a.rows, seed=1, row_group_size=16384, teacher_noise=s),
        )  # noqa: E501
        synth(
            spec,
            str(d / "test"),
            SynthConfig(rows=100_000, seed=3, teacher_noise=s, true_ctr_column="p_true"),
        )  # noqa: E501
        t = pq.read_table(d / "test")
        p = t["pctr"].to_numpy(zero_copy_only=False).astype(float)
        ok = ~np.isnan(p)
        teacher_auc[s] = auc(t["click"].to_numpy()[ok], p[ok])
        data[s] = d
        print(f"teacher noise {s}: teacher AUC {teacher_auc[s]:.4f} on the test set", flush=True)
    bayes = auc(t["click"].to_numpy(), t["p_true"].to_numpy())
    base = data[a.teacher_noises[0]]
    runs: list[dict] = []

    def run(name: str, kw: dict, d: Path, light_seq: bool, seed: int) -> None:
        kw = {"teacher_lambda": 0.0, **kw}
        res = train(
            seq_light if light_seq else spec,
            str(d / "train"),
            str(d / "test"),
            str(tmp / f"run_{len(runs)}"),
            ModelConfig(),
            LossConfig(**kw),
            TrainConfig(batch_size=a.batch_size, seed=seed, log_every=0, keep_checkpoints=1),
        )
        runs.append(
            {
                "variant": name,
                "seed": seed,
                **{k: res.get(k, float("nan")) for k in ("light_auc", "booster_auc")},
            }
        )  # noqa: E501
        print(
            f"seq | seed {seed} | {name}: light AUC {runs[-1]['light_auc']:.4f} booster AUC {runs[-1]['booster_auc']:.4f}",
            flush=True,
        )  # noqa: E501

    for seed in a.seeds:
        for v, (kw, light_seq) in SEQ_VARIANTS.items():
            run(v, kw, base, light_seq, seed)
        for s in a.teacher_noises:
            for v, kw in TEACHER_VARIANTS.items():
                run(f"{v} (noise {s}, teacher AUC {teacher_auc[s]:.3f})", kw, data[s], False, seed)
    by = {(r["variant"], r["seed"]): r for r in runs}
    lines = [
        f"Spec ads_seq.yaml, {a.rows:,} training rows, 1 epoch, batch {a.batch_size}, seeds "
        f"{a.seeds}; test 100,000 rows (Bayes AUC {bayes:.4f}). Gap closed = (light - "
        "light_only) / (booster_only - light_only), paired per seed (mean ± sd).",
        "",
        "| variant | light AUC | booster AUC | gap closed |",
        "|---|---|---|---|",
    ]
    summary: dict = {"bayes_auc": bayes, "teacher_auc": teacher_auc}
    for v in dict.fromkeys(r["variant"] for r in runs):
        la = np.array([by[(v, s)]["light_auc"] for s in a.seeds])
        ba = np.array([by[(v, s)]["booster_auc"] for s in a.seeds])
        gap = np.array(
            [
                (by[(v, s)]["light_auc"] - by[("light_only", s)]["light_auc"])
                / (by[("booster_only", s)]["booster_auc"] - by[("light_only", s)]["light_auc"])
                for s in a.seeds
            ]
        )
        sd = float(gap.std(ddof=1)) if len(gap) > 1 else 0.0
        light_trained = v != "booster_only"
        lines.append(
            f"| {v} | {f'{la.mean():.4f} ± {la.std(ddof=1) if len(la) > 1 else 0:.4f}' if light_trained else '—'} "  # noqa: E501
            f"| {f'{np.nanmean(ba):.4f}' if not np.isnan(ba).all() else '—'} "
            f"| {f'{100 * gap.mean():+.0f}% ± {100 * sd:.0f}%' if light_trained and v != 'light_only' else '—'} |"  # noqa: E501
        )
        summary[v] = {"light_auc": float(la.mean()), "gap_closed": float(gap.mean()), "gap_sd": sd}
    md = "\n".join(lines) + "\n"
    (out / "table.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    print(md)
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES))
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--sequences", action="store_true", help="the sequence spec's regimes")
    ap.add_argument("--rows", type=int, default=400_000, help="--sequences: training rows")
    ap.add_argument(
        "--teacher-noises", type=float, nargs="+", default=[1.0, 2.5, 4.0], help="--sequences"
    )
    a = ap.parse_args()
    from rocketrec.cli import quiet_library_noise

    quiet_library_noise()
    if a.sequences:
        sequence_regimes(a)
    import numpy as np
    import pyarrow.parquet as pq

    from rocketrec.data.synth import SynthConfig, synth
    from rocketrec.model.loss import LossConfig
    from rocketrec.model.towers import ModelConfig
    from rocketrec.spec import load_spec
    from rocketrec.train.loop import train
    from rocketrec.train.metrics import auc
    from rocketrec.train.train_config import TrainConfig

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
