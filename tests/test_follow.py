"""Near-line training (--follow): partitions written while the job runs, one broken, one
incomplete, one late; the job killed with SIGKILL once and resumed; every row of the good
partitions trained exactly once (row ids traced), progressive metrics per partition."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, venv_bin

SPEC = """\
version: 1
name: follow_t
label: {column: y}
tables:
  - {name: t_row, rows: 100000, dim: 4}
  - {name: t_ad, rows: 300, dim: 4}
sparse:
  - {name: row_id, column: row_id, dtype: int64, table: t_row}
  - {name: ad, column: ad, dtype: int64, table: t_ad}
dense:
  - {name: price, column: price, fill: 0.0}
light:
  features: [row_id, ad, price]
"""
ROWS = 1000  # per partition; batch 100: no short last batch


def _ids(k: int, rows: int = ROWS) -> list[int]:
    return list(range(k * 100_000, k * 100_000 + rows))


def _partition(
    root: Path,
    name: str,
    k: int,
    bad: bool = False,
    done: bool = True,
    rows: int = ROWS,
    corrupt: bool = False,
) -> None:
    """bad: a column of the wrong type (seen in the footer); corrupt: the footer intact,
    bytes of a column's data pages flipped (seen only when its rows are decoded)."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(k)
    price = rng.random(rows)
    t = pa.table(
        {
            "row_id": np.array(_ids(k, rows), dtype=np.int64),
            "ad": rng.integers(0, 300, rows),
            "price": price.astype(str) if bad else price,  # bad: numbers stored as strings
            "y": (rng.random(rows) < 0.2).astype(np.int64),
        }
    )
    pq.write_table(t, d / "part-0.parquet")
    if corrupt:
        f = d / "part-0.parquet"
        chunk = pq.read_metadata(f).row_group(0).column(2)  # price
        b = bytearray(f.read_bytes())
        for i in range(chunk.data_page_offset + 40, chunk.data_page_offset + 240):
            b[i] ^= 0x5A
        f.write_bytes(bytes(b))
    if done:
        (d / "_SUCCESS").touch()


def _start(tmp: Path, *extra: str, ray_workers: int = 0) -> subprocess.Popen:
    """`rocketrec train --follow` in this process, or (ray_workers) jobs/ads_train.py on
    that many workers of the embedded local Ray."""
    env = {**os.environ, "ROCKETREC_TRACE_TRAINED_IDS": str(tmp / "trace")}
    head = [venv_bin("rocketrec"), "train"]
    if ray_workers:
        head = [sys.executable, str(ROOT / "jobs" / "ads_train.py"), "--workers",
                str(ray_workers), "--local-cpus", "2"]  # fmt: skip
    cmd = [*head, "--spec", str(tmp / "f.yaml"), "--train",
           str(tmp / "logs"), "--out", str(tmp / "run"), "--follow", "--follow-poll", "0.3",
           "--until-idle", "8", "--batch-size", "100", "--log-every", "0", "--no-export",
           "--no-tensorboard", *extra]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=open(tmp / "out.txt", "a"), stderr=subprocess.STDOUT, env=env
    )


