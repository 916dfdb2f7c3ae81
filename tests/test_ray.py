"""End to end through Ray: a real two-node cluster on loopback with `ray job submit`, a
worker killed mid-run, and the embedded local Ray's ports."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT

pytestmark = pytest.mark.e2e
BIN = str(Path(sys.executable).parent)


def _netns_ok() -> bool:
    return (
        shutil.which("unshare") is not None
        and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    )


def _listening(text: str) -> list[str]:
    """Local addresses of LISTEN sockets in `ss -ltn` output."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "LISTEN":
            out.append(parts[3].rsplit(":", 1)[0])
    return out


def _is_loopback(addr: str, wildcard_ok: bool = False) -> bool:
    import ipaddress

    a = addr.strip("[]").split("%")[0]
    if a in ("*", "0.0.0.0", "::"):
        return wildcard_ok
    ip = ipaddress.ip_address(a)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _with_row_ids(tmp_path, tiny_spec_path, tiny_data):
    """The tiny spec with a unique row id as its first feature, and its data (8,000
    training rows), so a trace of trained ids counts every row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = tiny_spec_path.read_text()
    text = text.replace("tables:\n", "tables:\n  - {name: t_rid, rows: 64, dim: 4}\n", 1)
    text = text.replace(
        "sparse:\n", "sparse:\n  - {name: rid, column: rid, dtype: int64, table: t_rid}\n", 1
    )
    spec = tmp_path / "rid.yaml"
    spec.write_text(text)
    dirs, start = {}, 0
    for part in ("train", "val"):
        d = tmp_path / f"rid_{part}"
        d.mkdir()
        for f in sorted(Path(tiny_data[part]).glob("*.parquet")):
            t = pq.read_table(f)
            t = t.append_column("rid", pa.array(range(start, start + t.num_rows), pa.int64()))
            start += t.num_rows
            pq.write_table(t, d / f.name, row_group_size=1000)
        dirs[part] = str(d)
    return spec, dirs


def test_two_node_cluster_job_submit(tmp_path, tiny_spec_path, tiny_data):
    out = tmp_path / "cluster"
    spec, data = _with_row_ids(tmp_path, tiny_spec_path, tiny_data)
    cmd = [
        str(ROOT / "tests" / "ray_two_node.sh"),
        BIN,
        str(ROOT),
        str(spec),
        data["train"],
        data["val"],
        str(out),
    ]
    netns = _netns_ok()
    if netns:
        cmd = ["unshare", "-n", "bash", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    job_log = (out / "job.log").read_text() if (out / "job.log").exists() else ""
    assert r.returncode == 0, r.stdout + r.stderr + job_log[-4000:]
    assert re.search(r"Job '\S+' succeeded", job_log), job_log[-3000:]
    status = (out / "status.txt").read_text()
    assert len(re.findall(r"^ 1 node_", status, re.M)) == 2, status
    noauth = (out / "noauth.log").read_text()
    assert "noauth_rc=0" not in noauth and "http_status=401" in noauth, noauth
    run = out / "run"
    for name in ("metrics.jsonl", "light.pt", "curves.png", "summary.json", "checkpoints/latest"):
        assert (run / name).exists(), name
    # the job ran in a temporary copy of its working directory: RUN/config.yaml keeps the
    # spec's path as given and RUN/spec.yaml its text, which the resumes below (run
    # elsewhere) use
    resolved = (out / "config_first.yaml").read_text()
    assert "spec: rid.yaml" in resolved and "_ray_pkg_" not in resolved, resolved
    assert (run / "spec.yaml").read_text() == spec.read_text()
    summary = json.loads((out / "summary_2workers.json").read_text())
    assert summary["workers"] == 2 and summary["export"]["max_abs_diff"] <= 1e-5
    assert "light_auc" in summary["metrics"]
    # resumed through the job API in the middle of the epoch on 1 worker (the growing way,
    # 1 -> 2, is tests/test_follow.py's and tests/test_dist.py's): every
    # table (DP, TW, RW, CW) keeps its kind and its optimizer state; the rows no earlier
    # worker trained are shared by the new ones: each row trained exactly once
    steps = [summary["metrics"]["steps"]]
    assert steps == [4]
    for k, (was, now) in enumerate(((2, 1),), 1):
        log = (out / f"resume{k}.log").read_text()
        assert re.search(r"Job '\S+' succeeded", log), log[-3000:]
        assert f"resume: world size {was} -> {now}: epoch 0 continues" in log, log[-3000:]
        if k == 1:  # run elsewhere than the first job: the run's copy of the spec is used
            assert "rid.yaml: not found; using the run's copy of its spec" in log, log[-3000:]
        assert "changed sharding kind" not in log and "starts fresh" not in log, log[-3000:]
        steps.append(int(re.findall(r"done: (\d+) steps", log)[-1]))
        shown = [(int(a), int(b)) for a, b in re.findall(r"^step (\d+)/(\d+) ", log, re.M)]
        assert shown and all(a <= b for a, b in shown), shown  # progress never past its total
        assert shown[-1][1] == steps[-1], (shown[-1], steps)  # the total was right
    final = json.loads((run / "summary.json").read_text())
    assert final["workers"] == 1 and final["metrics"]["steps"] == steps[-1]
    assert steps[0] < steps[1], steps
    trained = [int(x) for f in (out / "trace").glob("*.txt") for x in f.read_text().split()]
    assert len(trained) == len(set(trained)), "a row was trained twice"
    unused = final["metrics"]["rows_unused"]
    assert len(trained) + unused == 8000 and 0 <= unused < 2 * 256, (len(trained), unused)
    assert "step 4/" in job_log  # progress streamed to the job log
    addrs = _listening((out / "ports.txt").read_text())
    assert addrs
    if netns:  # the namespace has only lo: wildcard binds are loopback-only there
        assert all(_is_loopback(a, wildcard_ok=True) for a in addrs), addrs


def _ray_listeners(pids: set[int]) -> list[str]:
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append(c.laddr.ip)
    return out


def _descendants(pid: int) -> set[int]:
    try:
        p = psutil.Process(pid)
        return {pid} | {c.pid for c in p.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _ray_pids() -> set[int]:
    pids = set()
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            text = " ".join([p.info["name"] or ""] + (p.info["cmdline"] or []))
        except Exception:
            continue
        if "ray" in text.lower() and p.info["pid"] != os.getpid():
            pids.add(p.info["pid"])
    return pids


def test_local_ray_worker_killed_resumes_and_binds_loopback(tmp_path, tiny_spec, tiny_spec_path):
    from rocketrec.data.synth import SynthConfig, synth

    # 8 row groups of 4096 rows: each of 2 ranks reads 16384 rows = 128 batches per epoch
    data = tmp_path / "train"
    synth(
        tiny_spec, str(data), SynthConfig(rows=32768, seed=9, files=2, row_group_size=4096, ctr=0.2)
    )
    before = _ray_pids()
    run = tmp_path / "run"
    log = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "jobs" / "ads_train.py"),
            "--spec",
            str(tiny_spec_path),
            "--train",
            str(data),
            "--out",
            str(run),
            "--workers",
            "2",
            "--batch-size",
            "128",
            "--epochs",
            "3",
            "--checkpoint-every",
            "32",
            "--log-every",
            "64",
            "--max-failures",
            "2",
            "--no-export",
            "--local-cpus",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    killed = None
    listeners: list[str] = []
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            latest = run / "checkpoints" / "latest"
            workers = [
                p
                for p in psutil.process_iter(["pid", "cmdline"])
                if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])
            ]
            if not listeners and workers:
                listeners = _ray_listeners(_ray_pids() - before)
            if killed is None and latest.exists() and workers:
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        rc = proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "job.log").read_text()
    assert rc == 0, text[-5000:]
    assert killed is not None, "the run ended before a worker could be killed"
    assert "restarting from checkpoint" in text, text[-3000:]
    meta = json.loads((run / "summary.json").read_text())["metrics"]
    # every example of every epoch counted once, despite the restart
    assert meta["rows_seen"] == 3 * 32768, meta

    # Ray registered references, not a second copy of the checkpoints
    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    ckpt_bytes = size(run / "checkpoints")
    assert size(run / "ray_results") < 0.05 * ckpt_bytes, (size(run / "ray_results"), ckpt_bytes)
    assert size(run) <= 1.1 * ckpt_bytes + size(run / "metrics.jsonl") + 100_000
    # the embedded local Ray listened on loopback only
    assert listeners, "no Ray listener seen"
    assert all(_is_loopback(a) for a in listeners), listeners


def test_user_error_in_workers_exits_2_without_retries(tmp_path, tiny_spec_path, tiny_data):
    """Divergence inside Ray workers: one line, exit 2, the traceback in RUN/train.log, and
    no second training attempt (a restarted group sees the recorded error and stops)."""
    run = tmp_path / "div"
    r = subprocess.run(
        [
            sys.executable, str(ROOT / "jobs" / "ads_train.py"), "--spec", str(tiny_spec_path),
            "--train", tiny_data["train"], "--out", str(run), "--workers", "2",
            "--batch-size", "256", "--max-steps", "20", "--dense-lr", "1e12",
            "--sparse-lr", "1e12", "--max-failures", "2", "--no-export", "--local-cpus", "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    err = [x for x in r.stderr.splitlines() if x.startswith("ads_train.py:")]
    assert len(err) == 1 and "training diverged" in err[0], r.stderr[-3000:]
    assert "Traceback" in (run / "train.log").read_text()
    assert not (run / ".user_error.json").exists()
    # trained once, not once per retry: one recorded error per rank at most
    assert (run / "train.log").read_text().count("error: Traceback") <= 2


def test_worker_group_the_cluster_cannot_hold_is_refused(tmp_path, tiny_spec_path, tiny_data):
    r = subprocess.run(
        [
            sys.executable, str(ROOT / "jobs" / "ads_train.py"), "--spec", str(tiny_spec_path),
            "--train", tiny_data["train"], "--out", str(tmp_path / "run"), "--workers", "6",
            "--cpus-per-worker", "1", "--batch-size", "256", "--local-cpus", "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    err = [x for x in r.stderr.splitlines() if x.startswith("ads_train.py:")]
    assert r.returncode == 2 and len(err) == 1 and "needs 6 CPU" in err[0], r.stderr[-3000:]


def test_embedded_ray_starts_its_own_even_when_a_cluster_runs(tmp_path, tiny_spec_path, tiny_data):
    """Without RAY_ADDRESS, ads_train.py starts its own loopback Ray even when a `ray start`
    cluster runs on the machine: a 1-CPU cluster could not hold 3 workers of 1 CPU, the
    embedded one (--local-cpus 3) can; the cluster's job list stays empty."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(
        [
            f"{BIN}/ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
            "--num-cpus=1", "--include-dashboard=false",
        ],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        r = subprocess.run(
            [
                sys.executable, str(ROOT / "jobs" / "ads_train.py"), "--spec", str(tiny_spec_path),
                "--train", tiny_data["train"], "--out", str(tmp_path / "run"), "--workers", "3",
                "--cpus-per-worker", "1", "--batch-size", "256", "--max-steps", "3",
                "--local-cpus", "3", "--no-export", "--log-every", "1",
            ],
            env=env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        assert "needs 3 CPU" not in r.stderr
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["metrics"]["steps"] == 3, summary
    finally:
        subprocess.run([f"{BIN}/ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
