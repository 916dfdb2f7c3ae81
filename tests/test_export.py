"""Export: parity gate, int8, manifest, input checks, and the Python request parser."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

import rocketrec.serving.export as export
from conftest import train_small, venv_bin
from rocketrec.data.batch import DataError
from rocketrec.serving.export import export_checkpoint
from rocketrec.serving.manifest import read_manifest
from rocketrec.serving.requests import parse_requests, raw_inputs_from_table
from rocketrec.spec.hashing import TEST_VECTORS


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_spec, tiny_data):
    out = tmp_path_factory.mktemp("exp") / "run"
    train_small(tiny_spec, tiny_data, out, steps=10)
    return out


def test_export_fp32_parity_and_manifest(tmp_path, trained, tiny_spec, tiny_data):
    rep = export_checkpoint(trained, tmp_path / "light.pt", data=tiny_data["val"])
    assert rep["max_abs_diff"] <= 1e-5
    m = read_manifest(tmp_path / "light.pt")
    assert m["format"] == "rocketrec-light/2"
    assert [f["name"] for f in m["sparse_features"]] == ["user", "ad", "tags"]
    assert [f["name"] for f in m["dense_features"]] == ["price", "pos"]
    assert m["hash"]["test_vectors"] == [[s, v] for s, v in TEST_VECTORS]
    assert "light_auc" in m["metrics"] and m["versions"]["torch"] == torch.__version__
    # the file loads with plain torch (no torchrec import needed by the module)
    mod = torch.jit.load(str(tmp_path / "light.pt"))
    code = mod.code
    assert "torchrec" not in code and "fbgemm" not in code


def test_export_int8_bound_and_smaller(tmp_path, trained, tiny_data):
    a = export_checkpoint(trained, tmp_path / "fp32.pt", data=tiny_data["val"])
    b = export_checkpoint(trained, tmp_path / "int8.pt", int8=True, data=tiny_data["val"])
    assert b["max_abs_diff"] <= export.INT8_TOL
    assert b["bytes"] < a["bytes"]
    # int8 mean pooling is done by the module (the quantized op always sums): compare to fp32
    fp, q = torch.jit.load(str(tmp_path / "fp32.pt")), torch.jit.load(str(tmp_path / "int8.pt"))
    import pyarrow.parquet as pq

    from rocketrec.spec import spec_from_dict

    spec = spec_from_dict(read_manifest(tmp_path / "fp32.pt")["spec"])
    t = pq.read_table(tiny_data["val"]).slice(0, 300)
    x = raw_inputs_from_table(t, spec)
    assert (fp(*x) - q(*x)).abs().max() < export.INT8_TOL


def test_parity_gate_refuses_to_write(tmp_path, trained, monkeypatch):
    monkeypatch.setattr(export, "FP32_TOL", -1.0)  # nothing can pass
    target = tmp_path / "light.pt"
    with pytest.raises(ValueError, match="parity gate failed"):
        export_checkpoint(trained, target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind either


def test_export_refuses_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        export_checkpoint(tmp_path, tmp_path / "x.pt")


def test_module_checks_inputs(tmp_path, trained):
    export_checkpoint(trained, tmp_path / "light.pt")
    m = torch.jit.load(str(tmp_path / "light.pt"))
    v = torch.tensor([1, 2, 3], dtype=torch.int64)
    good_l = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.int64)  # F=3, B=2
    d = torch.zeros(2, 2)
    assert m(v, good_l, d).shape == (2,)
    with pytest.raises(Exception, match="dense must be float32"):
        m(v, good_l, torch.zeros(2, 3))
    with pytest.raises(Exception, match="I\\*B"):
        m(v, torch.tensor([3], dtype=torch.int64), d)
    with pytest.raises(Exception, match="non-negative"):
        m(v, torch.tensor([2, 2, -1, 0, 0, 0], dtype=torch.int64), d)
    with pytest.raises(Exception, match="lengths sum"):
        m(v, torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.int64), d)
    # NaN dense = missing -> the feature's fill value
    nan = m(v, good_l, torch.full((2, 2), float("nan")))
    filled = m(v, good_l, torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    torch.testing.assert_close(nan, filled)


def test_python_request_parser(tmp_path, trained):
    export_checkpoint(trained, tmp_path / "light.pt")
    man = read_manifest(tmp_path / "light.pt")
    lines = [
        json.dumps({"user": 5, "ad": "a1", "tags": [1, 2], "price": 3.0}),
        json.dumps({"sparse": {"user": -1}, "dense": [None, 2.0]}),
    ]
    v, l, d = parse_requests(lines, man)
    assert l.tolist() == [1, 1, 1, 0, 2, 0]
    assert v.tolist()[:2] == [5, -1] and d.shape == (2, 2)
    for bad, needle in [
        ('{"nope": 1}', "unknown feature 'nope'"),
        ('{"sparse": {}, "dense": [1]}', "'dense' must be a list of 2"),
        ('{"user": ', "bad JSON"),
        ('{"user": "x"}', "expects int64"),
        ('{"ad": 3}', "expects string"),
        ("[1, 2]", "JSON object"),
        ('{"user": 99999999999999999999}', "int64"),
    ]:
        with pytest.raises(DataError, match=needle):
            parse_requests([bad], man, "req.jsonl")


def test_cli_export_and_predict(tmp_path, trained):
    exe = venv_bin("rocketrec")
    r = subprocess.run(
        [exe, "export", "--checkpoint", str(trained), "--out", str(tmp_path / "m.pt")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "parity max |diff|" in r.stdout
    req = tmp_path / "r.jsonl"
    req.write_text('{"user": 1}\n{"ad": "x", "price": 2.5}\n')
    p = subprocess.run(
        [exe, "predict", "--model", str(tmp_path / "m.pt"), "--requests", str(req)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    probs = [float(x) for x in p.stdout.split()]
    assert len(probs) == 2 and all(0 < x < 1 for x in probs)
    bad = subprocess.run(
        [exe, "predict", "--model", str(tmp_path / "m.pt"), "--requests", "-"],
        input='{"zzz": 1}\n',
        capture_output=True,
        text=True,
    )
    assert (
        bad.returncode == 2
        and "unknown feature 'zzz'" in bad.stderr
        and "Traceback" not in bad.stderr
    )


def test_a_non_editable_install_builds_the_library_and_exports(tmp_path, trained):
    """`pip install .` (not editable) builds the op library into the installed package. A
    process that sees only that install (`python -S`: no editable finder; no source tree on
    its path) finds the library inside it and exports a checkpoint with the fused module."""
    import os
    import sys
    import sysconfig

    from conftest import ROOT

    site = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(ROOT)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lib = site / "rocketrec" / "_rocketrec_ops.so"
    assert lib.is_file() and not (site / "rocketrec" / "__editable__").exists()
    code = (
        "import sys, rocketrec\n"
        "from rocketrec.serving.ops import load_library\n"
        "from rocketrec.serving.export import export_checkpoint\n"
        "print(rocketrec.__file__)\n"
        "print(load_library())\n"
        "rep = export_checkpoint(sys.argv[1], sys.argv[2])\n"
        "print('portable' if rep['portable'] else 'fused')\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{site}:{sysconfig.get_paths()['purelib']}"}
    env.pop("ROCKETREC_OPS_LIBRARY", None)
    p = subprocess.run(
        [sys.executable, "-S", "-c", code, str(trained), str(tmp_path / "m.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    where, loaded, module = p.stdout.split()[:3]
    assert where == str(site / "rocketrec" / "__init__.py") and loaded == str(lib)
    assert module == "fused" and read_manifest(tmp_path / "m.pt")["op_library"]


def test_aoti_export_gate_refuses_and_leaves_nothing(tmp_path, trained, monkeypatch):
    """--format aoti: a package whose scores differ from the reference is not written
    (nor any temporary file); a model torch.export cannot take is one clear error."""
    real = export._reference_scores
    monkeypatch.setattr(export, "_reference_scores", lambda *a, **k: real(*a, **k) + 0.01)
    with pytest.raises(export.ExportError, match="parity gate failed: the AOTInductor package"):
        export_checkpoint(trained, tmp_path / "m.pt2", fmt="aoti")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(export, "_reference_scores", real)

    def no_export(*a, **k):
        raise RuntimeError("Could not guard on data-dependent expression u0")

    monkeypatch.setattr(torch.export, "export", no_export)
    with pytest.raises(export.ExportError, match="--format aoti: this model could not be compiled"):
        export_checkpoint(trained, tmp_path / "m.pt2", fmt="aoti")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(export.ExportError, match="export format 'onnx'"):
        export_checkpoint(trained, tmp_path / "m.onnx", fmt="onnx")


def test_cli_export_aoti_and_predict(tmp_path, trained):
    """`rocketrec export --format aoti` then `rocketrec predict` on the .pt2: the same
    scores as the TorchScript file of the same checkpoint, in both request forms."""
    exe = venv_bin("rocketrec")
    printed = {}
    for fmt, name in (("aoti", "m.pt2"), ("torchscript", "m.pt")):
        r = subprocess.run(
            [exe, "export", "--checkpoint", str(trained), "--out", str(tmp_path / name),
             "--format", fmt],
            capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        printed[fmt] = r.stdout
    assert "AOTInductor package compiled in" in printed["aoti"], printed["aoti"]
    assert "AOTInductor" not in printed["torchscript"]
    req = tmp_path / "r.jsonl"
    req.write_text(
        '{"user": 1}\n{"ad": "x", "price": 2.5}\n'
        '{"context": {"user": 7}, "candidates": [{"ad": "a"}, {"ad": "b"}, {"ad": "c"}]}\n'
        '{"context": {"user": 7}, "candidates": [{"ad": "a"}]}\n'
    )
    got = {}
    for name in ("m.pt2", "m.pt"):
        p = subprocess.run(
            [exe, "predict", "--model", str(tmp_path / name), "--requests", str(req)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        got[name] = [float(x) for x in p.stdout.split()]
    assert len(got["m.pt2"]) == 6
    assert max(abs(a - b) for a, b in zip(got["m.pt2"], got["m.pt"])) <= 1e-6
    assert read_manifest(tmp_path / "m.pt2")["op_library"]
    # the package calls the operator through its C shims (no proxy executor), and an
    # error inside the operator reaches Python with the operator's own message
    import zipfile

    import torch

    from rocketrec.serving.ops import load_model

    with zipfile.ZipFile(tmp_path / "m.pt2") as z:
        cpp = "".join(z.read(n).decode() for n in z.namelist() if n.endswith(".wrapper.cpp"))
    assert "aoti_torch_cpu_light_first_layer(" in cpp and "proxy_executor_call" not in cpp
    m = load_model(tmp_path / "m.pt2")
    with pytest.raises(RuntimeError, match="^rocketrec: (dense|lengths) must"):
        m(torch.tensor([1, 2]), torch.tensor([1, 1]), torch.zeros(1, 1))


def test_export_with_light_private_tables(tmp_path, tiny_spec, tiny_data):
    train_small(tiny_spec, tiny_data, tmp_path / "run", steps=5, val=False, light_private_dim=4)
    rep = export_checkpoint(tmp_path / "run", tmp_path / "p.pt", data=tiny_data["val"])
    assert rep["max_abs_diff"] <= 1e-5
    m = read_manifest(tmp_path / "p.pt")
    assert [f["name"] for f in m["sparse_features"]] == ["user", "ad", "tags"]  # inputs unchanged
    assert m["light_private_dim"] == 4
    q = export_checkpoint(tmp_path / "run", tmp_path / "q.pt", int8=True, data=tiny_data["val"])
    assert q["max_abs_diff"] <= export.INT8_TOL


def test_cli_export_booster_and_portable_flags(tmp_path, trained):
    """The flags the job's messages name exist: --booster (comparisons) and --portable."""
    from rocketrec.cli import main

    assert (
        main(["export", "--checkpoint", str(trained), "--out", str(tmp_path / "b.pt"), "--booster"])
        == 0
    )
    assert read_manifest(tmp_path / "b.pt")["tower"] == "booster"
    assert (
        main(
            ["export", "--checkpoint", str(trained), "--out", str(tmp_path / "p.pt"), "--portable"]
        )
        == 0
    )
    assert read_manifest(tmp_path / "p.pt")["op_library"] is None


