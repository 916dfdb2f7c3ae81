"""Preprocessing written once (crosses, bucketized numbers, max_ids, id mod rows, dense
transforms) against an independent Python reference; context+candidates scoring against
full rows; the Python request parser's forms, limits and errors."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import train_small, venv_bin
from rocketrec.data.batch import DataError, decode_table
from rocketrec.model.preprocess import Preprocess
from rocketrec.serving import requests as rq
from rocketrec.serving.export import export_checkpoint
from rocketrec.serving.manifest import read_manifest
from rocketrec.spec.hashing import CROSS_TEST_VECTORS, cross_hash, fnv1a64

I64 = 1 << 63


# -- an independent reference of the documented semantics --------------------------------


def _ref_ids(spec, row: dict) -> dict[str, list[int]]:
    """Feature -> ids before `mod rows`, for one Python row (None = null)."""
    out: dict[str, list[int]] = {}
    for f in spec.sparse:
        if f.kind in ("scalar", "list"):
            v = row[f.column]
            bag = [] if v is None else (v if isinstance(v, list) else [v])
            bag = [fnv1a64(x) if f.dtype == "string" else x for x in bag if x is not None]
            cap = 1 if f.kind == "scalar" else f.max_ids
            out[f.name] = bag[:cap] if cap else bag
        elif f.kind == "bucketize":
            x = row[f.column]
            if x is None or math.isnan(x):
                out[f.name] = [0]
            else:
                x32 = np.float32(x)
                out[f.name] = [1 + int(sum(np.float32(b) <= x32 for b in f.boundaries))]
    for f in spec.sparse:
        if f.kind == "cross":
            combos: list[list[int]] = [[]]
            for name in f.inputs:
                combos = [c + [x] for c in combos for x in out[name]]
            ids = [cross_hash(c) for c in combos]
            out[f.name] = ids[: f.max_ids] if f.max_ids else ids
    return out


def _ref_dense(f, x) -> float:
    x = f.fill if x is None or math.isnan(x) else float(np.float32(x))
    if f.transform == "log1p":
        return math.log1p(max(x, 0.0))
    if f.transform == "clip":
        return min(
            max(x, f.min if f.min is not None else -math.inf),
            f.max if f.max is not None else math.inf,
        )
    if f.transform == "standardize":
        return (x - f.mean) / f.std
    return x


def _hostile_rows() -> pa.Table:
    """Nulls, empty lists, null elements, huge and negative ids, unicode, numbers on and
    beyond the boundaries, NaN."""
    n = 12
    rng = np.random.default_rng(3)
    city = ["東京", "", None, "zürich", "a" * 300, "😀", "x", None, "new york", "東京", "", "q"]
    tags = [
        [1, 2, 3, 4, 5, 6],
        [],
        None,
        [None, 7],
        [-(I64), I64 - 1],
        [0],
        [5, 5],
        [3],
        [],
        None,
        [1],
        [2, 2, 2, 2, 2],
    ]
    ad = ["ad:1", None, "ad:é", "", "ad:2", "ad:3", None, "ad:4", "ad:5", "ad:6", "ad:7", "ad:8"]
    price = [0.5, 1.0, 0.4999, None, float("nan"), -3.0, 1e30, 100.0, 99.99, 20.0, 5.0, 0.0]
    return pa.table(
        {
            "y": pa.array(rng.integers(0, 2, n), pa.int8()),
            "user_id": pa.array(
                [I64 - 1, -(I64), None, 0, -1, 5, 7, 9, 11, 13, 15, 17], pa.int64()
            ),
            "user_city": pa.array(city, pa.string()),
            "user_tags": pa.array(tags, pa.list_(pa.int64())),
            "ad_id": pa.array(ad, pa.string()),
            "ad_cat": pa.array([3, None, -7, I64 - 1, 0, 1, 2, 3, 4, 5, 6, 7], pa.int64()),
            "ad_price": pa.array(price, pa.float64()),
            "user_age": pa.array(
                [1.0, None, 2.0, 3.0, float("nan"), 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
            ),
        }
    )


def test_cross_hash_vectors():
    for ids, v in CROSS_TEST_VECTORS:
        assert cross_hash(ids) == v
    assert cross_hash([1, 2]) != cross_hash([2, 1])


def test_preprocess_matches_reference(cross_spec):
    """Training-side ids (the model's Preprocess on decoded Parquet rows), scripted and
    eager, equal the documented semantics computed independently in Python."""
    spec = cross_spec
    table = _hostile_rows()
    batch = decode_table(table, spec, "hostile.parquet").to_batch()
    pre = Preprocess(spec)
    scripted = torch.jit.script(pre)
    got_e = pre(batch.sparse.values(), batch.sparse.lengths(), batch.dense)
    got_s = scripted(batch.sparse.values(), batch.sparse.lengths(), batch.dense)
    for a, b in zip(got_e, got_s):
        assert torch.equal(a, b)
    rows, lengths, dense = got_e
    b = table.num_rows
    refs = [_ref_ids(spec, r) for r in table.to_pylist()]
    pos = 0
    for k, name in enumerate(pre.sparse_outputs):
        nrows = spec.table(spec.feature(name).table).rows
        for i in range(b):
            want = [x % nrows for x in refs[i][name]]
            n = int(lengths[k * b + i])
            assert rows[pos : pos + n].tolist() == want, (name, i)
            pos += n
    assert pos == rows.numel()
    for j, name in enumerate(pre.dense_outputs):
        f = spec.feature(name)
        want = [_ref_dense(f, r[f.column]) for r in table.to_pylist()]
        np.testing.assert_allclose(dense[:, j].numpy(), want, rtol=1e-6, atol=1e-6)


def test_bucketize_data_errors(cross_spec):
    t = _hostile_rows()
    bad = t.set_column(t.column_names.index("ad_price"), "ad_price", pa.array(["x"] * t.num_rows))
    with pytest.raises(DataError, match=r"f\.parquet: column 'ad_price' \(dense feature"):
        decode_table(bad, cross_spec, "f.parquet")
    inf = t.set_column(
        t.column_names.index("ad_price"), "ad_price", pa.array([math.inf] * t.num_rows)
    )
    with pytest.raises(DataError, match="infinite"):
        decode_table(inf, cross_spec, "f.parquet")


# -- a trained model with crosses: export, candidates, requests ------------------------------


@pytest.fixture(scope="module")
def cross_model(tmp_path_factory, cross_spec, cross_data):
    d = tmp_path_factory.mktemp("crossmodel")
    train_small(cross_spec, cross_data, d / "run", steps=10)
    rep = export_checkpoint(d / "run", d / "light.pt", data=cross_data["val"])
    assert rep["max_abs_diff"] <= 1e-5
    return d


def test_export_with_crosses_lists_raw_inputs(cross_model):
    m = read_manifest(cross_model / "light.pt")
    # the light tower reads crosses of features it does not read itself: their inputs
    # are model inputs; crosses are computed inside
    assert [f["name"] for f in m["sparse_features"]] == [
        "user_id", "user_city", "user_tags", "ad_id", "ad_cat",
    ]  # fmt: skip
    assert [f["name"] for f in m["dense_features"]] == ["ad_price", "user_age", "price_band"]
    assert {f["name"]: f["kind"] for f in m["features"]}["city_x_cat"] == "cross"
    assert m["cross_hash"]["test_vectors"] == [[list(i), v] for i, v in CROSS_TEST_VECTORS]


def _split_rows(n: int, inputs: list[str], rng) -> list[str]:
    return [x for x in inputs if rng.random() < 0.5]


def test_candidates_equal_full_rows(cross_model, cross_data):
    """Random context/candidate splits: score_candidates == forward on the merged rows."""
    import pyarrow.parquet as pq

    man = read_manifest(cross_model / "light.pt")
    model = torch.jit.load(str(cross_model / "light.pt"))
    names = [f["name"] for f in man["sparse_features"] + man["dense_features"]]
    table = pq.read_table(cross_data["val"]).slice(0, 240)
    rng = np.random.default_rng(0)
    for trial in range(6):
        context = _split_rows(0, names, rng) or names[:1]
        n = [1, 7, 40][trial % 3]
        lines, full = rq.candidate_requests_from_table(table, man, n, context)
        a = rq.score_lines(model, lines, man)
        b = rq.score_lines(model, full, man)
        assert len(a) == len(b) == 240
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, context


def test_candidates_with_hostile_rows(cross_model):
    """Nulls, empty lists, NaN numbers on either side; every input in the context."""
    man = read_manifest(cross_model / "light.pt")
    model = torch.jit.load(str(cross_model / "light.pt"))
    table = _hostile_rows()
    names = [f["name"] for f in man["sparse_features"] + man["dense_features"]]
    for context in (names, names[:2], ["user_tags", "ad_price"], ["price_band", "user_city"]):
        lines, full = rq.candidate_requests_from_table(table, man, 5, context)
        a, b = rq.score_lines(model, lines, man), rq.score_lines(model, full, man)
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, context


def test_request_parser_limits_and_errors(cross_model):
    man = read_manifest(cross_model / "light.pt")
    inp = rq.Inputs(man)
    cases = [
        ("[" * 200_000, "nesting deeper than 32"),
        ('{"user_id": ' + "[" * 40 + "]" * 40 + "}", "nesting deeper"),
        ('{"user_id": "' + "a" * (rq.MAX_LINE_BYTES + 1) + '"}', "longer than"),
        ('{"context": {"user_id": 1}, "candidates": []}', "non-empty list"),
        ('{"context": {"user_id": 1}}', "non-empty list"),
        ('{"context": {}, "candidates": [{}], "x": 1}', "unexpected key 'x'"),
        (
            '{"context": {"user_id": 1}, "candidates": [{"user_id": 2}]}',
            "given in the context and in candidate 0",
        ),
        ('{"context": {"ad_price": 1}, "candidates": [{}, {"ad_price": 2}]}', "candidate 1"),
        ('{"context": [], "candidates": [{}]}', "context: a request must be a JSON object"),
        ('{"context": {}, "candidates": [{"zzz": 1}]}', "candidate 0: unknown feature 'zzz'"),
        ('{"price_band": "cheap"}', "expects a number"),
        ('{"user_id": 1, "user_id": 2}', "duplicate key"),
    ]
    for line, needle in cases:
        with pytest.raises(DataError, match=needle):
            rq.parse_line(line, inp)
    # a candidate's empty bag or null does not conflict with the context
    ok = rq.parse_line(
        '{"context": {"user_id": 1}, "candidates": [{"user_id": []}, {"user_id": null}]}', inp
    )
    assert isinstance(ok, rq.Candidates) and len(ok.candidates) == 2


def test_cli_requests_candidates_and_predict(tmp_path, cross_model, cross_data):
    exe = venv_bin("rocketrec")
    model = str(cross_model / "light.pt")
    out = subprocess.run(
        [exe, "requests", "--model", model, "--data", cross_data["val"], "--rows", "30",
         "--candidates", "8", "--context", "user_id,user_city,user_tags,user_age",
         "--full-rows", str(tmp_path / "full.jsonl"), "--out", str(tmp_path / "c.jsonl")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(len(json.loads(x)["candidates"]) <= 8 for x in lines)
    got = []
    for f in ("c.jsonl", "full.jsonl"):
        p = subprocess.run(
            [exe, "predict", "--model", model, "--requests", str(tmp_path / f)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        got.append([float(x) for x in p.stdout.split()])
    assert len(got[0]) == len(got[1]) == 30
    assert max(abs(a - b) for a, b in zip(*got)) <= 1e-6
    bad = subprocess.run(
        [exe, "requests", "--model", model, "--data", cross_data["val"], "--candidates", "4",
         "--context", "nope"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown input 'nope'" in bad.stderr
    # invalid UTF-8 in a request file: one error line naming the line
    (tmp_path / "bin.jsonl").write_bytes(b'{"user_id": 1}\n{"user_city": "\xff"}\n')
    p = subprocess.run(
        [exe, "predict", "--model", model, "--requests", str(tmp_path / "bin.jsonl")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 2 and "bin.jsonl:2" in p.stderr and "Traceback" not in p.stderr


def test_cli_requests_over_files_whose_types_drift(tmp_path, cross_model, cross_data):
    """`rocketrec requests` reads files that store a column differently (string in one,
    dictionary strings in the next, int32 vs int64) as the trainer does: the requests
    equal those of the undrifted rows; `predict | head -1` ends without a traceback."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    exe = venv_bin("rocketrec")
    model = str(cross_model / "light.pt")
    table = pq.read_table(sorted(glob.glob(cross_data["val"] + "/*.parquet"))[0]).slice(0, 60)
    half = table.slice(30)
    for i, f in enumerate(half.schema):
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            half = half.set_column(i, f.name, half.column(i).dictionary_encode())
        elif pa.types.is_int64(f.type) and f.name != "y":
            half = half.set_column(i, f.name, half.column(i).cast(pa.int32(), safe=False))
    assert any(pa.types.is_dictionary(f.type) for f in half.schema)
    (tmp_path / "drift").mkdir()
    (tmp_path / "plain").mkdir()
    pq.write_table(table.slice(0, 30), tmp_path / "drift" / "a.parquet")
    pq.write_table(half, tmp_path / "drift" / "b.parquet")
    pq.write_table(table, tmp_path / "plain" / "a.parquet")
    got = {}
    for d in ("drift", "plain"):
        out = subprocess.run(
            [exe, "requests", "--model", model, "--data", str(tmp_path / d), "--rows", "60",
             "--out", str(tmp_path / f"{d}.jsonl")],
            capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        got[d] = (tmp_path / f"{d}.jsonl").read_text().splitlines()
    assert len(got["drift"]) == 60
    if any(pa.types.is_int64(f.type) for f in table.schema):  # int32 ids read back exactly
        small = all(
            v is None or abs(v) < 2**31
            for f in table.schema
            if pa.types.is_int64(f.type) and f.name != "y"
            for v in table.slice(30).column(f.name).to_pylist()
        )
        if small:
            assert got["drift"] == got["plain"]
    assert got["drift"][:30] == got["plain"][:30]
    many = tmp_path / "many.jsonl"  # scores past a pipe's buffer: head leaves first
    many.write_text("\n".join(got["drift"] * 400) + "\n")
    head = subprocess.run(
        f"'{exe}' predict --model '{model}' --requests '{many}' | head -1",
        shell=True, capture_output=True, text=True,
    )  # fmt: skip
    assert len(head.stdout.split()) == 1 and "Traceback" not in head.stderr, head.stderr


def test_train_refuses_unservable_settings_before_training(tmp_path, tiny_spec_path, tiny_data):
    exe = venv_bin("rocketrec")
    common = [exe, "train", "--spec", str(tiny_spec_path), "--train", tiny_data["train"]]
    r = subprocess.run(
        [*common, "--out", str(tmp_path / "a"), "--shared-bottom", "8"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--shared-bottom" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    five = tmp_path / "dims.yaml"  # a light tower on five embedding dims: not servable
    five.write_text(
        "version: 1\nlabel: y\ntables:\n"
        + "".join(f"  - {{name: t{d}, rows: 10, dim: {d}}}\n" for d in (4, 8, 12, 16, 20))
        + "sparse:\n"
        + "".join(f"  - {{name: f{d}, column: f{d}, table: t{d}}}\n" for d in (4, 8, 12, 16, 20))
    )
    r = subprocess.run(
        [
            exe,
            "train",
            "--spec",
            str(five),
            "--train",
            tiny_data["train"],
            "--out",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "5 embedding dims" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1
    # --no-export trains it, but says at the start that a later export would refuse it
    data = tmp_path / "five_data"
    synth = [exe, "synth", "--spec", str(five), "--rows", "300", "--out", str(data), "--quiet"]
    subprocess.run(synth, check=True)
    r = subprocess.run(
        [
            *common[:2],
            "--spec",
            str(five),
            "--train",
            str(data),
            "--out",
            str(tmp_path / "c"),
            "--no-export",
            "--max-steps",
            "1",
            "--batch-size",
            "64",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "warning: --no-export" in r.stderr and "5 embedding dims" in r.stderr, r.stderr


def test_preprocess_hash_constants_match_hashing():
    import inspect

    import rocketrec.model.preprocess as pp
    from rocketrec.spec.hashing import FMIX_C1, FMIX_C2, FNV_OFFSET, FNV_PRIME

    def s64(x: int) -> int:
        return x - (1 << 64) if x >= 1 << 63 else x

    src = inspect.getsource(pp)
    for c in (s64(FNV_OFFSET), FNV_PRIME, s64(FMIX_C1), s64(FMIX_C2), (1 << 31) - 1):
        assert str(c) in src
    # and the torch implementation equals the reference on the test vectors
    for ids, v in CROSS_TEST_VECTORS:
        h = torch.bitwise_xor(torch.tensor([ids[0]]), s64(FNV_OFFSET)) * FNV_PRIME
        for x in ids[1:]:
            h = torch.bitwise_xor(h, torch.tensor([x])) * FNV_PRIME
        assert int(pp.fmix64(h)) == v
