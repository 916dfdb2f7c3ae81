"""Negative downsampling: quality and cost of training on a share r of the non-clicks.

    python benchmarks/downsampling.py --out docs/results/downsampling \
        [--rates 1 0.5 0.25 0.1] [--seeds 0 1 2] [--synth-rows 400000]
    python benchmarks/downsampling.py --out docs/results/downsampling_criteo \
        --spec feature_specs/criteo.yaml --data ../shared/data/criteo_kaggle_sample.parquet

Synthetic mode: `rocketrec synth` ads_ctr logs (train seed 1, validation seed 3,
one hidden model), with the spec's `group` set to the user id, so GAUC is
reported. Data mode: a fixed 80/20 split of the given file. For every rate r
and seed, rocketrec's loop (1 worker, default method) trains one epoch on the
training rows with `negative_sample_rate=r`; evaluation runs on the full
validation rows with the probabilities corrected (sigmoid(logit + log r)).
Prints and writes (table.md, results.json) per rate: light and booster AUC,
GAUC, NE, calibration and training time per epoch, with paired differences
against r = 1 (mean ± sd over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = ("light_auc", "booster_auc", "light_gauc", "light_ne", "light_calibration")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "feature_specs" / "ads_ctr.yaml"))
    ap.add_argument("--data", default=None, help="Parquet file split 80/20 (else synthetic)")
    ap.add_argument("--group", default="user_id", help="group column for GAUC (synthetic)")
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--synth-rows", type=int, default=400_000)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import dataclasses

    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    from rocketrec.data.synth import SynthConfig, synth
    from rocketrec.model.towers import ModelConfig
    from rocketrec.spec import load_spec
    from rocketrec.train.loop import train
    from rocketrec.train.train_config import TrainConfig

    spec = load_spec(a.spec)
    tmp = tempfile.TemporaryDirectory(prefix="downsampling_")
    root = Path(tmp.name)
    if a.data is None:
        spec = dataclasses.replace(spec, group_column=a.group)
        synth(spec, str(root / "train"), SynthConfig(rows=a.synth_rows, seed=1, files=4))
        synth(spec, str(root / "val"), SynthConfig(rows=100_000, seed=3, files=1))
        train_p, val_p = str(root / "train"), str(root / "val")
    else:
        t = pq.read_table(a.data)
        idx = np.random.default_rng(0).permutation(t.num_rows)
        cut = int(0.8 * t.num_rows)
        (root / "train").mkdir()
        (root / "val").mkdir()
        pq.write_table(
            t.take(np.sort(idx[:cut])), root / "train" / "part-0.parquet", row_group_size=2048
        )
        pq.write_table(t.take(np.sort(idx[cut:])), root / "val" / "part-0.parquet")
        train_p, val_p = str(root / "train"), str(root / "val")
    runs = []
    for seed in a.seeds:
        for r in a.rates:
            t0 = time.time()
            res = train(
                spec,
                train_p,
                val_p,
                str(root / f"run_{seed}_{r}"),
                ModelConfig(),
                None,
                TrainConfig(
                    batch_size=a.batch_size,
                    epochs=1,
                    seed=seed,
                    log_every=0,
                    negative_sample_rate=r,
                ),
            )
            rec = {"seed": seed, "rate": r, "epoch_seconds": time.time() - t0}
            rec["step_seconds"] = res["step_seconds"]
            rec["rows_seen"] = res["rows_seen"]
            for m in (*METRICS, "booster_gauc", "booster_ne", "booster_calibration"):
                rec[m] = res.get(m, float("nan"))
            runs.append(rec)
            print(
                f"seed {seed} r {r}: light auc {rec['light_auc']:.4f} gauc {rec['light_gauc']:.4f} "
                f"ne {rec['light_ne']:.4f} cal {rec['light_calibration']:.3f} | booster auc "
                f"{rec['booster_auc']:.4f} | {rec['rows_seen']:,} rows in {rec['epoch_seconds']:.1f}s",
                flush=True,
            )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(runs, indent=1))
    base = {rec["seed"]: rec for rec in runs if rec["rate"] == 1.0}
    lines = [
        "| r | light AUC | Δ vs r=1 | booster AUC | light GAUC | light NE | light calibration "
        "| rows trained | epoch s | epoch time / r=1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(xs: list[float]) -> str:
        xs = [x for x in xs if not np.isnan(x)]
        return f"{np.mean(xs):.4f} ± {np.std(xs):.4f}" if xs else "n/a"

    for r in a.rates:
        rs = [x for x in runs if x["rate"] == r]
        d = [x["light_auc"] - base[x["seed"]]["light_auc"] for x in rs if x["seed"] in base]
        tr = [
            x["epoch_seconds"] / base[x["seed"]]["epoch_seconds"] for x in rs if x["seed"] in base
        ]
        lines.append(
            f"| {r:g} | {ms([x['light_auc'] for x in rs])} | {ms(d) if r != 1.0 else '—'} | "
            f"{ms([x['booster_auc'] for x in rs])} | {ms([x['light_gauc'] for x in rs])} | "
            f"{ms([x['light_ne'] for x in rs])} | {ms([x['light_calibration'] for x in rs])} | "
            f"{int(np.mean([x['rows_seen'] for x in rs])):,} | "
            f"{np.mean([x['epoch_seconds'] for x in rs]):.1f} | {np.mean(tr):.2f} |"
        )
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)
    tmp.cleanup()


if __name__ == "__main__":
    main()
