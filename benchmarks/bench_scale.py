"""Memory scale-out: one N-row x 16 table, born sharded row-wise over W Ray workers.

    python benchmarks/bench_scale.py --rows 50000000 --workers 2 [--steps 300]

Spec: feature_specs/ads_ctr.yaml with its `users` table raised to N rows x 16
(read by both towers: user_id is in the light subset). Steps, each a separate
process of the real entry points, with every process tree's resident memory
sampled by psutil (driver, Ray's own processes and the training workers):

  1. `rocketrec synth` a small training set (the table's size, not the data's, is
     what is measured);
  2. `jobs/ads_train.py --workers W --sharding users=row_wise` for --steps steps,
     one checkpoint at the end (embedded loopback-only local Ray);
  3. the same with `--resume` for --resume-steps more steps (reads the checkpoint
     back, writes another) with --resume-workers workers (default W);
  4. `rocketrec export --int8` of the run (streams the light tower's tables);
  5. with --cpp: the C++ predictor (deploy/cpp, built with CMake) scores 64
     requests from the data with the exported file, compared with
     `rocketrec predict` (Python) on the same requests.

Prints: table bytes, peak RSS per worker, the ratio peak-per-worker / (table
bytes / W) (target <= 1.5 at N = 50M, W = 2), peak of the export process, the
run directory's bytes on disk and steps/s. `--json FILE` also writes them.
The run directory is deleted at the end unless --keep (big runs fill disks).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class TreeSampler:
    """Samples the RSS of a process and all its descendants every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_total = 0
        self.peak_by_pid: dict[int, int] = {}
        self.name_by_pid: dict[int, str] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    # Ray renames its workers (ray::IDLE -> ray::RayTrainWorker...): keep all
                    name = " ".join(p.cmdline())[:120]
                    if name not in self.name_by_pid.get(p.pid, ""):
                        self.name_by_pid[p.pid] = self.name_by_pid.get(p.pid, "") + " | " + name
                except psutil.Error:
                    continue
                total += rss
                self.peak_by_pid[p.pid] = max(self.peak_by_pid.get(p.pid, 0), rss)
            self.peak_total = max(self.peak_total, total)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()

    def peaks_matching(self, pattern: str) -> list[int]:
        return [
            v for pid, v in self.peak_by_pid.items() if pattern in self.name_by_pid.get(pid, "")
        ]


