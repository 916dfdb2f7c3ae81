"""Documented artifacts stay true: the KubeRay RayJob manifest's structure and its
entrypoint (parsed by ads_train.py's own parser), the daily-loop script's commands."""

from __future__ import annotations

import shlex

import yaml

from conftest import ROOT


def test_kuberay_rayjob_manifest():
    m = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayJob"
    spec = m["spec"]
    assert spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        (c,) = pod["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        assert {"name": "shared", "mountPath": "/shared"} in c["volumeMounts"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    for g in cluster["workerGroupSpecs"]:
        assert g["replicas"] >= 1 and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    # the entrypoint's flags are ads_train.py's
    from rocketrec.run.ray_driver import build_parser

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/ads_train.py"]
    a = build_parser().parse_args(argv[2:])
    workers = sum(g["replicas"] for g in cluster["workerGroupSpecs"])
    assert a.workers <= workers and a.out.startswith("/shared/")


def test_daily_loop_script_runs_the_documented_commands():
    """deploy/daily_loop.sh runs the ```bash block of docs/daily_loop.md (no copy that
    could drift), outside the repository by default; the block's commands exist."""
    from rocketrec.cli import build_parser

    script = (ROOT / "deploy" / "daily_loop.sh").read_text()
    assert "sed -n '/^```bash$/,/^```$/p' \"$REPO/docs/daily_loop.md\"" in script
    assert "mktemp -d" in script and "daily_out" not in script
    doc = (ROOT / "docs" / "daily_loop.md").read_text()
    block = doc.split("```bash\n", 1)[1].split("```", 1)[0]
    used = {line.split()[1] for line in block.splitlines() if line.startswith("rocketrec ")}
    assert used == {"train", "evaluate", "compare", "export"}, used
    for line in block.replace("\\\n", " ").splitlines():
        if line.startswith("rocketrec "):
            argv = line.split("#")[0].split()[1:]
            if argv[0] != "train":  # train is parsed by its own generated parser
                build_parser().parse_args(argv)
