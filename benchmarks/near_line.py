"""Near-line training measured: a followed run against a daily retrain on drifting logs,
and publish latency (partition complete -> model live in a watching C++ predictor).

    python benchmarks/near_line.py [--partitions 12] [--per-day 4] [--rows 20000]
        [--drifts 0.1,0] [--latency 3] [--json out.json]

Quality, for each drift (radians per partition, `rocketrec synth --drift`): synthetic
logs of `--partitions` hourly partitions, `--per-day` of them a day, the click model
drifting. Two ways to serve the same traffic, trained on the same rows before it:
  - followed: one `rocketrec train --follow` run over every partition; each partition is
    scored before it is trained on (its progressive metrics);
  - daily: `docs/daily_loop.md`: day d's run starts from day d-1's (`--init-from`) and
    trains on day d's partitions; it serves day d+1, whose partitions it is scored on.
Compared on the partitions of days 1.. (day 0 has no daily model yet): light and booster
AUC and light NE, each the mean over those partitions, and the difference
followed - daily per day. The daily model has seen every row of earlier days; the
followed one also the earlier partitions of the same day: the gap is what near-line
buys against drift (drift 0 is the control: only fresher data, no moving target).

Latency (`--latency N`, needs deploy/cpp/build/rocketrec_predict): a followed run with
`--publish-every 1` and `rocketrec_predict --watch RUN/published`; N partitions written
one at a time; for each, seconds from its `_SUCCESS` to the predictor's "now serving"
line for the model trained on it, and the publish step's own seconds (export, parity
and NE gates) from `published/log.jsonl`.

Runs in a temporary directory (deleted); about 6 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
PREDICT = ROOT / "deploy" / "cpp" / "build" / "rocketrec_predict"
COMMON = ["--batch-size", "512", "--log-every", "0", "--no-tensorboard"]


def _rocketrec(*args: str, **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    exe = BIN / "rocketrec"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rocketrec.cli"]
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(
            f"rocketrec {' '.join(args[:2])} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
        )
    return r


def _logs(spec: str, root: Path, parts: int, rows: int, drift: float) -> None:
    from rocketrec.data.synth import SynthConfig, synth
    from rocketrec.spec import load_spec

    cfg = SynthConfig(rows=rows, seed=1, partitions=parts, drift=drift, ctr=0.1)
    synth(load_spec(spec), str(root), cfg)


def _followed(spec: str, logs: Path, run: Path) -> dict[str, dict]:
    _rocketrec("train", "--spec", spec, "--train", str(logs), "--out", str(run), "--follow",
               "--follow-poll", "0.2", "--until-idle", "1", "--no-export", *COMMON)  # fmt: skip
    from rocketrec.evaluation.compare import progressive_by_partition

    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return progressive_by_partition(recs)


def _daily(spec: str, logs: Path, runs: Path, parts: int, per_day: int) -> dict[str, dict]:
    """Each partition of days 1.. scored by the previous day's model."""
    from rocketrec.data.synth import partition_name
    from rocketrec.evaluation import evaluate_model

    days = parts // per_day
    out: dict[str, dict] = {}
    for d in range(days):
        names = [partition_name(k) for k in range(d * per_day, (d + 1) * per_day)]
        if d > 0:  # yesterday's model serves today: score it on today's partitions
            for n in names:
                rep = evaluate_model(runs / f"day{d - 1}", str(logs / n), quiet=True)
                out[n] = {f"{t}_{k}": v for t, m in rep["towers"].items() for k, v in m.items()}
        if d == days - 1:
            break
        init = ["--init-from", str(runs / f"day{d - 1}")] if d > 0 else []
        _rocketrec("train", "--spec", spec, "--train", *[str(logs / n) for n in names],
                   "--out", str(runs / f"day{d}"), "--no-export", *init, *COMMON)  # fmt: skip
    return out


def quality(spec: str, parts: int, per_day: int, rows: int, drift: float, tmp: Path) -> dict:
    import numpy as np

    base = tmp / f"drift{drift}"
    logs = base / "logs"
    t = time.time()
    _logs(spec, logs, parts, rows, drift)
    followed = _followed(spec, logs, base / "followed")
    t_follow = time.time() - t
    t = time.time()
    daily = _daily(spec, logs, base / "daily", parts, per_day)
    t_daily = time.time() - t
    keys = ("light_auc", "light_ne", "booster_auc")
    res: dict = {"drift": drift, "partitions": parts, "per_day": per_day, "rows": rows,
                 "followed_s": t_follow, "daily_s": t_daily, "per_partition": {}}  # fmt: skip
    for n in daily:
        res["per_partition"][n] = {
            **{f"followed_{k}": followed[n][k] for k in keys},
            **{f"daily_{k}": daily[n][k] for k in keys},
        }
    pp = res["per_partition"].values()
    for k in keys:
        f = np.array([r[f"followed_{k}"] for r in pp])
        d = np.array([r[f"daily_{k}"] for r in pp])
        res[f"followed_{k}"], res[f"daily_{k}"] = float(f.mean()), float(d.mean())
        res[f"gain_{k}"] = float((f - d).mean())
        days = (f - d).reshape(-1, per_day).mean(1)
        res[f"gain_{k}_per_day"] = [float(x) for x in days]
    return res