@pytest.mark.parametrize("portable", [False, True])
def test_scripting_frees_its_tables(tiny_spec, portable):
    """A scripted serving module owns its tables: once dropped, they are freed (frozen
    constants would live as long as the process: every export leaked its tables, and
    the parity gate's load-back held them twice). Measured by resident memory over
    three modules with a 128 MB table."""
    import gc
    from dataclasses import replace
    from functools import partial

    import psutil

    from conftest import small_model
    from rocketrec.model.model import RocketModel

    rows, big = 4_000_000, "t_user"
    spec = replace(
        tiny_spec,
        tables=tuple(replace(t, rows=rows) if t.name == big else t for t in tiny_spec.tables),
    )
    model = RocketModel(spec, small_model(), table_device=torch.device("meta"))
    served, tower = export._what_to_export(model, booster=False)

    def blocks(n: int, d: int):
        for r0 in range(0, n, 1 << 20):
            yield r0, torch.rand(min(1 << 20, n - r0), d)

    sources = {t.name: partial(blocks, t.rows, t.dim) for t in served.tables}
    table_bytes = rows * spec.table(big).dim * 4
    proc = psutil.Process()
    sizes = []
    for _ in range(4):
        m = export.script_serving(served, sources, tower, int8=False, portable=portable)
        assert m is not None
        del m
        gc.collect()
        sizes.append(proc.memory_info().rss)
    growth = sizes[-1] - sizes[0]  # after the first: allocator and TorchScript warm-up
    assert growth < 0.5 * table_bytes, (growth / 1e6, table_bytes / 1e6)


