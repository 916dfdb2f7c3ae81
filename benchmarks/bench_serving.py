"""Serving: light vs booster latency from the C++ predictor, candidates, threads, int8.

    python benchmarks/bench_serving.py [--checkpoint RUN_DIR] [--seconds 1.0]

Without --checkpoint it trains a short rocket run on `rocketrec synth` data
for feature_specs/ads_ctr.yaml. It exports the light tower (fp32 and int8)
and, for comparison only, the booster packaged the same way (all features,
same serving module), builds deploy/cpp with CMake, and prints from
`rocketrec_predict --bench` (one intra-op thread, same process per model):
p50/p99 at batch 1/16/256 with booster/light ratios; one context x 200
candidates against the same 200 merged rows sent as a batch; requests/s of
two threads sharing one Predictor against one thread; file sizes and the max
|p_int8 - p_fp32| on held-out rows. Ratios are printed against their targets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_cpp() -> Path:
    import torch

    build = ROOT / "deploy" / "cpp" / "build"
    exe = build / "rocketrec_predict"
    subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT / "deploy" / "cpp"),
            "-B",
            str(build),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    return exe


def bench(exe: Path, model: Path, seconds: float) -> dict:
    out = subprocess.run(
        [str(exe), str(model), "--bench", "--seconds", str(seconds)],
        check=True,
        capture_output=True,
        text=True,
    )
    res: dict = {}
    for r in (json.loads(x) for x in out.stdout.splitlines()):
        res[r["batch"] if r["mode"] == "batch" else r["mode"]] = r
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--seconds", type=float, default=1.0, help="per batch size")
    ap.add_argument("--rows", type=int, default=200_000, help="training rows when no checkpoint")
    a = ap.parse_args()

    from rocketrec.cli import quiet_library_noise

    quiet_library_noise()
    import pyarrow.parquet as pq
    import torch

    from rocketrec.data.synth import SynthConfig, synth
    from rocketrec.serving.export import export_checkpoint
    from rocketrec.serving.manifest import read_manifest
    from rocketrec.serving.requests import raw_inputs_from_table
    from rocketrec.spec import load_spec, spec_from_dict
    from rocketrec.train.loop import TrainConfig, train

    tmp = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    spec = load_spec(ROOT / "feature_specs" / "ads_ctr.yaml")
    val = tmp / "val"
    synth(spec, str(val), SynthConfig(rows=20_000, seed=2))
    ckpt = a.checkpoint
    if ckpt is None:
        synth(spec, str(tmp / "train"), SynthConfig(rows=a.rows, seed=1, row_group_size=16384))
        train(
            spec,
            str(tmp / "train"),
            str(val),
            str(tmp / "run"),
            train_cfg=TrainConfig(batch_size=1024, log_every=0),
        )
        ckpt = str(tmp / "run")
    light, light8, booster = tmp / "light.pt", tmp / "light_int8.pt", tmp / "booster.pt"
    r_fp = export_checkpoint(ckpt, light, data=str(val))
    r_q = export_checkpoint(ckpt, light8, int8=True, data=str(val))
    r_b = export_checkpoint(ckpt, booster, booster=True, data=str(val))
    exe = build_cpp()
    lb, bb = bench(exe, light, a.seconds), bench(exe, booster, a.seconds)
    qb = bench(exe, light8, a.seconds)
    man = read_manifest(light)
    mspec = spec_from_dict(man["spec"])
    light_spec = mspec  # light features only are read by raw_inputs_from_table
    t = pq.read_table(val).slice(0, 5000)
    x = raw_inputs_from_table(t, light_spec)
    with torch.no_grad():
        diff = float((torch.jit.load(str(light))(*x) - torch.jit.load(str(light8))(*x)).abs().max())
    m = man["metrics"]
    print(
        f"model: {man['spec']['name']}; light reads {len(man['sparse_features'])} sparse + "
        f"{len(man['dense_features'])} dense features, booster all {len(mspec.sparse)} + {len(mspec.dense)}"
    )
    if "light_auc" in m and "booster_auc" in m:
        print(
            f"validation AUC: booster {m['booster_auc']:.4f}, light {m['light_auc']:.4f} "
            f"(difference {m['booster_auc'] - m['light_auc']:+.4f})"
        )
    print("C++ latency, 1 thread, microseconds (model forward on prebuilt inputs)")
    print(
        f"{'batch':>5} | {'light p50':>9} {'p99':>7} | {'int8 p50':>8} {'p99':>7} | "
        f"{'booster p50':>11} {'p99':>7} | booster/light p50"
    )
    for b in (1, 16, 256):
        print(
            f"{b:>5} | {lb[b]['p50_us']:>9.1f} {lb[b]['p99_us']:>7.1f} | {qb[b]['p50_us']:>8.1f} "
            f"{qb[b]['p99_us']:>7.1f} | {bb[b]['p50_us']:>11.1f} {bb[b]['p99_us']:>7.1f} | "
            f"{bb[b]['p50_us'] / lb[b]['p50_us']:.2f}x"
        )
    c, th = lb["candidates"], lb["threads"]
    print(
        f"1 context x {c['candidates']} candidates (context: {c['context']}): p50 "
        f"{c['p50_us']:.1f} us vs the same rows as a batch {c['batch_p50_us']:.1f} us "
        f"(max |diff| {c['max_abs_diff']:.2g})"
    )
    print(f"requests/s, one Predictor: 1 thread {th['rps_1']:.0f}, 2 threads {th['rps']:.0f}")
    print(
        f"ratio booster/light p50 at batch 1:   {bb[1]['p50_us'] / lb[1]['p50_us']:.2f}  (target >= 3)"
    )
    print(
        f"ratio booster/light p50 at batch 256: {bb[256]['p50_us'] / lb[256]['p50_us']:.2f}  "
        "(target >= 10)"
    )
    print(
        f"ratio candidates / batch p50 (light):  {c['p50_us'] / c['batch_p50_us']:.2f}  "
        "(target <= 0.5)"
    )
    print(f"ratio 2 threads / 1 thread requests/s: {th['ratio']:.2f}  (target >= 1.7)")
    print(
        f"light file: fp32 {r_fp['bytes']:,} bytes, int8 {r_q['bytes']:,} bytes "
        f"({r_fp['bytes'] / r_q['bytes']:.2f}x smaller); booster fp32 {r_b['bytes']:,} bytes"
    )
    print(
        f"max |p_int8 - p_fp32| on {len(t):,} held-out rows: {diff:.2e} "
        f"(export parity: fp32 {r_fp['max_abs_diff']:.1e}, int8 {r_q['max_abs_diff']:.1e})"
    )
    os._exit(0)


if __name__ == "__main__":
    main()
