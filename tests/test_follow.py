"""Near-line training (--follow): partitions written while the job runs, one broken, one
incomplete, one late; the job killed with SIGKILL once and resumed; every row of the good
partitions trained exactly once (row ids traced), progressive metrics per partition."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import venv_bin

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
    root: Path, name: str, k: int, bad: bool = False, done: bool = True, rows: int = ROWS
) -> None:
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
    if done:
        (d / "_SUCCESS").touch()


def _start(tmp: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "ROCKETREC_TRACE_TRAINED_IDS": str(tmp / "trace")}
    cmd = [venv_bin("rocketrec"), "train", "--spec", str(tmp / "f.yaml"), "--train",
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


def test_follow_partitions_exactly_once_through_a_kill(tmp_path):
    (tmp_path / "f.yaml").write_text(SPEC)
    logs = tmp_path / "logs"
    _partition(logs, "date=2026-12-01/hour=00", 0)
    _partition(logs, "date=2026-12-01/hour=01", 1, rows=8000)
    proc = _start(tmp_path, "--checkpoint-every", "15")  # one in the middle of partition 1
    trace = tmp_path / "trace"

    def trained() -> int:  # batches trained so far (one trace line each)
        return (
            sum(len(f.read_text().splitlines()) for f in trace.iterdir()) if trace.exists() else 0
        )

    # killed (SIGKILL) in the middle of its second partition (the first is checkpointed)
    _wait_for(lambda: trained() >= 30)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert trained() < 90, "the kill came after the second partition ended"
    _partition(logs, "date=2026-12-01/hour=02", 2, bad=True)  # quarantined
    _partition(logs, "date=2026-12-01/hour=04", 4, done=False)  # incomplete: never read
    proc = _start(tmp_path, "--resume", str(tmp_path / "run"))
    _wait_for(lambda: "follow: partition date=2026-12-01/hour=01" in _out(tmp_path) or
              "resumed from" in _out(tmp_path))  # fmt: skip
    _partition(logs, "date=2026-12-01/hour=03", 3)
    time.sleep(1.0)
    _partition(logs, "date=2026-11-01/hour=00", 5)  # a late partition: trained when it lands
    assert proc.wait(timeout=180) == 0, _out(tmp_path)[-4000:]
    out = _out(tmp_path)
    assert "follow: quarantined partition date=2026-12-01/hour=02" in out, out
    assert "quarantined 1: date=2026-12-01/hour=02" in out

    # rows trained into the final model: the killed process's batches after the step it
    # was resumed from were lost with it (and trained again after the resume)
    resumed = int(out.split("resumed from ")[1].split(" at step ")[1].split()[0])
    # partition 1 spans steps 10..90: its checkpoint at 15 (or at 30, if written before
    # the kill) is the one resumed from, inside the partition
    assert resumed in (15, 30), resumed
    files = sorted((tmp_path / "trace").iterdir(), key=lambda f: f.stat().st_mtime)
    assert len(files) == 2, files
    first = files[0].read_text().splitlines()[:resumed]
    lines = first + files[1].read_text().splitlines()
    ids = [int(x) for line in lines for x in line.split()]
    want = sorted(_ids(0) + _ids(1, 8000) + _ids(3) + _ids(5))
    assert len(ids) == len(set(ids)), "a row trained twice"
    assert sorted(ids) == want, "rows missing or from a bad partition"
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    parts = [r["partition"] for r in recs if "partition" in r]
    assert parts[-2:] == ["date=2026-12-01/hour=03", "date=2026-11-01/hour=00"], parts
    assert all("progressive_light_auc" in r for r in recs if "partition" in r)


def _out(tmp: Path) -> str:
    p = tmp / "out.txt"
    return p.read_text() if p.exists() else ""