def test_aoti_export_of_a_one_id_tower_takes_any_number_of_ids(tmp_path):
    """A light tower whose one id input the held-out candidates example puts in the context
    (so the example request has exactly one id): torch.export would have specialized the
    number of ids to 1 and the export failed. The package scores requests with 0, 1 and
    many ids, rows and candidates, as the TorchScript file does."""
    from rocketrec.data.synth import SynthConfig, synth
    from rocketrec.serving.ops import load_model
    from rocketrec.spec import load_spec

    path = tmp_path / "one_id.yaml"
    path.write_text(
        "version: 1\nlabel: y\ntables:\n"
        "  - {name: shops, rows: 50, dim: 8}\n  - {name: bands, rows: 5, dim: 8}\n"
        "sparse:\n  - {name: shop, column: shop, table: shops}\n"
        "  - {name: band, column: amount, kind: bucketize, boundaries: [0.5, 3], table: bands}\n"
        "dense:\n  - {name: amount, column: amount, transform: log1p}\n"
    )
    spec = load_spec(path)
    data = {"train": str(tmp_path / "train"), "val": str(tmp_path / "val")}
    synth(spec, data["train"], SynthConfig(rows=1024, seed=1))
    synth(spec, data["val"], SynthConfig(rows=256, seed=2))
    train_small(spec, data, tmp_path / "run", steps=2)
    export_checkpoint(tmp_path / "run", tmp_path / "m.pt2", fmt="aoti", data=data["val"])
    export_checkpoint(tmp_path / "run", tmp_path / "m.pt", data=data["val"])
    aoti, ts = load_model(tmp_path / "m.pt2"), load_model(tmp_path / "m.pt")
    nan = float("nan")
    rows = (  # 0, 1 and 3 ids over 3 rows
        (torch.tensor([], dtype=torch.int64), torch.tensor([0, 0, 0])),
        (torch.tensor([7]), torch.tensor([0, 1, 0])),
        (torch.tensor([7, 9, 11]), torch.tensor([1, 1, 1])),
    )
    with torch.no_grad():
        for values, lengths in rows:
            dense = torch.tensor([[2.0, 2.0], [nan, nan], [0.1, 0.1]])
            torch.testing.assert_close(aoti(values, lengths, dense), ts(values, lengths, dense))
            # row 0 the context (the shop, or nothing), rows 1..2 candidates (the amount)
            ctx = torch.tensor([[nan, nan], [2.0, 2.0], [0.1, 0.1]])
            lens = torch.tensor([int(lengths.sum() > 0), 0, 0])
            v = values[:1]
            torch.testing.assert_close(
                aoti.score_candidates(v, lens, ctx), ts.score_candidates(v, lens, ctx)
            )