def _wait_for(cond, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.mark.e2e
def test_follow_partitions_exactly_once_through_a_kill(tmp_path):
    """One process killed (SIGKILL) in the middle of a partition, resumed on 2 Ray workers:
    the partition in progress continues where its checkpoint stopped, its untrained rows
    shared by the new worker count (sizes chosen so that no rank has a short last batch,
    which training leaves out: every good row is then trained exactly once)."""
    (tmp_path / "f.yaml").write_text(SPEC)
    logs = tmp_path / "logs"
    _partition(logs, "date=2026-12-01/hour=00", 0, rows=2000)  # steps 0..20
    _partition(logs, "date=2026-12-01/hour=01", 1, rows=8000)  # steps 20..100 on 1 worker
    # checkpoints at 40, 60, 80: inside partition 1; a model published every 2 partitions
    proc = _start(tmp_path, "--checkpoint-every", "20", "--publish-every", "2")
    trace = tmp_path / "trace"

    def trained() -> int:  # batches trained so far (one trace line each)
        return (
            sum(len(f.read_text().splitlines()) for f in trace.iterdir()) if trace.exists() else 0
        )

    # killed (SIGKILL) in the middle of its second partition (the first is checkpointed)
    _wait_for(lambda: trained() >= 45)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert trained() < 100, "the kill came after the second partition ended"
    _partition(logs, "date=2026-12-01/hour=02", 2, bad=True)  # quarantined
    _partition(logs, "date=2026-12-01/hour=04", 4, done=False)  # incomplete: never read
    _partition(logs, "date=2026-12-01/hour=06", 6, corrupt=True)  # quarantined too
    proc = _start(tmp_path, "--resume", str(tmp_path / "run"), ray_workers=2)
    _wait_for(lambda: "resumed from" in _out(tmp_path), timeout=240)
    _partition(logs, "date=2026-12-01/hour=03", 3)
    time.sleep(1.0)
    _partition(logs, "date=2026-11-01/hour=00", 5)  # a late partition: trained when it lands
    assert proc.wait(timeout=300) == 0, _out(tmp_path)[-4000:]
    out = _out(tmp_path)
    assert "follow: quarantined partition date=2026-12-01/hour=02" in out, out
    assert "quarantined 2: date=2026-12-01/hour=02, date=2026-12-01/hour=06" in out, out
    assert "row group 0 cannot be read" in out, out
    assert "world size 1 -> 2" in out, out[-3000:]

    # rows trained into the final model: the killed process's batches after the step it
    # was resumed from were lost with it (and trained again after the resume)
    resumed = int(out.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed in (40, 60, 80), resumed  # a checkpoint inside partition 1
    files = sorted((tmp_path / "trace").iterdir(), key=lambda f: f.stat().st_mtime)
    assert len(files) == 3, files  # the killed process, then the 2 Ray workers
    first = files[0].read_text().splitlines()[:resumed]
    lines = first + [x for f in files[1:] for x in f.read_text().splitlines()]
    ids = [int(x) for line in lines for x in line.split()]
    want = sorted(_ids(0, 2000) + _ids(1, 8000) + _ids(3) + _ids(5))
    assert len(ids) == len(set(ids)), "a row trained twice"
    assert sorted(ids) == want, "rows missing or from a bad partition"
    pub = [json.loads(x) for x in (tmp_path / "run/published/log.jsonl").read_text().splitlines()]
    assert len(pub) == 2, pub  # after the 2nd and the 4th good partition
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    parts = [r["partition"] for r in recs if "partition" in r]
    assert parts[-2:] == ["date=2026-12-01/hour=03", "date=2026-11-01/hour=00"], parts
    assert all("progressive_light_auc" in r for r in recs if "partition" in r)
    good = ["date=2026-12-01/hour=00", "date=2026-12-01/hour=01", "date=2026-12-01/hour=03"]
    _compare_followed(tmp_path / "run", [*good, "date=2026-11-01/hour=00"])


def _out(tmp: Path) -> str:
    p = tmp / "out.txt"
    return p.read_text() if p.exists() else ""


@pytest.mark.e2e
def test_follow_through_ray_with_a_worker_killed(tmp_path):
    """The same loop in 2 Ray workers (the embedded local Ray, jobs/ads_train.py), every
    partition published (--publish-minutes: due after each): one worker SIGKILLed in the middle of a partition, the worker
    group restarts from the last checkpoint; every row of the good partitions trained
    exactly once across both attempts, the broken and the corrupt one quarantined, the late one trained,
    a model published (LATEST) and every publish attempt logged."""
    import psutil

    (tmp_path / "f.yaml").write_text(SPEC)
    logs, run, trace = tmp_path / "logs", tmp_path / "run", tmp_path / "trace"
    _partition(logs, "date=2026-12-01/hour=00", 0)
    _partition(logs, "date=2026-12-01/hour=01", 1, rows=8000)  # 2 ranks: steps 5..45
    env = {**os.environ, "ROCKETREC_TRACE_TRAINED_IDS": str(trace)}
    cmd = [sys.executable, str(ROOT / "jobs" / "ads_train.py"), "--spec",
           str(tmp_path / "f.yaml"), "--train", str(logs), "--out", str(run), "--workers", "2",
           "--local-cpus", "2", "--follow", "--follow-poll", "0.3", "--until-idle", "12",
           "--batch-size", "100", "--log-every", "0", "--checkpoint-every", "10",
           "--max-failures", "1", "--publish-minutes", "0.001", "--no-tensorboard"]  # fmt: skip
    out = tmp_path / "out.txt"
    proc = subprocess.Popen(cmd, stdout=open(out, "w"), stderr=subprocess.STDOUT, env=env)

    def lines() -> int:  # batches trained so far, all ranks (one trace line each)
        return sum(len(f.read_text().splitlines()) for f in trace.glob("*.txt"))

    try:
        # a worker killed inside partition 1, after the checkpoint at step 10 or 20
        _wait_for(lambda: lines() >= 2 * 22 or proc.poll() is not None, timeout=300)
        workers = [
            p
            for p in psutil.process_iter(["pid", "cmdline"])
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])
        ]
        assert workers and lines() < 2 * 45, out.read_text()[-3000:]
        os.kill(workers[-1].pid, signal.SIGKILL)
        _partition(logs, "date=2026-12-01/hour=02", 2, bad=True)  # quarantined
        # corrupt pages in its one row group: rank 0 finds it, both ranks quarantine it
        _partition(logs, "date=2026-12-01/hour=06", 6, corrupt=True)
        _wait_for(lambda: "restarting from checkpoint" in out.read_text(), timeout=300)
        _partition(logs, "date=2026-12-01/hour=03", 3)
        time.sleep(1.0)
        _partition(logs, "date=2026-11-01/hour=00", 5)  # late: trained when it lands
        assert proc.wait(timeout=400) == 0, out.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    assert "quarantined 2: date=2026-12-01/hour=02, date=2026-12-01/hour=06" in text, text[-3000:]
    resumed = int(text.split("restarting from checkpoint ")[1].split("(step ")[1].split(")")[0])
    assert 5 < resumed < 45, resumed  # inside partition 1
    # each rank's trace file of the first attempt: its batches up to the resumed step
    # (later ones were lost with the kill), then everything the second attempt trained
    files = sorted(trace.glob("*.txt"), key=lambda f: f.stat().st_ctime)
    assert len(files) == 4, files
    ids = []
    for f in files:
        kept = f.read_text().splitlines()
        kept = kept[:resumed] if f in files[:2] else kept
        ids += [int(x) for line in kept for x in line.split()]
    want = sorted(_ids(0) + _ids(1, 8000) + _ids(3) + _ids(5))
    assert len(ids) == len(set(ids)), "a row trained twice"
    assert sorted(ids) == want, "rows missing or from a bad partition"
    pub = run / "published"
    assert (pub / "LATEST").is_file() and (pub / (pub / "LATEST").read_text().strip()).is_dir()
    log = [json.loads(x) for x in (pub / "log.jsonl").read_text().splitlines()]
    assert len(log) >= 3 and any(r["published"] for r in log), log


