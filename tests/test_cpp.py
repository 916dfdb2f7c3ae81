"""End to end: export a trained model, build deploy/cpp with CMake against the wheel's
libtorch, and check the C++ predictor against Python on the same requests."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT
from rocketrec.hashing import TEST_VECTORS, fnv1a64
from rocketrec.model.model import ModelConfig
from rocketrec.serving.export import export_checkpoint
from rocketrec.serving.manifest import read_manifest
from rocketrec.serving.requests import parse_requests
from rocketrec.train.loop import TrainConfig, train

pytestmark = pytest.mark.e2e


def build_predictor(build_dir: Path) -> Path:
    prefix = torch.utils.cmake_prefix_path
    cfg = subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT / "deploy" / "cpp"),
            "-B",
            str(build_dir),
            f"-DCMAKE_PREFIX_PATH={prefix}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ],
        capture_output=True,
        text=True,
    )
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    b = subprocess.run(["cmake", "--build", str(build_dir), "-j2"], capture_output=True, text=True)
    assert b.returncode == 0, b.stdout + b.stderr
    exe = build_dir / "rocketrec_predict"
    assert exe.exists()
    return exe


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Path:
    return build_predictor(tmp_path_factory.mktemp("cppbuild"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_spec, tiny_data) -> Path:
    d = tmp_path_factory.mktemp("cppexp")
    train(
        tiny_spec,
        tiny_data["train"],
        tiny_data["val"],
        str(d / "run"),
        ModelConfig(cross_layers=1, cross_rank=4, booster_mlp=(16,), light_mlp=(8,)),
        None,
        TrainConfig(batch_size=512, max_steps=8, log_every=0),
    )
    export_checkpoint(d / "run", d / "light.pt", data=tiny_data["val"])
    export_checkpoint(d / "run", d / "light_int8.pt", int8=True)
    return d


def _requests_from_rows(path: str, manifest: dict, n: int) -> list[str]:
    rows = pq.read_table(path).slice(0, n).to_pylist()
    lines = []
    rng = random.Random(0)
    for i, r in enumerate(rows):
        req = {f["name"]: r[f["column"]] for f in manifest["sparse_features"]}
        if i % 3 == 0:  # named form
            req.update({f["name"]: r[f["column"]] for f in manifest["dense_features"]})
        else:  # positional dense form, with nulls meaning missing
            req = {"sparse": req, "dense": [r[f["column"]] for f in manifest["dense_features"]]}
        if i % 7 == 0:
            target = req["sparse"] if "sparse" in req else req
            target["user"] = rng.choice([-(2**63), 2**63 - 1, -12345])
        lines.append(json.dumps(req))
    return lines


@pytest.mark.parametrize("name", ["light.pt", "light_int8.pt"])
def test_cpp_matches_python(predictor, exported, tiny_data, name, tmp_path):
    model = exported / name
    man = read_manifest(model)
    lines = _requests_from_rows(tiny_data["val"], man, 600)
    req = tmp_path / "req.jsonl"
    req.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [str(predictor), str(model), str(req), "--batch", "64"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    cpp = torch.tensor([float(x) for x in out.stdout.split()])
    v, l, d = parse_requests(lines, man)
    with torch.no_grad():
        py = torch.jit.load(str(model))(v, l, d)
    assert cpp.shape == py.shape == (600,)
    assert float((cpp - py).abs().max()) <= 1e-6


def test_hash_vectors_agree(predictor):
    rng = random.Random(1)
    extra = [
        "".join(rng.choice("ab09:_é€😀 ") for _ in range(rng.randint(1, 30))) for _ in range(50)
    ]
    strings = [s for s, _ in TEST_VECTORS if s] + extra
    out = subprocess.run([str(predictor), "--hash", *strings], capture_output=True, text=True)
    assert out.returncode == 0
    assert [int(x) for x in out.stdout.split()] == [fnv1a64(s) for s in strings]
    for s, v in TEST_VECTORS:
        assert fnv1a64(s) == v


@pytest.mark.parametrize(
    "line,needle",
    [
        ('{"nope": 1}', "unknown feature 'nope'"),
        ('{"sparse": {"user": 1}, "dense": [1.0]}', "'dense' must be a list of 2"),
        ('{"user": 1', "bad JSON"),
        ("not json", "bad JSON"),
        ('{"user": "abc"}', "expects int64"),
        ('{"ad": 7}', "expects string"),
        ('{"price": "high"}', "expects a number"),
        ('{"user": 1, "user": 2}', "duplicate key"),
        ("[]", "JSON object"),
    ],
)
def test_malformed_requests_fail_cleanly(predictor, exported, line, needle):
    out = subprocess.run(
        [str(predictor), str(exported / "light.pt"), "-"],
        input='{"user": 1}\n' + line + "\n",
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, (out.returncode, out.stderr)
    err = out.stderr.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("rocketrec_predict: error: <stdin>:2:")
        and needle in err[0]
    ), err


def test_bad_model_files_fail_cleanly(predictor, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    for path in (junk, tmp_path / "missing.pt"):
        out = subprocess.run(
            [str(predictor), str(path), "-"], input="{}\n", capture_output=True, text=True
        )
        assert out.returncode == 2 and "cannot load TorchScript model" in out.stderr
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 1)), str(plain))
    out = subprocess.run(
        [str(predictor), str(plain), "-"], input="{}\n", capture_output=True, text=True
    )
    assert out.returncode == 2 and "manifest" in out.stderr


def test_bench_prints_latencies(predictor, exported):
    out = subprocess.run(
        [str(predictor), str(exported / "light.pt"), "--bench", "--seconds", "0.1"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    assert [r["batch"] for r in rows] == [1, 16, 256]
    assert all(0 < r["p50_us"] <= r["p99_us"] for r in rows)