def latency(spec: str, rows: int, drift: float, n: int, tmp: Path) -> dict:
    """Seconds from each new partition's _SUCCESS to a watching predictor serving the
    model trained on it (module docstring)."""
    from rocketrec.data.synth import SynthConfig, partition_name, synth
    from rocketrec.spec import load_spec

    sp, logs, run = load_spec(spec), tmp / "lat_logs", tmp / "lat_run"
    synth(sp, str(logs), SynthConfig(rows=rows, seed=2, partitions=1, drift=drift, ctr=0.1))
    job = subprocess.Popen(
        [
            str(BIN / "rocketrec"),
            "train",
            "--spec",
            spec,
            "--train",
            str(logs),
            "--out",
            str(run),
            "--follow",
            "--follow-poll",
            "0.5",
            "--publish-every",
            "1",
            "--max-ne-regression",
            "1.0",
            "--no-export",
            *COMMON,
        ],  # fmt: skip
        stdout=open(tmp / "lat_job.txt", "w"),
        stderr=subprocess.STDOUT,
    )
    pub = run / "published"
    served: list[tuple[float, str]] = []
    pred = None
    try:
        while not (pub / "LATEST").exists():
            if job.poll() is not None:
                raise SystemExit((tmp / "lat_job.txt").read_text()[-3000:])
            time.sleep(0.2)
        pred = subprocess.Popen([str(PREDICT), "--watch", str(pub), "-"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip

        def read() -> None:
            assert pred is not None and pred.stderr is not None
            for line in pred.stderr:
                if "now serving" in line or "serving " in line:
                    served.append((time.time(), line.strip()))

        threading.Thread(target=read, daemon=True).start()
        while not served:
            time.sleep(0.1)
        out = []
        for k in range(1, n + 1):
            before = len(served)
            synth(sp, str(logs), SynthConfig(rows=rows, seed=2, partitions=1, first_partition=k,
                                             drift=drift, ctr=0.1))  # fmt: skip
            t0 = (logs / partition_name(k) / "_SUCCESS").stat().st_mtime
            end = time.time() + 300
            while len(served) == before and time.time() < end:
                time.sleep(0.02)
            if len(served) == before:
                raise SystemExit(f"partition {k}: no swap within 300 s")
            log = [json.loads(x) for x in (pub / "log.jsonl").read_text().splitlines()]
            out.append({"partition": k, "seconds": served[-1][0] - t0,
                        "publish_seconds": log[-1].get("seconds"), "line": served[-1][1]})  # fmt: skip
            print(f"latency: partition {k}: live after {out[-1]['seconds']:.1f}s "
                  f"(publish step {out[-1]['publish_seconds']:.1f}s)", flush=True)  # fmt: skip
    finally:
        job.terminate()
        if pred is not None:
            pred.kill()
        job.wait(timeout=120)
    size = sum(f.stat().st_size for f in pub.rglob("light.pt"))
    return {"rows_per_partition": rows, "swaps": out,
            "published_file_bytes": size // max(len(list(pub.rglob("light.pt"))), 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "feature_specs" / "ads_ctr.yaml"))
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--per-day", type=int, default=4)
    p.add_argument("--rows", type=int, default=20000, help="rows per partition")
    p.add_argument("--drifts", default="0.1,0", help="radians per partition, comma-separated")
    p.add_argument("--latency", type=int, default=3, help="partitions timed (0: skip)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.partitions % a.per_day or a.partitions // a.per_day < 2:
        raise SystemExit("--partitions must be a multiple of --per-day, two days at least")
    results: dict = {"quality": [], "latency": None}
    with tempfile.TemporaryDirectory(prefix="near_line_") as d:
        tmp = Path(d)
        for drift in [float(x) for x in a.drifts.split(",")]:
            r = quality(a.spec, a.partitions, a.per_day, a.rows, drift, tmp)
            results["quality"].append(r)
            print(f"drift {drift} rad/partition, {a.partitions} partitions x {a.rows:,} rows, "
                  f"{a.per_day} a day; mean over days 1..:")  # fmt: skip
            for k in ("light_auc", "light_ne", "booster_auc"):
                per_day = " ".join(f"{x:+.4f}" for x in r[f"gain_{k}_per_day"])
                print(f"  {k:12s} followed {r[f'followed_{k}']:.4f}  daily {r[f'daily_{k}']:.4f}"
                      f"  followed - daily {r[f'gain_{k}']:+.4f}  (per day: {per_day})")  # fmt: skip
            print(f"  wall: followed run {r['followed_s']:.0f}s, daily runs {r['daily_s']:.0f}s")
        if a.latency:
            if not PREDICT.exists():
                print(f"latency: skipped ({PREDICT} not built: cmake in deploy/cpp/build)")
            else:
                results["latency"] = latency(a.spec, a.rows, 0.1, a.latency, tmp)
                s = sorted(x["seconds"] for x in results["latency"]["swaps"])
                print(f"latency: partition complete -> live in the predictor: median "
                      f"{s[len(s) // 2]:.1f}s over {len(s)} (rows per partition {a.rows:,})")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