def run_sampled(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[TreeSampler, float]:
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler = TreeSampler(proc.pid)
        rc = proc.wait()
        sampler.stop()
    if rc != 0:
        sys.exit(f"bench_scale: command failed ({rc}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return sampler, time.time() - t0


def score_in_cpp(model: Path, data: Path, work: Path) -> float:
    """Build deploy/cpp, score requests from `data` in C++ and in Python; max |diff|."""
    import torch

    build = ROOT / "deploy" / "cpp" / "build"
    if not (build / "rocketrec_predict").exists():
        subprocess.run(
            ["cmake", "-S", str(ROOT / "deploy" / "cpp"), "-B", str(build)]
            + [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
            check=True,
            capture_output=True,
        )
        subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    req = work / "requests.jsonl"
    subprocess.run(
        [str(BIN / "rocketrec"), "requests", "--model", str(model), "--data", str(data)]
        + ["--rows", "64", "--out", str(req)],
        check=True,
    )
    cpp = subprocess.run(
        [str(build / "rocketrec_predict"), str(model), str(req)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    py = subprocess.run(
        [str(BIN / "rocketrec"), "predict", "--model", str(model), "--requests", str(req)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert len(cpp) == len(py) > 0, (len(cpp), len(py))
    return max(abs(float(x) - float(y)) for x, y in zip(cpp, py, strict=True))


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def _publish(run: Path, newest: Path, work: Path, env: dict, name: str) -> dict:
    """`rocketrec publish RUN --data NEWEST`, memory sampled: its wall time, the published
    file's size and the process's peak."""
    import pyarrow.parquet as pq

    print(f"== {name}: rocketrec publish (fp32)")
    s, t = run_sampled(
        [str(BIN / "rocketrec"), "publish", str(run), "--data", str(newest)],
        work / f"{name}.log",
        env,
    )
    pub = run / "published"
    log = [json.loads(x) for x in (pub / "log.jsonl").read_text().splitlines()]
    f = pub / (pub / "LATEST").read_text().strip() / "light.pt"
    line = (work / f"{name}.log").read_text().strip().splitlines()[-1]
    return {"wall_s": t, "file_bytes": f.stat().st_size, "peak": s.peak_total, "line": line,
            "log": log[-1], "ne_rows": pq.read_metadata(newest).num_rows}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000_000, help="rows of the big table")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--resume-workers", type=int, default=None, help="default: --workers")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--resume-steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--data-rows", type=int, default=200_000)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--cpp", action="store_true", help="score the export with the C++ predictor")
    ap.add_argument(
        "--publish",
        action="store_true",
        help="also `rocketrec publish` (fp32 export, parity and NE gates) after the training "
        "and after the resume (the second one gated against the first)",
    )
    a = ap.parse_args()
    rw = a.resume_workers or a.workers

    work = Path(a.dir or tempfile.mkdtemp(prefix="rocketrec-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    spec_text = (ROOT / "feature_specs" / "ads_ctr.yaml").read_text()
    spec_text, n = re.subn(
        r"\{name: users, *rows: *\d+, *dim: *16",
        f"{{name: users, rows: {a.rows}, dim: 16",
        spec_text,
    )
    assert n == 1, "feature_specs/ads_ctr.yaml no longer has the users table this bench raises"
    spec = work / "scale.yaml"
    spec.write_text(spec_text)
    table_bytes = a.rows * 16 * 4
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    data = work / "train"
    if not data.exists():
        subprocess.run(
            [str(BIN / "rocketrec"), "synth", "--spec", str(spec), "--rows", str(a.data_rows)]
            + ["--files", "4", "--row-group-size", "8192", "--out", str(data), "--quiet"],
            check=True,
            cwd=ROOT,
        )
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    common = [
        str(BIN / "python"),
        "jobs/ads_train.py",
        "--spec",
        str(spec),
        "--train",
        str(data),
        "--out",
        str(run),
        "--batch-size",
        str(a.batch_size),
        "--epochs",
        "100",
        "--sharding",
        "users=row_wise",
        "--log-every",
        "50",
        "--keep-checkpoints",
        "1",
        "--no-export",
    ]
    print(f"== train: {a.rows:,} x 16 users table ({gb(table_bytes)}), {a.workers} workers")
    s_train, t_train = run_sampled(
        common + ["--workers", str(a.workers), "--max-steps", str(a.steps)], work / "train.log", env
    )
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    steps_per_s = summary["steps"] / max(summary["step_seconds"], 1e-9)
    newest = sorted(data.glob("*.parquet"))[-1]  # the "newest partition" the NE gate scores
    published = []
    if a.publish:
        published.append(_publish(run, newest, work, env, "publish1"))
    print(f"== resume with {rw} workers for {a.resume_steps} more steps")
    s_res, t_res = run_sampled(
        common
        + ["--workers", str(rw), "--max-steps", str(a.steps + a.resume_steps)]
        + ["--resume", str(run)],
        work / "resume.log",
        env,
    )
    resumed = json.loads((run / "summary.json").read_text())["metrics"]
    assert resumed["steps"] == a.steps + a.resume_steps, resumed
    if a.publish:
        published.append(_publish(run, newest, work, env, "publish2"))
    run_bytes = dir_bytes(run)
    ckpt_bytes = dir_bytes(run / "checkpoints")
    print("== export --int8")
    out = run / "light_int8.pt"
    s_exp, t_exp = run_sampled(
        [str(BIN / "rocketrec"), "export", "--checkpoint", str(run), "--out", str(out), "--int8"]
        + ["--data", str(data)],
        work / "export.log",
        env,
    )
    export_bytes = out.stat().st_size
    cpp_diff = None
    if a.cpp:
        cpp_diff = score_in_cpp(out, data, work)
    workers = s_train.peaks_matching("RayTrainWorker")
    workers_res = s_res.peaks_matching("RayTrainWorker")
    peak_w = max(workers)
    ratio = peak_w / (table_bytes / a.workers)
    ratio_res = max(workers_res) / (table_bytes / rw)
    fig = {
        "rows": a.rows,
        "workers": a.workers,
        "table_bytes": table_bytes,
        "peak_rss_per_worker": sorted(workers, reverse=True),
        "ratio_peak_per_worker_to_share": ratio,
        "resume_workers": rw,
        "resume_peak_rss_per_worker": sorted(workers_res, reverse=True),
        "resume_ratio": ratio_res,
        "peak_machine_train": s_train.peak_total,
        "peak_export": s_exp.peak_total,
        "export_bytes": export_bytes,
        "export_peak_over_file": s_exp.peak_total / export_bytes,
        "run_dir_bytes_before_export": run_bytes,
        "checkpoint_bytes": ckpt_bytes,
        "run_dir_over_checkpoints": run_bytes / ckpt_bytes,
        "steps_per_s": steps_per_s,
        "train_wall_s": t_train,
        "resume_wall_s": t_res,
        "export_wall_s": t_exp,
    }
    print()
    print(f"table: {a.rows:,} x 16 fp32 = {gb(table_bytes)}; {a.workers} workers, row-wise")
    print(f"peak RSS per worker (train):  {', '.join(gb(x) for x in fig['peak_rss_per_worker'])}")
    print(f"ratio peak-per-worker / (table / W): {ratio:.2f}   (target <= 1.5)")
    print(
        f"resume with {rw} worker(s): peak {', '.join(gb(x) for x in fig['resume_peak_rss_per_worker'])}"
        f", ratio {ratio_res:.2f}"
    )
    print(f"peak of all processes while training: {gb(s_train.peak_total)}")
    print(
        f"export --int8: file {gb(export_bytes)}, peak {gb(s_exp.peak_total)} "
        f"({fig['export_peak_over_file']:.2f}x the file), {t_exp:.0f}s"
    )
    print(
        f"run directory: {gb(run_bytes)} with checkpoints {gb(ckpt_bytes)} "
        f"({fig['run_dir_over_checkpoints']:.3f}x)"
    )
    print(f"training: {steps_per_s:.1f} steps/s (step time only), wall {t_train:.0f}s")
    for i, pb in enumerate(published, 1):
        fig[f"publish{i}"] = pb
        print(
            f"publish {i} (fp32 export + parity gate + NE on {pb['ne_rows']:,} rows"
            f"{', against the published one' if i > 1 else ''}): {pb['wall_s']:.0f}s wall, "
            f"file {gb(pb['file_bytes'])}, peak {gb(pb['peak'])}; {pb['line']}"
        )
    if cpp_diff is not None:
        fig["cpp_max_abs_diff_vs_python"] = cpp_diff
        print(f"C++ predictor on the exported file: max |C++ - Python| = {cpp_diff:.3g}")
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=1))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")


if __name__ == "__main__":
    main()
