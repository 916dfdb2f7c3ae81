"""The paper's comparison on ads data: every mode and hint, same data, budget and seeds.

    # real data, k-fold (the Criteo sample is small):
    python benchmarks/compare_modes.py --spec feature_specs/criteo.yaml \
        --data ../shared/data/criteo_kaggle_sample.parquet --folds 5 --seeds 0 1 --out docs/results/criteo
    # synthetic data from `rocketrec synth` (train and test drawn from one hidden model):
    python benchmarks/compare_modes.py --spec feature_specs/ads_ctr.yaml \
        --synth-rows 400000 --seeds 0 1 2 --out docs/results/synthetic

Variants: light_only, booster_only, rocket with each hint (mimic, mse_prob,
kd), rocket kd without gradient block, rocket kd with light_shared_grad_scale
0 (light_trains_shared off), and teacher_student (kd). Each (fold, seed)
trains every variant with the same data order and step budget and reports
test AUC/logloss of both towers. Differences are paired per (fold, seed)
against light_only (light tower) and booster_only (booster), with their
standard deviation; a difference within 2 standard errors is labelled noise.
Writes OUT/results.json (every run), OUT/table.md and OUT/chart.png, plus the
C++ serving latency of the light tower and the booster (batch 1 and 256).
Nothing is tuned on the test folds: every variant runs with fixed settings.

The measure of the method's payoff, printed per run and summarised with its spread
over seeds: the share of the booster-light gap a variant's light tower closes,

    gap closed = (light AUC of the variant - light_only's) / (booster_only's - light_only's)

paired per (fold, seed). Sequence and teacher variants (a spec with `kind: sequence`
features and a `teacher:` column, e.g. feature_specs/ads_seq.yaml): booster_only_mean /
booster_only_din (the booster's attention against mean pooling and DIN's raw weights),
light_only_teacher (plain distillation from the logged score), rocket_kd_teacher
(booster and logged teacher together), light_seq_mean / rocket_kd_light_seq (the light
tower also reads the sequences as mean-pooled bags), perfect_teacher (the true click
probability as the teacher: the ceiling). Every other variant runs with
teacher_lambda 0, so the logged score teaches only where a variant says so.
`--teacher-noise` sets the logged teacher's quality in synthetic data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS: dict[str, dict[str, Any]] = {
    "light_only": {"mode": "light_only"},
    "booster_only": {"mode": "booster_only"},
    "rocket_mimic": {"hint": "mimic", "hint_weight": 0.1},
    "rocket_mse_prob": {"hint": "mse_prob", "hint_weight": 1.0},
    "rocket_kd": {"hint": "kd", "hint_weight": 1.0, "temperature": 2.0},
    "rocket_kd_no_block": {"hint": "kd", "hint_weight": 1.0, "gradient_block": False},
    "rocket_kd_scale0.25": {"hint": "kd", "hint_weight": 1.0, "light_shared_grad_scale": 0.25},
    "rocket_kd_scale0": {"hint": "kd", "hint_weight": 1.0, "light_shared_grad_scale": 0.0},
    "teacher_student_kd": {"mode": "teacher_student", "hint": "kd", "hint_weight": 1.0},
    # light-only embedding part (8-d private tables) beside the shared ones
    "rocket_kd_private8": {"hint": "kd", "light_private_dim": 8},
    "rocket_kd_private8_scale0": {
        "hint": "kd",
        "light_private_dim": 8,
        "light_shared_grad_scale": 0.0,
    },
    "light_only_private8": {"mode": "light_only", "light_private_dim": 8},
    # behaviour sequences: the booster's reading of them (attention vs pooling)
    "booster_only_mean": {"mode": "booster_only", "attention": "mean"},
    "booster_only_din": {"mode": "booster_only", "attention": "din"},
    # a logged production teacher (the spec's teacher column)
    "light_only_teacher": {"mode": "light_only", "hint": "kd", "teacher_lambda": 1.0},
    "rocket_kd_teacher": {"hint": "kd", "hint_weight": 1.0, "teacher_lambda": 1.0},
    # the light tower also reads the sequences, mean-pooled (as the fused op serves them)
    "light_seq_mean": {"mode": "light_only", "light_add_sequences": True},
    "rocket_kd_light_seq": {"hint": "kd", "hint_weight": 1.0, "light_add_sequences": True},
    # the ceiling: the true click probability as the teacher (synthetic data only)
    "perfect_teacher": {"mode": "perfect_teacher", "hint": "kd", "hint_weight": 1.0},
    # the hint's weight and temperature, for the booster and for the ceiling
    "rocket_kd_lambda4": {"hint": "kd", "hint_weight": 4.0},
    "rocket_kd_T1": {"hint": "kd", "hint_weight": 1.0, "temperature": 1.0},
    "perfect_teacher_lambda4": {"mode": "perfect_teacher", "hint": "kd", "hint_weight": 4.0},
    "perfect_teacher_T1": {"mode": "perfect_teacher", "hint": "kd", "temperature": 1.0},
    "light_only_teacher_lambda4": {"mode": "light_only", "hint": "kd", "teacher_lambda": 4.0},
}
DEFAULT_VARIANTS = [
    "light_only",
    "booster_only",
    "rocket_mimic",
    "rocket_mse_prob",
    "rocket_kd",
    "rocket_kd_no_block",
    "rocket_kd_scale0.25",
    "rocket_kd_scale0",
    "teacher_student_kd",
]
MODEL_KEYS = ("light_private_dim", "attention")
SEQUENCE_VARIANTS = (
    "booster_only_mean",
    "booster_only_din",
    "light_seq_mean",
    "rocket_kd_light_seq",
)
TEACHER_VARIANTS = ("light_only_teacher", "rocket_kd_teacher")
TRUE_CTR = "_p_true"


def gap_closed(light: float, light_only: float, booster: float) -> float:
    """Share of the booster-light gap a light tower closes (nan without a gap)."""
    gap = booster - light_only
    return (light - light_only) / gap if gap > 0 else float("nan")


def kfold_splits(data: str, spec, k: int, root: Path, row_group: int) -> list[tuple[str, str]]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rocketrec.data.reader import list_parquet_files

    fs, files = list_parquet_files(data)
    table = pa.concat_tables([pq.read_table(fs.open_input_file(f)) for f in files])
    rng = np.random.default_rng(12345)  # the split is fixed; training seeds vary
    order = rng.permutation(table.num_rows)
    folds = np.array_split(order, k)
    out = []
    for i in range(k):
        d = root / f"fold{i}"
        d.mkdir(parents=True, exist_ok=True)
        train_idx = np.sort(np.concatenate([folds[j] for j in range(k) if j != i]))
        pq.write_table(
            table.take(pa.array(train_idx)), d / "train.parquet", row_group_size=row_group
        )
        pq.write_table(
            table.take(pa.array(np.sort(folds[i]))), d / "test.parquet", row_group_size=row_group
        )
        out.append((str(d / "train.parquet"), str(d / "test.parquet")))
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    import numpy as np

    by: dict[str, dict[tuple, dict]] = {}
    for r in runs:
        by.setdefault(r["variant"], {})[(r["fold"], r["seed"])] = r
    out = {}
    for v, rs in by.items():
        keys = sorted(rs)
        s: dict[str, Any] = {"n": len(keys)}
        for m in ("light_auc", "light_logloss", "booster_auc", "booster_logloss", "train_seconds"):
            x = np.array([rs[k][m] for k in keys], dtype=float)
            s[m] = (float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0)
        if "light_only" in by and "booster_only" in by and v not in ("light_only", "booster_only"):
            g = np.array(
                [
                    gap_closed(
                        rs[k]["light_auc"],
                        by["light_only"][k]["light_auc"],
                        by["booster_only"][k]["booster_auc"],
                    )
                    for k in keys
                    if k in by["light_only"] and k in by["booster_only"]
                ]
            )
            if len(g):
                s["gap_closed"] = (float(g.mean()), float(g.std(ddof=1)) if len(g) > 1 else 0.0)
        for ref, metric in (("light_only", "light_auc"), ("booster_only", "booster_auc")):
            if ref in by and v != ref:
                d = np.array([rs[k][metric] - by[ref][k][metric] for k in keys if k in by[ref]])
                sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
                se = sd / math.sqrt(len(d)) if len(d) else 0.0
                s[f"d_{metric}"] = (float(d.mean()), sd, abs(float(d.mean())) <= 2 * se)
        out[v] = s
    return out


def fmt(mean_sd: tuple) -> str:
    return f"{mean_sd[0]:.4f} ± {mean_sd[1]:.4f}"


def fmt_diff(t: tuple | None) -> str:
    if t is None:
        return "—"
    return f"{t[0]:+.4f} ± {t[1]:.4f}" + (" (noise)" if t[2] else "")


def table_md(summary: dict, latency: dict, ceiling: float | None, meta: dict) -> str:
    lines = [
        f"Data: {meta['data']}; {meta['splits']}; seeds {meta['seeds']}; {meta['budget']}.",
        "Mean ± standard deviation over runs; differences are paired per (fold, seed) against "
        "light_only (light tower) and booster_only (booster); '(noise)' = within 2 standard errors.",
        "",
        "Gap closed = (light AUC - light_only's) / (booster_only's booster AUC - light_only's), "
        "paired per (fold, seed).",
        "",
        "| variant | light AUC | Δ light AUC vs light_only | gap closed | light logloss | "
        "booster AUC | Δ booster AUC vs booster_only | booster logloss | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        if v not in summary:
            continue
        s = summary[v]
        mode = VARIANTS[v].get("mode", "rocket")
        light_trained = mode != "booster_only"
        booster_trained = mode not in ("light_only", "perfect_teacher")
        la = fmt(s["light_auc"]) if light_trained else "(not trained)"
        ll = fmt(s["light_logloss"]) if light_trained else "—"
        ba = fmt(s["booster_auc"]) if booster_trained else "(not trained)"
        bl = fmt(s["booster_logloss"]) if booster_trained else "—"
        dl = fmt_diff(s.get("d_light_auc")) if light_trained and v != "light_only" else "—"
        db = fmt_diff(s.get("d_booster_auc")) if booster_trained and v != "booster_only" else "—"
        gc = s.get("gap_closed")
        gcs = f"{100 * gc[0]:+.0f}% ± {100 * gc[1]:.0f}%" if light_trained and gc else "—"
        lines.append(
            f"| {v} | {la} | {dl} | {gcs} | {ll} | {ba} | {db} | {bl} | "
            f"{s['train_seconds'][0]:.1f} |"
        )
    if ceiling is not None:
        lines += [
            "",
            f"Bayes ceiling (true click probability as the score) on the held-out set: AUC {ceiling:.4f}.",
        ]
    if meta.get("teacher_auc") is not None:
        lines += [
            "",
            f"Logged teacher's own AUC on the held-out set: {meta['teacher_auc']:.4f} "
            f"(synth --teacher-noise {meta.get('teacher_noise')}).",
        ]
    if latency:
        lines += [
            "",
            "C++ serving latency (rocketrec_predict --bench, 1 thread, p50 / p99 microseconds):",
            "",
            "| model | batch 1 | batch 256 |",
            "|---|---|---|",
        ]
        for name, lat in latency.items():
            lines.append(
                f"| {name} | {lat[1]['p50_us']:.0f} / {lat[1]['p99_us']:.0f} | "
                f"{lat[256]['p50_us']:.0f} / {lat[256]['p99_us']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def chart(summary: dict, out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = [v for v in VARIANTS if v in summary and v not in ("light_only", "booster_only")]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for a, key, label in (
        (ax[0], "d_light_auc", "light AUC − light_only"),
        (ax[1], "d_booster_auc", "booster AUC − booster_only"),
    ):
        ok = [
            v
            for v in vs
            if key in summary[v]
            and not (key == "d_booster_auc" and VARIANTS[v].get("mode") == "light_only")
        ]
        m = [summary[v][key][0] for v in ok]
        e = [summary[v][key][1] for v in ok]
        a.barh(ok, m, xerr=e, color=["tab:gray" if summary[v][key][2] else "tab:blue" for v in ok])
        a.axvline(0, color="black", lw=0.8)
        a.set_title(label + " (grey: noise)")
        a.grid(alpha=0.3, axis="x")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--data", help="Parquet data for k-fold runs")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument(
        "--synth-rows", type=int, default=0, help="use synthetic train/test data instead"
    )
    ap.add_argument("--synth-test-rows", type=int, default=100_000)
    ap.add_argument(
        "--synth-test-seed",
        type=int,
        default=3,
        help="seed of the held-out set (3 = test; 2 = the validation set used to choose defaults)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument(
        "--teacher-noise",
        type=float,
        default=1.0,
        help="synthetic data: the logged teacher's logit = true logit + N(0, s^2)",
    )
    a = ap.parse_args()

    from rocketrec.cli import quiet_library_noise

    quiet_library_noise()
    import pyarrow.parquet as pq

    from rocketrec.model.loss import LossConfig
    from rocketrec.model.towers import ModelConfig
    from rocketrec.spec import load_spec
    from rocketrec.train.loop import train
    from rocketrec.train.metrics import auc
    from rocketrec.train.train_config import TrainConfig

    spec = load_spec(a.spec)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="compare_"))
    ceiling = teacher_auc = None
    if a.synth_rows:
        from rocketrec.data.synth import SynthConfig, synth

        synth(
            spec,
            str(tmp / "train"),
            SynthConfig(
                rows=a.synth_rows,
                seed=1,
                row_group_size=16384,
                true_ctr_column=TRUE_CTR,
                teacher_noise=a.teacher_noise,
            ),
        )
        synth(
            spec,
            str(tmp / "test"),
            SynthConfig(
                rows=a.synth_test_rows,
                seed=a.synth_test_seed,
                true_ctr_column=TRUE_CTR,
                teacher_noise=a.teacher_noise,
            ),
        )
        splits = [(str(tmp / "train"), str(tmp / "test"))]
        t = pq.read_table(tmp / "test")
        ceiling = auc(t[spec.label_column].to_numpy(), t[TRUE_CTR].to_numpy())
        if spec.teacher_column:
            import numpy as np

            tc = t[spec.teacher_column].to_numpy(zero_copy_only=False).astype(float)
            ok = ~np.isnan(tc)
            teacher_auc = auc(t[spec.label_column].to_numpy()[ok], tc[ok])
        split_desc = (
            f"synthetic {a.synth_rows:,} train / {a.synth_test_rows:,} held-out rows "
            f"(seed {a.synth_test_seed}; one hidden model)"
        )
    else:
        splits = kfold_splits(a.data, spec, a.folds, tmp, row_group=2048)
        split_desc = f"{a.folds}-fold cross-validation"
    base_model = ModelConfig()
    runs: list[dict[str, Any]] = []
    total = len(splits) * len(a.seeds) * len(a.variants)
    t0 = time.time()
    first_ckpt: dict[str, str] = {}
    by_seed: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for fold, (tr, te) in enumerate(splits):
        for seed in a.seeds:
            for v in a.variants:
                kw = dict(VARIANTS[v])
                mkw = {k: kw.pop(k) for k in MODEL_KEYS if k in kw}
                run_spec = spec
                if kw.pop("light_add_sequences", False):
                    add = {f.name for f in spec.sequences} | set(spec.light_features)
                    names = spec.sparse_names + spec.dense_names
                    run_spec = dataclasses.replace(
                        spec, light_features=tuple(n for n in names if n in add)
                    )
                kw.setdefault("teacher_lambda", 0.0)  # the logged score teaches only if asked
                loss = LossConfig(**kw)
                model_cfg = dataclasses.replace(base_model, **mkw)
                tc = TrainConfig(
                    batch_size=a.batch_size,
                    epochs=a.epochs,
                    seed=seed,
                    log_every=0,
                    keep_checkpoints=1,
                    teacher_column=TRUE_CTR if loss.mode == "perfect_teacher" else None,
                )
                run_dir = tmp / f"run_{fold}_{seed}_{v}"
                r = train(run_spec, tr, te, str(run_dir), model_cfg, loss, tc)
                rec = {
                    "variant": v,
                    "fold": fold,
                    "seed": seed,
                    **{
                        k: r.get(k, float("nan"))  # single-tower modes report one tower
                        for k in (
                            "light_auc",
                            "light_logloss",
                            "booster_auc",
                            "booster_logloss",
                            "train_seconds",
                            "step_seconds",
                            "steps",
                        )
                    },
                }
                runs.append(rec)
                first_ckpt.setdefault(v, str(run_dir))
                if "light_only" in by_seed.get((fold, seed), {}) and "booster_only" in by_seed.get(
                    (fold, seed), {}
                ):
                    ref = by_seed[(fold, seed)]
                    rec["gap_closed"] = gap_closed(
                        rec["light_auc"],
                        ref["light_only"]["light_auc"],
                        ref["booster_only"]["booster_auc"],
                    )
                by_seed.setdefault((fold, seed), {})[v] = rec
                print(
                    f"[{len(runs)}/{total}] fold {fold} seed {seed} {v}: light auc "
                    f"{r.get('light_auc', float('nan')):.4f} booster auc "
                    f"{r.get('booster_auc', float('nan')):.4f} ({r['train_seconds']:.1f}s; "
                    f"{time.time() - t0:.0f}s elapsed)"
                    + (
                        f"; gap closed {100 * rec['gap_closed']:+.0f}%"
                        if rec.get("gap_closed") is not None
                        and v not in ("light_only", "booster_only")
                        and VARIANTS[v].get("mode") != "booster_only"
                        else ""
                    ),
                    flush=True,
                )
    summary = summarize(runs)
    latency: dict[str, Any] = {}
    if not a.no_latency and "rocket_kd" in first_ckpt and not spec.sequences:
        from bench_serving import bench, build_cpp

        from rocketrec.serving.export import export_checkpoint

        exe = build_cpp()
        export_checkpoint(first_ckpt["rocket_kd"], tmp / "light.pt", data=splits[0][1])
        export_checkpoint(
            first_ckpt["rocket_kd"], tmp / "booster.pt", booster=True, data=splits[0][1]
        )
        latency["light tower (light_only and rocket: same architecture)"] = bench(
            exe, tmp / "light.pt", 1.0
        )
        latency["booster (all features, for comparison)"] = bench(exe, tmp / "booster.pt", 1.0)
    meta = {
        "data": a.data or f"rocketrec synth for {a.spec}",
        "splits": split_desc,
        "seeds": a.seeds,
        "budget": f"{a.epochs} epoch(s), batch {a.batch_size}, default model and optimizer settings",
        "teacher_auc": teacher_auc,
        "teacher_noise": a.teacher_noise if spec.teacher_column else None,
    }
    (out / "results.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "runs": runs,
                "summary": summary,
                "latency": latency,
                "bayes_auc": ceiling,
            },
            indent=1,
        )
    )
    md = table_md(summary, latency, ceiling, meta)
    (out / "table.md").write_text(md)
    chart(summary, out / "chart.png", f"{Path(a.spec).stem}: {split_desc}")
    print(md)
    os._exit(0)


if __name__ == "__main__":
    main()
