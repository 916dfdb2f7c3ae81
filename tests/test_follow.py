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
def test_follow_exactly_once_through_a_kill_a_worker_count_and_a_worker_failure(tmp_path):
    """Partitions written while the job runs (one broken, one corrupt, one incomplete,
    one late). One process (`rocketrec train --follow`) SIGKILLed in the middle of a
    partition; resumed on 2 Ray workers (world size 1 -> 2) that continue that partition
    where its checkpoint stopped; one Ray worker SIGKILLed in the middle of a later
    partition and the worker group restarted (`--max-failures`). Every row of the good
    partitions is trained exactly once, counted through the row-id trace: the partitions'
    short last batches are padded (their padding weighs 0), none is left out."""
    import psutil

    (tmp_path / "f.yaml").write_text(SPEC)
    logs, run, trace = tmp_path / "logs", tmp_path / "run", tmp_path / "trace"
    _partition(logs, "date=2026-12-01/hour=00", 0, rows=2050)  # steps 0..21: a short last
    _partition(logs, "date=2026-12-01/hour=01", 1, rows=8000)  # steps 21..101 on 1 worker
    # checkpoints at 40, 60, 80: inside partition 1; a model published every 2 partitions
    proc = _start(tmp_path, "--checkpoint-every", "20", "--publish-every", "2")

    def lines(files: list[Path] | None = None) -> int:  # batches trained (a line each)
        fs = files if files is not None else list(trace.glob("*.txt"))
        return sum(len(f.read_text().splitlines()) for f in fs)

    _wait_for(lambda: lines() >= 45)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lines() < 101, "the kill came after partition 1 ended"
    single = list(trace.glob("*.txt"))
    _partition(logs, "date=2026-12-01/hour=02", 2, bad=True)  # quarantined
    _partition(logs, "date=2026-12-01/hour=04", 4, done=False)  # incomplete: never read
    # corrupt pages in its one row group: rank 0 finds it, both ranks quarantine it
    _partition(logs, "date=2026-12-01/hour=06", 6, corrupt=True)
    _partition(logs, "date=2026-12-01/hour=03", 3, rows=16000)  # 80 steps on 2 workers
    proc = _start(tmp_path, "--resume", str(run), "--max-failures", "1", "--publish-minutes",
                  "0.001", ray_workers=2)  # fmt: skip
    try:
        _wait_for(lambda: "resumed from" in _out(tmp_path) or proc.poll() is not None, 300)
        text = _out(tmp_path)
        resumed = int(text.split("resumed from ")[1].split(" at step ")[1].split()[0])
        assert resumed in (40, 60, 80, 100), resumed  # a checkpoint inside partition 1
        per_rank = (8000 - (resumed - 21) * 100) // 2  # partition 1's rest, on 2 workers
        start3 = resumed + -(-per_rank // 100)  # partition 3's first step

        def ray_lines() -> int:
            return lines([f for f in trace.glob("*.txt") if f not in single])

        # a Ray worker killed 30 steps into partition 3 (after its checkpoint at a
        # multiple of 20 inside it), the group restarted from the newest checkpoint
        _wait_for(lambda: ray_lines() >= 2 * (start3 - resumed + 30) or proc.poll() is not None)
        workers = [
            p
            for p in psutil.process_iter(["pid", "cmdline"])
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])
        ]
        assert workers and ray_lines() < 2 * (start3 + 80 - resumed), _out(tmp_path)[-3000:]
        first_ray = [f for f in trace.glob("*.txt") if f not in single]
        os.kill(workers[-1].pid, signal.SIGKILL)
        _wait_for(lambda: "restarting from checkpoint" in _out(tmp_path), timeout=300)
        _partition(logs, "date=2026-11-01/hour=00", 5, rows=1030)  # late; short last batches
        assert proc.wait(timeout=400) == 0, _out(tmp_path)[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    out = _out(tmp_path)
    assert "world size 1 -> 2" in out, out[-3000:]
    assert "follow: quarantined partition date=2026-12-01/hour=02" in out, out
    assert "quarantined 2: date=2026-12-01/hour=02, date=2026-12-01/hour=06" in out, out
    assert "row group 0 cannot be read" in out, out
    again = int(out.split("restarting from checkpoint ")[1].split("(step ")[1].split(")")[0])
    assert start3 < again < start3 + 80, (start3, again)  # inside partition 3

    # rows trained into the final model: each attempt's batches up to the step the next
    # one resumed from (later ones were lost with the kill), then the last attempt's
    assert len(single) == 1 and len(first_ray) == 2, (single, first_ray)
    last = [f for f in trace.glob("*.txt") if f not in single + first_ray]
    assert len(last) == 2, last
    kept = single[0].read_text().splitlines()[:resumed]
    for f in first_ray:
        kept += f.read_text().splitlines()[: again - resumed]
    kept += [x for f in last for x in f.read_text().splitlines()]
    ids = [int(x) for line in kept for x in line.split()]
    want = sorted(_ids(0, 2050) + _ids(1, 8000) + _ids(3, 16000) + _ids(5, 1030))
    assert len(ids) == len(set(ids)), "a row trained twice"
    assert sorted(ids) == want, "rows missing or from a bad partition"
    pub = run / "published"
    assert (pub / "LATEST").is_file() and (pub / (pub / "LATEST").read_text().strip()).is_dir()
    log = [json.loads(x) for x in (pub / "log.jsonl").read_text().splitlines()]
    assert len(log) >= 2 and any(r["published"] for r in log), log
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    parts = [r["partition"] for r in recs if "partition" in r]
    assert parts[-2:] == ["date=2026-12-01/hour=03", "date=2026-11-01/hour=00"], parts
    assert all("progressive_light_auc" in r for r in recs if "partition" in r)
    good = ["date=2026-12-01/hour=00", "date=2026-12-01/hour=01", "date=2026-12-01/hour=03"]
    _compare_followed(run, [*good, "date=2026-11-01/hour=00"])


def _out(tmp: Path) -> str:
    p = tmp / "out.txt"
    return p.read_text() if p.exists() else ""


def _compare_followed(run: Path, partitions: list[str]) -> None:
    """`rocketrec compare` on a followed run: progressive means (row-weighted) and a table
    of the partitions it scored."""
    from rocketrec.evaluation import compare_runs, format_comparison

    rows = compare_runs([str(run), str(run)])
    r = rows[0]
    assert list(r["partitions"]) == partitions, r
    # the first partition was scored by the untrained model (step 0): not in the mean
    assert r["partitions"][partitions[0]]["step"] == 0
    assert r["on"] == f"prog:{len(partitions) - 1}", r
    parts = [r["partitions"][p] for p in partitions[1:]]
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
