"""Choose optimizer defaults on validation data only (never on a test set).

    python benchmarks/tune_defaults.py [--rows 200000]

Synthetic ads_ctr data: train (seed 1) and validation (seed 2) drawn from the
hidden model that compare_modes.py tests on with a third seed (3). Prints the
validation AUC of light_only and booster_only for a small grid of table and
tower learning rates.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--sparse-lr", type=float, nargs="+", default=[0.02, 0.05, 0.15])
    ap.add_argument("--dense-lr", type=float, nargs="+", default=[1e-3, 3e-3])
    a = ap.parse_args()
    from rocketrec.cli import quiet_library_noise

    quiet_library_noise()
    from rocketrec.data.synth import SynthConfig, synth
    from rocketrec.model.loss import LossConfig
    from rocketrec.spec import load_spec
    from rocketrec.train.loop import train
    from rocketrec.train.train_config import TrainConfig

    spec = load_spec(ROOT / "feature_specs" / "ads_ctr.yaml")
    tmp = Path(tempfile.mkdtemp(prefix="tune_"))
    synth(spec, str(tmp / "train"), SynthConfig(rows=a.rows, seed=1, row_group_size=16384))
    synth(spec, str(tmp / "val"), SynthConfig(rows=50_000, seed=2))
    print(f"{'sparse_lr':>9} {'dense_lr':>8} | light_only val AUC | booster_only val AUC")
    for slr in a.sparse_lr:
        for dlr in a.dense_lr:
            res = {}
            for mode in ("light_only", "booster_only"):
                tc = TrainConfig(
                    batch_size=512, sparse_lr=slr, dense_lr=dlr, log_every=0, keep_checkpoints=1
                )
                r = train(
                    spec,
                    str(tmp / "train"),
                    str(tmp / "val"),
                    str(tmp / f"{slr}_{dlr}_{mode}"),
                    None,
                    LossConfig(mode=mode),
                    tc,
                )
                res[mode] = r["light_auc" if mode == "light_only" else "booster_auc"]
            print(
                f"{slr:>9} {dlr:>8} | {res['light_only']:.4f}             | {res['booster_only']:.4f}",
                flush=True,
            )
    os._exit(0)


if __name__ == "__main__":
    main()