def _compare_followed(run: Path, partitions: list[str]) -> None:
    """`rocketrec compare` on a followed run: progressive means (row-weighted) and a table
    of the partitions it scored."""
    from rocketrec.evaluation import compare_runs, format_comparison

    rows = compare_runs([str(run), str(run)])
    r = rows[0]
    assert r["on"] == f"prog:{len(partitions)}" and list(r["partitions"]) == partitions, r
    parts = r["partitions"].values()
    want = sum(m["light_auc"] * m["eval_rows"] for m in parts) / sum(m["eval_rows"] for m in parts)
    assert abs(r["light_auc"] - want) < 1e-12 and rows[1]["diff_light_auc"] == 0.0
    text = format_comparison(rows)
    assert "progressive metrics" in text and all(p in text for p in partitions), text


def test_parquet_files_directly_under_the_root_are_partitions(tmp_path):
    """One file per partition: complete once its footer is written (the closing magic),
    in arrival (mtime) order; hidden and _-prefixed files never; a root with _SUCCESS is
    one directory partition instead."""
    from rocketrec.data.partitions import complete_partitions

    logs = tmp_path / "logs"
    logs.mkdir()
    t = pa.table({"x": list(range(100))})
    for name, age in (("b.parquet", 30), ("a.parquet", 20), ("_tmp.parquet", 10),
                      (".hidden.parquet", 10), ("c.parquet", 5)):  # fmt: skip
        pq.write_table(t, logs / name)
        os.utime(logs / name, (time.time() - age, time.time() - age))
    whole = (logs / "c.parquet").read_bytes()
    (logs / "c.parquet").write_bytes(whole[: len(whole) // 2])  # still being written
    assert [p.name for p in complete_partitions(logs)] == ["b.parquet", "a.parquet"]
    (logs / "c.parquet").write_bytes(whole)
    assert [p.name for p in complete_partitions(logs)] == ["b.parquet", "a.parquet", "c.parquet"]
    (logs / "_SUCCESS").touch()
    assert [p.name for p in complete_partitions(logs)] == ["."]


def test_follow_trains_file_partitions(tmp_path):
    """--follow over plain files: each trained once, a file renamed into place while the
    job runs trained too, a broken one quarantined."""
    (tmp_path / "f.yaml").write_text(SPEC)
    logs = tmp_path / "logs"
    _partition(tmp_path / "stage", "p0", 0, done=False)
    _partition(tmp_path / "stage", "p1", 1, done=False)
    _partition(tmp_path / "stage", "p2", 2, bad=True, done=False)
    logs.mkdir()
    os.replace(tmp_path / "stage/p0/part-0.parquet", logs / "h00.parquet")
    proc = _start(tmp_path, "--until-idle", "4")
    _wait_for(lambda: "follow: partition h00.parquet" in _out(tmp_path))
    os.replace(tmp_path / "stage/p2/part-0.parquet", logs / "h01.parquet")
    os.replace(tmp_path / "stage/p1/part-0.parquet", logs / "h02.parquet")
    assert proc.wait(timeout=120) == 0, _out(tmp_path)[-3000:]
    out = _out(tmp_path)
    assert "quarantined 1: h01.parquet" in out, out[-3000:]
    ids = [int(x) for f in (tmp_path / "trace").iterdir() for x in f.read_text().split()]
    assert sorted(ids) == sorted(_ids(0) + _ids(1)), "each good file's rows once"
