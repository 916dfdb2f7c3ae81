"""Documented artifacts stay true: the KubeRay RayJob manifest's structure and its
entrypoint (parsed by ads_train.py's own parser), the daily-loop script's commands."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

MANIFEST = ROOT / "deploy" / "kuberay" / "rayjob.yaml"


def test_kuberay_rayjob_manifest():
    """What KubeRay needs to run the job (read from its operator's source, v1.7):
    the token through rayClusterSpec.authOptions (the operator then injects
    RAY_AUTH_MODE / RAY_AUTH_TOKEN from the Secret's key `auth_token` into every Ray pod
    and the submitter), a dashboard the submitter pod can reach, and an image whose build
    compiles the op library and fails when it does not load."""
    m = yaml.safe_load(MANIFEST.read_text())
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayJob"
    spec = m["spec"]
    assert spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    auth = cluster["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    text = MANIFEST.read_text()
    assert f"kubectl create secret generic {auth['secretName']}" in text
    assert "--from-literal=auth_token=" in text  # the key KubeRay reads
    host = cluster["headGroupSpec"]["rayStartParams"].get("dashboard-host", "0.0.0.0")
    assert host not in ("127.0.0.1", "localhost"), "the submitter pod must reach the dashboard"
    pods = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]
    images = set()
    for pod in pods:
        (c,) = pod["spec"]["containers"]
        images.add(c["image"])
        # set by hand they would shadow the operator's (and miss the submitter)
        assert not {e["name"] for e in c.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
        assert {"name": "shared", "mountPath": "/shared"} in c["volumeMounts"]
    for g in cluster["workerGroupSpecs"]:
        assert g["replicas"] >= 1 and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    (image,) = images
    # the image: deploy/kuberay/Dockerfile builds the op library and checks it loads
    docker = (ROOT / "deploy" / "kuberay" / "Dockerfile").read_text()
    assert f"-t {image} ." in docker and "make venv" in docker
    assert "load_library()" in docker and "WORKDIR /opt/rocketrec" in docker
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/opt/rocketrec"
    for src in ("rocketrec", "jobs", "feature_specs", "setup.py", "pyproject.toml"):
        assert any(
            line.startswith("COPY ") and src in line.split()[1:-1] for line in docker.splitlines()
        ), src
    cpp = (ROOT / "deploy" / "cpp" / "rocketrec_ops.cpp").read_text()
    for inc in (line.split('"')[1] for line in cpp.splitlines() if line.startswith('#include "')):
        assert f"deploy/cpp/{inc}" in docker, f"the image's build needs {inc}"
    # the entrypoint's flags are ads_train.py's
    from rocketrec.run.ray_driver import build_parser

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/ads_train.py"]
    a = build_parser().parse_args(argv[2:])
    workers = sum(g["replicas"] for g in cluster["workerGroupSpecs"])
    assert a.workers <= workers and a.out.startswith("/shared/")
    cpus = int(cluster["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"])
    assert a.cpus_per_worker <= cpus


def strict_schema(schema):
    """The CRD's OpenAPI schema as `kubectl apply --validate=strict` reads it: an object
    with declared properties rejects any other field (unless it preserves unknown ones)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate_against_crd(manifest: dict, crd_path: Path) -> list[str]:
    """Errors of `manifest` against the RayJob CRD's schema (its served version)."""
    import jsonschema

    docs = [d for d in yaml.safe_load_all(crd_path.read_text()) if d]
    (crd,) = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    assert crd["spec"]["names"]["kind"] == "RayJob", crd_path
    version = manifest["apiVersion"].split("/")[1]
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict_schema(ver["schema"]["openAPIV3Schema"])
    v = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(manifest)]


def _crd_path():
    """KubeRay's RayJob CRD (ray.io_rayjobs.yaml from ray-project/kuberay, Apache-2.0), at
    $KUBERAY_RAYJOB_CRD: KubeRay's file is not copied into this repository."""
    import os

    p = os.environ.get("KUBERAY_RAYJOB_CRD")
    if not p:
        pytest.skip(
            "set KUBERAY_RAYJOB_CRD to KubeRay's ray-operator/config/crd/bases/"
            "ray.io_rayjobs.yaml to validate deploy/kuberay/rayjob.yaml against it"
        )
    return Path(p)


def test_kuberay_manifest_against_the_rayjob_crd():
    errors = validate_against_crd(yaml.safe_load(MANIFEST.read_text()), _crd_path())
    assert not errors, "\n".join(errors)


def test_kuberay_crd_check_sees_a_bad_field():
    """The schema check can fail: a misspelt field and a bad enum value are reported."""
    m = yaml.safe_load(MANIFEST.read_text())
    m["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    m["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    errors = validate_against_crd(m, _crd_path())
    assert any("authOptions.mode" in e and "tokens" in e for e in errors), errors
    assert any("rayStartParam" in e for e in errors), errors


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
