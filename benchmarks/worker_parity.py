"""Same model whatever the worker count: W workers x (global batch / W), paired over seeds.

    python benchmarks/worker_parity.py --out docs/results/worker_parity \
        [--workers 1 2 4] [--seeds 0 1 2] [--rows 200000] [--global-batch 1024]

Synthetic ads_ctr logs (`--rows` training rows in 8 files, 40k validation rows,
one hidden model). For each seed and each W, W gloo processes on loopback run
rocketrec's training loop (the same code a Ray worker runs) for one epoch at
the same global batch, then evaluate on the validation rows. Prints per W the
booster and light AUC and the paired difference against W = 1 (mean ± sd over
seeds, each seed the same data order seed), and writes table.md/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _worker(
    rank: int, world: int, spec: str, train_p: str, val_p: str, out: str, seed: int, batch: int
) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from rocketrec.spec import load_spec
    from rocketrec.train.loop import train
    from rocketrec.train.train_config import TrainConfig

    res = train(
        load_spec(spec),
        train_p,
        val_p,
        out,
        None,
        None,
        TrainConfig(batch_size=batch, epochs=1, seed=seed, log_every=0),
    )
    if rank == 0:
        Path(out, "result.json").write_text(json.dumps(res, default=float))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, spec: str, train_p: str, val_p: str, out: Path, seed: int, gb: int) -> dict:
    env = dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1"
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                str(r),
                str(world),
                spec,
                train_p,
                val_p,
                str(out),
                str(seed),
                str(gb // world),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    errs = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("worker failed:\n" + "\n".join(e[-2000:] for e in errs))
    return json.loads((out / "result.json").read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        r, w, spec, tr, va, out, seed, b = sys.argv[2:10]
        _worker(int(r), int(w), spec, tr, va, out, int(seed), int(b))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "feature_specs" / "ads_ctr.yaml"))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--global-batch", type=int, default=1024)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from rocketrec.data.synth import SynthConfig, synth
    from rocketrec.spec import load_spec

    spec = load_spec(a.spec)
    tmp = tempfile.TemporaryDirectory(prefix="worker_parity_")
    root = Path(tmp.name)
    synth(spec, str(root / "train"), SynthConfig(rows=a.rows, seed=1, files=8, row_group_size=8192))
    synth(spec, str(root / "val"), SynthConfig(rows=40_000, seed=3, files=1))
    runs = []
    for seed in a.seeds:
        for w in a.workers:
            res = run(
                w,
                a.spec,
                str(root / "train"),
                str(root / "val"),
                root / f"run_{seed}_{w}",
                seed,
                a.global_batch,
            )
            rec = {
                "seed": seed,
                "workers": w,
                **{
                    k: res[k]
                    for k in ("booster_auc", "light_auc", "rows_seen", "rows_unused", "steps")
                },
            }
            runs.append(rec)
            print(
                f"seed {seed} W {w}: booster auc {rec['booster_auc']:.4f} light auc "
                f"{rec['light_auc']:.4f} ({rec['steps']} steps, {rec['rows_unused']} rows unused)",
                flush=True,
            )
    base = {x["seed"]: x for x in runs if x["workers"] == a.workers[0]}
    lines = [
        f"| W | batch per worker | booster AUC | Δ booster vs W={a.workers[0]} | light AUC | "
        f"Δ light vs W={a.workers[0]} | rows unused / epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in a.workers:
        rs = [x for x in runs if x["workers"] == w]
        db = [x["booster_auc"] - base[x["seed"]]["booster_auc"] for x in rs]
        dl = [x["light_auc"] - base[x["seed"]]["light_auc"] for x in rs]
        lines.append(
            f"| {w} | {a.global_batch // w} | {np.mean([x['booster_auc'] for x in rs]):.4f} ± "
            f"{np.std([x['booster_auc'] for x in rs]):.4f} | "
            + (f"{np.mean(db):+.4f} ± {np.std(db):.4f}" if w != a.workers[0] else "—")
            + f" | {np.mean([x['light_auc'] for x in rs]):.4f} ± "
            f"{np.std([x['light_auc'] for x in rs]):.4f} | "
            + (f"{np.mean(dl):+.4f} ± {np.std(dl):.4f}" if w != a.workers[0] else "—")
            + f" | {int(np.mean([x['rows_unused'] for x in rs]))} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(runs, indent=1))
    (out / "table.md").write_text(table + "\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