def test_predict_refuses_damaged_or_truncated_model_files(tmp_path, trained):
    """`rocketrec predict` checks the file's records (CRC-32) before loading: a table
    overwritten in the middle is refused naming the record (torch.jit.load alone scored
    it), a cut file is not a model file; each in one line. ROCKETREC_VERIFY_MODEL=0 skips
    the check (and the damaged file then loads)."""
    import os

    good = tmp_path / "m.pt"
    export_checkpoint(trained, good)
    data = good.read_bytes()
    mid = len(data) // 2
    damaged, short = tmp_path / "damaged.pt", tmp_path / "short.pt"
    damaged.write_bytes(
        data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :]
    )
    short.write_bytes(data[:-100])
    req = tmp_path / "r.jsonl"
    req.write_text('{"user": 1}\n')
    exe = venv_bin("rocketrec")
    for path, needle in ((damaged, "is damaged"), (short, "not a model file"), (good, None)):
        r = subprocess.run(
            [exe, "predict", "--model", str(path), "--requests", str(req)],
            capture_output=True,
            text=True,
        )
        err = r.stderr.strip().splitlines()
        if needle is None:
            assert r.returncode == 0 and len(r.stdout.split()) == 1, r.stderr
            continue
        assert r.returncode == 2 and len(err) == 1 and needle in err[0] and str(path) in err[0], (
            r.stderr
        )
    r = subprocess.run(
        [exe, "predict", "--model", str(damaged), "--requests", str(req)],
        capture_output=True, text=True, env={**os.environ, "ROCKETREC_VERIFY_MODEL": "0"},
    )  # fmt: skip
    assert "is damaged" not in r.stderr
