"""End to end: export a trained model, build deploy/cpp with CMake against the wheel's
libtorch, and check the C++ predictor against Python on the same requests."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, bump_manifest_format, train_small
from rocketrec.serving.export import export_checkpoint
from rocketrec.serving.manifest import read_manifest
from rocketrec.serving.requests import parse_requests
from rocketrec.spec.hashing import TEST_VECTORS, fnv1a64

pytestmark = pytest.mark.e2e


def build_predictor(build_dir: Path, *extra: str, target: str = "rocketrec_predict") -> Path:
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
            *extra,
        ],
        capture_output=True,
        text=True,
    )
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    b = subprocess.run(["cmake", "--build", str(build_dir), "-j2"], capture_output=True, text=True)
    assert b.returncode == 0, b.stdout + b.stderr
    exe = build_dir / target
    assert exe.exists()
    return exe


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Path:
    return build_predictor(tmp_path_factory.mktemp("cppbuild"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_spec, tiny_data) -> Path:
    d = tmp_path_factory.mktemp("cppexp")
    train_small(tiny_spec, tiny_data, d / "run", steps=8)
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


def test_bad_model_files_fail_cleanly(predictor, cross_exported, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    for path, why in ((junk, "not a model file"), (tmp_path / "missing.pt", "cannot open")):
        out = subprocess.run(
            [str(predictor), str(path), "-"], input="{}\n", capture_output=True, text=True
        )
        assert out.returncode == 2 and why in out.stderr and str(path) in out.stderr, out.stderr
    # damaged copies of real exports: bytes overwritten inside the tables, or cut short
    for name in ("light.pt", "light.pt2"):
        data = (cross_exported / name).read_bytes()
        bad = tmp_path / f"damaged_{name}"
        mid = len(data) // 2
        bad.write_bytes(
            data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :]
        )
        short = tmp_path / f"short_{name}"
        short.write_bytes(data[: len(data) - 100])
        for path, why in ((bad, "is damaged (CRC-32"), (short, "not a model file")):
            out = subprocess.run(
                [str(predictor), str(path), "-"], input="{}\n", capture_output=True, text=True
            )
            err = out.stderr.strip().splitlines()
            assert out.returncode == 2 and len(err) == 1 and why in err[0], (path, out.stderr)
            assert str(path) in err[0]
    # without the check (ROCKETREC_VERIFY_MODEL=0) the damaged TorchScript file loads: the
    # check is what refuses it
    out = subprocess.run(
        [str(predictor), str(tmp_path / "damaged_light.pt"), "-"],
        input="{}\n", capture_output=True, text=True,
        env={**os.environ, "ROCKETREC_VERIFY_MODEL": "0"},
    )  # fmt: skip
    assert "is damaged" not in out.stderr
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
    batch = [r for r in rows if r["mode"] == "batch"]
    assert [r["batch"] for r in batch] == [1, 16, 256]
    assert all(0 < r["p50_us"] <= r["p99_us"] for r in batch)
    (cand,) = [r for r in rows if r["mode"] == "candidates"]
    assert cand["candidates"] == 200 and cand["max_abs_diff"] <= 1e-6 and cand["batch_p50_us"] > 0
    (threads,) = [r for r in rows if r["mode"] == "threads"]
    assert threads["threads"] == 2 and threads["rps"] > 0 and threads["rps_1"] > 0


def test_bench_paired_times_the_models_in_turns(predictor, cross_exported, tmp_path):
    """--bench-paired: every model timed in every kind, all with the same number of calls
    (they take turns in blocks over the same seconds); --only picks one kind; a model that
    does not load is named."""
    a, b = cross_exported / "light.pt", cross_exported / "light_int8.pt"
    out = subprocess.run(
        [str(predictor), "--bench-paired", str(a), str(b), "--seconds", "0.05"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    # the column forms score what the Request forms score, bit for bit, per model
    checks = [r for r in rows if r["mode"] == "paired_columns_check"]
    assert sorted(r["model"] for r in checks) == sorted([str(a), str(b)])
    assert all(r["max_abs_diff"] == 0 for r in checks), checks
    rows = [r for r in rows if r["mode"] == "paired"]
    kinds = (
        "batch1",
        "batch16",
        "batch256",
        "candidates",
        "candidate_rows",
        "candidates_columns",
        "candidate_rows_columns",
    )
    assert {(r["kind"], r["model"]) for r in rows} == {(k, str(m)) for k in kinds for m in (a, b)}
    assert len(rows) == 2 * len(kinds)
    for k in kinds:
        ns = {r["n"] for r in rows if r["kind"] == k}
        assert len(ns) == 1 and ns.pop() >= 14 * 4, k  # same calls for both, >= 4 turns
    assert all(0 < r["p50_us"] <= r["p99_us"] for r in rows)
    one = subprocess.run(
        [str(predictor), "--bench-paired", str(a), "--only", "batch16", "--seconds", "0.02"],
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    assert [json.loads(x)["kind"] for x in one.stdout.splitlines()] == ["batch16"]
    missing = tmp_path / "nope.pt"
    bad = subprocess.run(
        [str(predictor), "--bench-paired", str(a), str(missing)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and str(missing) in bad.stderr


# -- crosses, bucketized numbers, context + candidates ---------------------------------


@pytest.fixture(scope="module")
def cross_exported(tmp_path_factory, cross_spec, cross_data) -> Path:
    d = tmp_path_factory.mktemp("cppcross")
    train_small(cross_spec, cross_data, d / "run", steps=8)
    export_checkpoint(d / "run", d / "light.pt", data=cross_data["val"])
    export_checkpoint(d / "run", d / "light_int8.pt", int8=True, data=cross_data["val"])
    # the same checkpoint as AOTInductor packages (export --format aoti)
    export_checkpoint(d / "run", d / "light.pt2", data=cross_data["val"], fmt="aoti")
    export_checkpoint(
        d / "run", d / "light_int8.pt2", int8=True, data=cross_data["val"], fmt="aoti"
    )
    return d


def _hostile_requests(path: str, manifest: dict, n: int) -> tuple[list[str], list[str]]:
    """One-row and context+candidates requests from Parquet rows, with nulls, empty
    lists, extreme ids, unicode strings, NaN-like nulls and numbers off the boundaries;
    and the same rows as one-row requests (for comparison)."""
    from rocketrec.serving import requests as rq

    rows = pq.read_table(path).slice(0, n)
    rng = random.Random(5)
    one = rq.requests_from_table(rows, manifest)
    edits = []
    for i, line in enumerate(one):
        r = json.loads(line)
        k = i % 6
        if k == 0:
            r["user_id"] = rng.choice([-(2**63), 2**63 - 1, 0, -1])
        elif k == 1:
            r["user_city"] = rng.choice(["東京", "", "😀 x", "zürich", None])
        elif k == 2:
            r["user_tags"] = rng.choice([[], None, [None, 3], list(range(9))])
        elif k == 3:
            r["ad_price"] = rng.choice([None, -5.0, 0.5, 1e30, 100.0])
        elif k == 4:
            r["ad_cat"] = None
        edits.append(r)
    full = [json.dumps(r) for r in edits]
    grouped = []
    for g in range(0, len(edits), 10):
        group = edits[g : g + 10]
        ctx_keys = rng.sample(sorted(group[0]), k=rng.randint(0, len(group[0])))
        ctx = {k: group[0][k] for k in ctx_keys}
        cands = [{k: v for k, v in r.items() if k not in ctx_keys} for r in group]
        grouped.append(json.dumps({"context": ctx, "candidates": cands}))
        for j, c in enumerate(cands):
            full[g + j] = json.dumps({**ctx, **c})
    return grouped, full


def _one_candidate(grouped: list[str]) -> list[str]:
    """Each context+candidates request cut to its first candidate."""
    out = []
    for line in grouped:
        r = json.loads(line)
        out.append(json.dumps({"context": r["context"], "candidates": r["candidates"][:1]}))
    return out


@pytest.mark.parametrize("name", ["light.pt", "light_int8.pt", "light.pt2", "light_int8.pt2"])
def test_cpp_crosses_and_candidates_match_python(
    predictor, cross_exported, cross_data, name, tmp_path
):
    """C++ vs Python on a model with crosses and bucketized numbers, in every request form
    (rows, context + 10 candidates, context + 1 candidate), TorchScript files and
    AOTInductor packages alike; context+candidates requests equal the merged full rows."""
    from rocketrec.serving import requests as rq
    from rocketrec.serving.ops import load_model

    model = cross_exported / name
    man = read_manifest(model)
    grouped, full = _hostile_requests(cross_data["val"], man, 300)
    ones = _one_candidate(grouped[:5])
    mixed = full[:50] + grouped + full[50:80] + ones
    req = tmp_path / "req.jsonl"
    req.write_text("\n".join(mixed) + "\n")
    out = subprocess.run(
        [str(predictor), str(model), str(req), "--batch", "16"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    cpp = [float(x) for x in out.stdout.split()]
    m = load_model(model)
    py = rq.score_lines(m, mixed, man)
    assert len(cpp) == len(py) == 50 + 300 + 30 + 5
    assert max(abs(a - b) for a, b in zip(cpp, py)) <= 1e-6
    # the same lines through the Predictor's column API (rocketrec::Columns): bit for bit
    cols = subprocess.run(
        [str(predictor), str(model), str(req), "--batch", "16", "--columns"],
        capture_output=True,
        text=True,
    )
    assert cols.returncode == 0 and cols.stdout == out.stdout, cols.stderr
    # the candidates' scores equal the full rows' (Python and C++ alike)
    cand = cpp[50:350]
    full_py = rq.score_lines(m, full, man)
    assert max(abs(a - b) for a, b in zip(cand, full_py)) <= 1e-6
    assert max(abs(a - full_py[10 * g]) for g, a in enumerate(cpp[380:])) <= 1e-6
    if name.endswith(".pt2"):  # the package scores as the TorchScript file of the same model
        ts = load_model(cross_exported / name.replace(".pt2", ".pt"))
        assert max(abs(a - b) for a, b in zip(py, rq.score_lines(ts, mixed, man))) <= 1e-6
        # its tables copied onto huge pages (every constant: these are small) or left where
        # torch loaded them: the same scores, bit for bit
        for pages in ("all", "0"):
            again = subprocess.run(
                [str(predictor), str(model), str(req), "--batch", "16"],
                capture_output=True,
                text=True,
                env={**os.environ, "ROCKETREC_HUGE_PAGES": pages},
            )
            assert again.returncode == 0 and again.stdout == out.stdout, again.stderr


def test_cpp_aoti_package_is_detected_and_checked(predictor, cross_exported, tmp_path):
    """The C++ predictor detects a .pt2 by its content (any file name), runs it as
    `aoti`, refuses a bumped manifest format before loading, and a damaged package with
    one error line."""
    renamed = tmp_path / "model.bin"
    shutil.copy(cross_exported / "light.pt2", renamed)
    req = '{"user_id": 3}\n'
    out = subprocess.run([str(predictor), str(renamed)], input=req, capture_output=True, text=True)
    assert out.returncode == 0 and 0 < float(out.stdout) < 1, out.stderr
    bumped = bump_manifest_format(
        cross_exported / "light.pt2", tmp_path / "b.pt2", "rocketrec-light/99"
    )
    out = subprocess.run([str(predictor), str(bumped)], input=req, capture_output=True, text=True)
    assert out.returncode == 2 and "manifest format 'rocketrec-light/99'" in out.stderr, out.stderr
    with pytest.raises(Exception, match="rocketrec-light/99"):
        read_manifest(bumped)
    cut = tmp_path / "cut.pt2"
    data = (cross_exported / "light.pt2").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    out = subprocess.run([str(predictor), str(cut)], input=req, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr


def test_a_model_for_another_op_library_version_is_refused(predictor, exported, tmp_path):
    """A file exported for op library version 1 (before the forward's first layer moved
    into the operator) is refused, by the C++ predictor and by Python alike, naming both
    versions."""
    from rocketrec.serving.ops import OPS_VERSION, OpsLibraryError, load_model

    old = bump_manifest_format(exported / "light.pt", tmp_path / "v1.pt", None, op_version=1)
    req = tmp_path / "r.jsonl"
    req.write_text("{}\n")
    out = subprocess.run([str(predictor), str(old), str(req)], capture_output=True, text=True)
    want = f"needs rocketrec op library version 1, the loaded librocketrec_ops.so is version {OPS_VERSION}"
    assert out.returncode != 0 and want in out.stderr, out.stderr
    with pytest.raises(OpsLibraryError, match=want.replace(".", r"\.")):
        load_model(old)
    load_model(exported / "light.pt")  # the file as exported loads


def test_cpp_cross_hash_matches_python(predictor):
    from rocketrec.spec.hashing import CROSS_TEST_VECTORS, cross_hash

    rng = random.Random(2)
    cases = [list(ids) for ids, _ in CROSS_TEST_VECTORS] + [
        [rng.randint(-(2**63), 2**63 - 1) for _ in range(rng.randint(2, 4))] for _ in range(40)
    ]
    out = subprocess.run(
        [str(predictor), "--cross-hash", *[",".join(map(str, c)) for c in cases]],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert [int(x) for x in out.stdout.split()] == [cross_hash(c) for c in cases]


def test_cpp_api_checks_sizes(predictor, cross_exported):
    out = subprocess.run(
        [str(predictor), str(cross_exported / "light.pt"), "--self-test"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    # 7 checks of Request rows, 8 of Columns, an empty row's score (Columns == Request),
    # inputs a caller keeps not written over by the Predictor's reused input tensors
    assert len(lines) == 17 and all(x.startswith("ok ") for x in lines), lines
    assert sum(x.startswith("ok columns: ") for x in lines) == 8
    assert "ok inputs a caller keeps are not reused" in lines


def _mutate(line: bytes, rng: random.Random) -> bytes:
    b = bytearray(line)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip a byte
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1:  # insert JSON punctuation
            b[i:i] = rng.choice(
                [b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"null", b"-", b"e9"]
            )
        elif op == 2:  # truncate
            b = b[:i]
        elif op == 3:  # duplicate a slice
            j = rng.randrange(i, len(b) + 1)
            b[i:i] = b[i:j]
        elif op == 4:  # a number type swap or an extreme number
            b[i:i] = rng.choice(
                [b"1e400", b"-0", b"99999999999999999999999", b"1.5", b"true", b"NaN"]
            )
        elif op == 5:  # deep nesting
            d = rng.choice([5, 31, 33, 1000])
            b[i:i] = b"[" * d + b"]" * d
        else:  # invalid or odd unicode
            b[i:i] = rng.choice([b"\xff\xfe", b"\xc3", b"\\ud800", b"\\u0000", "😀".encode()])
    return bytes(b).replace(b"\n", b" ")


def _fuzz_lines(valid: list[str], n: int) -> list[bytes]:
    rng = random.Random(7)
    out: list[bytes] = [v.encode() for v in valid]
    tokens = [
        b"{",
        b"}",
        b"[",
        b"]",
        b'"user_id"',
        b'"ad_id"',
        b":",
        b",",
        b"1",
        b'"x"',
        b"null",
        b"-1e5",
        b'"context"',
        b'"candidates"',
        b'"sparse"',
        b'"dense"',
    ]
    while len(out) < n:
        if rng.random() < 0.7:
            out.append(_mutate(rng.choice(valid).encode(), rng))
        else:
            out.append(b"".join(rng.choice(tokens) for _ in range(rng.randint(0, 40))))
    out.append(b"[" * 200_000)
    out.append(b'{"user_id": "' + b"a" * (1 << 20) + b'"}')
    return out


def test_fuzz_requests_never_crash(predictor, cross_exported, cross_data, tmp_path):
    """>= 20,000 random and mutated request lines through the request parser built with
    -fsanitize=address,undefined (no libtorch), then through rocketrec_predict: every line
    gives a score per row or exactly one error line; no crash, no sanitizer report."""
    parse_check = build_predictor(
        tmp_path / "asan", "-DROCKETREC_SANITIZE=ON", target="parse_check"
    )
    model = cross_exported / "light.pt"
    man = read_manifest(model)
    grouped, full = _hostile_requests(cross_data["val"], man, 200)
    lines = _fuzz_lines(grouped + full, 20_500)
    assert len(lines) >= 20_000
    data = b"\n".join(lines) + b"\n"
    (tmp_path / "m.json").write_text(json.dumps(man))
    env = dict(
        os.environ,
        ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
    )
    pc = subprocess.run(
        [str(parse_check), str(tmp_path / "m.json")], input=data, capture_output=True, env=env
    )
    assert pc.returncode == 0, pc.stderr[-3000:]
    assert pc.stderr == b"", pc.stderr[-3000:]
    verdicts = pc.stdout.decode().splitlines()
    assert len(verdicts) == len(lines)
    assert all(v.startswith(("ok rows=", "error: ")) for v in verdicts)
    n_ok = sum(v.startswith("ok") for v in verdicts)
    assert 300 <= n_ok < len(lines) - 1000, n_ok  # both kinds are exercised
    # the real program on the same lines: a score per row or one error line per line
    (tmp_path / "fuzz.jsonl").write_bytes(data)
    run = subprocess.run(
        [str(predictor), str(model), str(tmp_path / "fuzz.jsonl"), "--keep-going"],
        capture_output=True,
    )
    assert run.returncode == 1, run.stderr[-2000:]  # some lines failed, none crashed
    got = run.stdout.decode().splitlines()
    want = 0
    for line, v in zip(lines, verdicts):
        if not line.strip(b" \t\r"):
            continue  # blank lines are skipped
        want += int(v.split("=")[1]) if v.startswith("ok") else 1
    assert len(got) == want
    assert all(g.startswith("error: ") or 0.0 <= float(g) <= 1.0 for g in got)


# -- the op library, the minimal server of deploy/README.md, runtimes, portable models ------


def _readme_block(lang: str, first_line: str) -> str:
    text = (ROOT / "deploy" / "README.md").read_text()
    for block in text.split("```" + lang + "\n")[1:]:
        code = block.split("```")[0]
        if code.startswith(first_line):
            return code
    raise AssertionError(f"deploy/README.md has no ```{lang} block starting {first_line!r}")


@pytest.fixture(scope="module")
def minimal_server(tmp_path_factory) -> Path:
    """deploy/README.md's minimal server, built from the README's own two blocks."""
    src = tmp_path_factory.mktemp("minimal")
    (src / "minimal_server.cpp").write_text(_readme_block("cpp", "// minimal_server.cpp"))
    (src / "CMakeLists.txt").write_text(
        _readme_block("cmake", "# CMakeLists.txt for minimal_server")
    )
    b = src / "build"
    cfg = subprocess.run(
        [
            "cmake",
            "-S",
            str(src),
            "-B",
            str(b),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        ],
        capture_output=True,
        text=True,
    )
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    out = subprocess.run(["cmake", "--build", str(b), "-j2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return b / "minimal_server"


def _inputs_text(v, l, d) -> str:
    return "\n".join(
        [
            " ".join(map(str, v.tolist())),
            " ".join(map(str, l.tolist())),
            " ".join(repr(float(x)) for x in d.reshape(-1).tolist()),
            str(d.shape[1]),
        ]
    )


def test_minimal_server_from_readme(minimal_server, predictor, cross_exported, cross_data):
    """A server written from deploy/README.md alone (libtorch + dlopen of the op library)
    scores like Python; without the library it fails with one line naming it."""
    from rocketrec.serving.ops import load_model
    from rocketrec.spec import spec_from_dict

    lib = predictor.parent / "librocketrec_ops.so"
    assert lib.exists()
    for name in ("light.pt", "light_int8.pt", "light.pt2", "light_int8.pt2"):
        model = cross_exported / name
        spec = spec_from_dict(read_manifest(model)["spec"])
        t = pq.read_table(cross_data["val"]).slice(0, 300)
        from rocketrec.serving.requests import raw_inputs_from_table

        x = raw_inputs_from_table(t, spec)
        out = subprocess.run(
            [str(minimal_server), str(model), str(lib)],
            input=_inputs_text(*x),
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        cpp = torch.tensor([float(s) for s in out.stdout.split()])
        with torch.no_grad():
            py = load_model(model)(*x)
        assert cpp.shape == py.shape == (300,)
        assert float((cpp - py).abs().max()) <= 1e-6
    for name in ("light.pt", "light.pt2"):
        out = subprocess.run(
            [str(minimal_server), str(cross_exported / name)],
            input=_inputs_text(*x),
            capture_output=True,
            text=True,
        )
        assert out.returncode == 1 and "librocketrec_ops.so" in out.stderr, (name, out.stderr)


def test_json_server_from_readme(tmp_path_factory, cross_exported, cross_data):
    """deploy/README.md's JSON-lines server on the Predictor, built as the README says
    (CMake, add_subdirectory of deploy/cpp): every request form, .pt and .pt2, scores as
    Python; a bad line is named and the rest go on; a missing model is one line."""
    import sys

    from rocketrec.serving import requests as rq
    from rocketrec.serving.ops import load_model

    src = tmp_path_factory.mktemp("json_server")
    (src / "json_server.cpp").write_text(_readme_block("cpp", "// json_server.cpp"))
    (src / "CMakeLists.txt").write_text(_readme_block("cmake", "# CMakeLists.txt for json_server"))
    b = src / "build"
    cfg = subprocess.run(
        ["cmake", "-S", str(src), "-B", str(b), f"-DROCKETREC_DIR={ROOT}",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    out = subprocess.run(
        ["cmake", "--build", str(b), "-j2"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    exe = b / "json_server"
    for name in ("light.pt", "light.pt2"):
        model = cross_exported / name
        man = read_manifest(model)
        grouped, full = _hostile_requests(cross_data["val"], man, 60)
        lines = full[:20] + grouped + ['{"no_such_input": 1}'] + _one_candidate(grouped[:2])
        r = subprocess.run(
            [str(exe), str(model)], input="\n".join(lines) + "\n", capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        got = r.stdout.splitlines()
        bad = 20 + 60
        assert (
            got[bad].startswith(f"error: line {20 + len(grouped) + 1}: ")
            and "no_such_input" in got[bad]
        )
        cpp = [float(x) for x in got[:bad] + got[bad + 1 :]]
        good = lines[: 20 + len(grouped)] + lines[20 + len(grouped) + 1 :]
        py = rq.score_lines(load_model(model), good, man)
        assert len(cpp) == len(py) == 20 + 60 + 2
        assert max(abs(a - c) for a, c in zip(cpp, py)) <= 1e-6
    r = subprocess.run(
        [str(exe), str(tmp_path_factory.mktemp("none") / "light.pt2")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_predictor_without_op_library_fails_in_one_line(predictor, cross_exported, tmp_path):
    env = {**os.environ, "ROCKETREC_OPS_LIBRARY": str(tmp_path / "missing" / "librocketrec_ops.so")}
    out = subprocess.run(
        [str(predictor), str(cross_exported / "light.pt"), "-"],
        input="{}\n",
        capture_output=True,
        text=True,
        env=env,
    )
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert "librocketrec_ops.so" in err[0] and "missing" in err[0] and "--portable" in err[0]


def test_portable_model_needs_no_library(predictor, cross_exported, cross_data, tmp_path):
    """export --portable: plain torch ops; C++ (no op library reachable) == Python == fused."""
    from rocketrec.serving import requests as rq

    model = tmp_path / "portable.pt"
    rep = export_checkpoint(cross_exported / "run", model, data=cross_data["val"], portable=True)
    assert rep["portable"] and rep["max_abs_diff"] <= 1e-5
    man = read_manifest(model)
    assert man["op_library"] is None and "ops.rocketrec" not in torch.jit.load(str(model)).code
    grouped, full = _hostile_requests(cross_data["val"], man, 120)
    lines = full[:40] + grouped
    env = {**os.environ, "ROCKETREC_OPS_LIBRARY": str(tmp_path / "none.so")}
    out = subprocess.run(
        [str(predictor), str(model), "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    cpp = [float(s) for s in out.stdout.split()]
    fused = rq.score_lines(torch.jit.load(str(cross_exported / "light.pt")), lines, man)
    py = rq.score_lines(torch.jit.load(str(model)), lines, man)
    assert max(abs(a - b) for a, b in zip(cpp, py)) <= 1e-6
    assert max(abs(a - b) for a, b in zip(fused, py)) <= 1e-6


def test_runtimes_agree(predictor, cross_exported, cross_data, tmp_path):
    """Static Runtime (default) and the interpreter give the same scores, both entry points."""
    man = read_manifest(cross_exported / "light.pt")
    grouped, full = _hostile_requests(cross_data["val"], man, 100)
    req = tmp_path / "r.jsonl"
    req.write_text("\n".join(full[:30] + grouped) + "\n")
    outs = []
    for rt in ("static", "interpreter", "static-all"):
        out = subprocess.run(
            [str(predictor), str(cross_exported / "light.pt"), str(req), "--runtime", rt],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        outs.append([float(s) for s in out.stdout.split()])
    assert len(outs[0]) == 130
    for other in outs[1:]:
        assert max(abs(a - b) for a, b in zip(outs[0], other)) <= 1e-6
    bad = subprocess.run(
        [str(predictor), str(cross_exported / "light.pt"), str(req), "--runtime", "jit"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--runtime" in bad.stderr


@pytest.mark.parametrize(
    "line,needle",
    [
        ('{"ad_id": 9}', "expects string ids, got number"),
        ('{"user_id": 4.5}', "expects int64 ids"),
        ('{"user_id": 4.0}', "expects int64 ids"),
        ('{"context": {"user_id": 1}, "candidates": []}', "non-empty list"),
        ('{"context": {"user_id": 1}, "user_id": 2}', "unexpected key 'user_id'"),
        (
            '{"sparse": {"ad_price": 50}, "dense": [1, 2, 3]}',
            "'ad_price' is given in 'sparse' and in 'dense'",
        ),
    ],
)
def test_documented_request_cases(predictor, cross_exported, line, needle):
    """The request cases deploy/README.md documents, in C++ and in Python."""
    from rocketrec.serving import requests as rq

    out = subprocess.run(
        [str(predictor), str(cross_exported / "light.pt"), "-"],
        input=line + "\n",
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and needle in out.stderr, out.stderr
    man = read_manifest(cross_exported / "light.pt")
    with pytest.raises(rq.DataError, match=needle.split(",")[0].replace("'", ".")):
        rq.score_lines(torch.jit.load(str(cross_exported / "light.pt")), [line], man)


# -- behaviour sequences: the light tower reads one as a mean-pooled bag -----------------


@pytest.fixture(scope="module")
def seq_exported(tmp_path_factory, seq_spec, seq_data) -> Path:
    """The sequence spec (sequence tables in TorchRec's EmbeddingCollection, one shared
    with the query's bag feature); the light tower reads `hist_cats` as a mean bag."""
    d = tmp_path_factory.mktemp("cppseq")
    train_small(seq_spec, seq_data, d / "run", steps=8)
    export_checkpoint(d / "run", d / "light.pt", data=seq_data["val"])
    export_checkpoint(d / "run", d / "light_int8.pt", int8=True, data=seq_data["val"])
    export_checkpoint(d / "run", d / "portable.pt", portable=True, data=seq_data["val"])
    export_checkpoint(d / "run", d / "booster.pt", booster=True, data=seq_data["val"])
    export_checkpoint(
        d / "run", d / "booster_int8.pt", booster=True, int8=True, data=seq_data["val"]
    )
    return d


def _cpp_matches_python_in_every_form(predictor, model, man, one, ctx_keys, n_single, tmp_path):
    """Rows `one` (request dicts) scored by the C++ predictor and Python: the first
    `n_single` as one-row requests, then all of them as groups of 20 candidates under the
    context `ctx_keys`; C++ = Python, and the candidates = the same rows merged."""
    from rocketrec.serving import requests as rq

    full = [json.dumps(r) for r in one]
    grouped = []
    for g in range(0, len(one), 20):
        ctx = {k: one[g][k] for k in ctx_keys}
        cands = [{k: v for k, v in r.items() if k not in ctx} for r in one[g : g + 20]]
        grouped.append(json.dumps({"context": ctx, "candidates": cands}))
        for j, c in enumerate(cands):
            full[g + j] = json.dumps({**ctx, **c})
    mixed = full[:n_single] + grouped
    req = tmp_path / "req.jsonl"
    req.write_text("\n".join(mixed) + "\n")
    out = subprocess.run(
        [str(predictor), str(model), str(req), "--batch", "16"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    cpp = [float(x) for x in out.stdout.split()]
    m = torch.jit.load(str(model))
    py = rq.score_lines(m, mixed, man)
    assert len(cpp) == len(py) == n_single + len(one)
    assert max(abs(a - b) for a, b in zip(cpp, py)) <= 1e-6
    full_py = rq.score_lines(m, full, man)  # candidates = the same rows merged
    assert max(abs(a - b) for a, b in zip(cpp[n_single:], full_py)) <= 1e-6
    return m


@pytest.mark.parametrize("name", ["light.pt", "light_int8.pt", "portable.pt"])
def test_cpp_matches_python_with_a_sequence_in_the_light_tower(
    predictor, seq_exported, seq_data, name, tmp_path
):
    """Every request form (one row, context + candidates) with the sequence as a list of
    ids, beyond max_len too; C++ = Python; the manifest says kind sequence, mean pooling."""
    from rocketrec.serving import requests as rq

    model = seq_exported / name
    man = read_manifest(model)
    hist = [f for f in man["sparse_features"] if f["name"] == "hist_cats"]
    assert hist and hist[0]["kind"] == "sequence" and hist[0]["pooling"] == "mean", man
    assert hist[0]["max_ids"] == 4
    assert all(f["name"] != "hist_ads" for f in man["sparse_features"])  # booster only
    rows = pq.read_table(seq_data["val"]).slice(0, 200)
    one = [json.loads(x) for x in rq.requests_from_table(rows, man)]
    for i, r in enumerate(one):
        if i % 5 == 0:
            r["hist_cats"] = list(range(1, 12))  # longer than max_len: the first 4 count
        elif i % 5 == 1:
            r["hist_cats"] = []
    # the user's history in the context, ads as candidates
    ctx_keys = ("user", "hist_cats", "price")
    m = _cpp_matches_python_in_every_form(predictor, model, man, one, ctx_keys, 40, tmp_path)
    # the history matters to the light tower, and only its first max_len ids do
    a = dict(one[2], hist_cats=[5, 6, 7, 8])
    b = dict(one[2], hist_cats=[5, 6, 7, 8, 9, 10])
    c = dict(one[2], hist_cats=[9, 10, 11, 12])
    s = rq.score_lines(m, [json.dumps(x) for x in (a, b, c)], man)
    assert abs(s[0] - s[1]) <= 1e-6 and abs(s[0] - s[2]) > 1e-4, s


@pytest.mark.parametrize("name", ["booster.pt", "booster_int8.pt"])
def test_cpp_matches_python_for_the_booster_with_target_attention(
    predictor, seq_exported, seq_data, name, tmp_path
):
    """`export --booster` on a spec with sequences packages the booster's target attention
    (its parity gate against the training model passed, or nothing was written): C++ =
    Python in every request form, the histories in the context attended by each
    candidate; a history's items beyond max_len do not count, its contents do."""
    from rocketrec.serving import requests as rq

    model = seq_exported / name
    man = read_manifest(model)
    assert man["tower"] == "booster" and man["op_library"] is None, man
    names = {f["name"] for f in man["sparse_features"]}
    assert {"hist_ads", "hist_cats"} <= names
    rows = pq.read_table(seq_data["val"]).slice(0, 120)
    one = [json.loads(x) for x in rq.requests_from_table(rows, man)]
    ctx_keys = [k for k in ("user", "hist_ads", "hist_cats", "price") if k in one[0]]
    m = _cpp_matches_python_in_every_form(predictor, model, man, one, ctx_keys, 30, tmp_path)
    r = one[3]
    hist = list(r["hist_ads"])[:6] or [one[4]["ad"]]
    pad = [one[k]["ad"] for k in range(5, 12)]
    a = dict(r, hist_ads=hist + pad[: 6 - len(hist)])  # max_len 6
    b = dict(a, hist_ads=a["hist_ads"] + pad)  # items beyond max_len
    c = dict(a, hist_ads=pad[:6])
    s = rq.score_lines(m, [json.dumps(x) for x in (a, b, c)], man)
    assert abs(s[0] - s[1]) <= 1e-6 and abs(s[0] - s[2]) > 1e-6, s


def test_a_manifest_format_this_version_does_not_read_is_refused(predictor, exported, tmp_path):
    """A model file whose manifest format is bumped (a future export) is refused with one
    clear message naming the file and the format, in C++ (before loading it) and in
    Python; both read the same formats."""
    import re

    from rocketrec.serving.manifest import FORMATS_READ, read_manifest

    header = (ROOT / "deploy" / "cpp" / "request.h").read_text()
    listed = re.search(r'kManifestFormatsRead = "([^"]*)"', header).group(1)
    assert listed.split(", ") == list(FORMATS_READ)
    bumped = bump_manifest_format(
        exported / "light.pt", tmp_path / "future.pt", "rocketrec-light/99"
    )
    req = tmp_path / "r.jsonl"
    req.write_text("{}\n")
    out = subprocess.run([str(predictor), str(bumped), str(req)], capture_output=True, text=True)
    assert out.returncode != 0
    assert (
        "future.pt" in out.stderr
        and "'rocketrec-light/99' is not one this predictor reads" in out.stderr
    ), out.stderr
    with pytest.raises(ValueError, match="manifest format 'rocketrec-light/99'"):
        read_manifest(bumped)
    ok = subprocess.run(
        [str(predictor), str(exported / "light.pt"), "--manifest"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["format"] in FORMATS_READ


# -- publishing and live swaps (rocketrec publish, rocketrec_predict --watch) ---------------


def _set_latest(pub: Path, name: str) -> None:
    tmp = pub / ".LATEST.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, pub / "LATEST")


def test_watch_swaps_published_models_under_load(predictor, exported, tiny_data, tmp_path):
    """Two threads send requests (rows and context+candidates) while LATEST is switched
    20 times between two models (fp32 and int8: their scores differ), and twice to a
    broken one (a truncated file, a manifest format bumped): no request fails, each pass
    is scored by exactly one model (its scores equal Python's for the model it names),
    both broken ones are refused once and serving goes on."""
    from rocketrec.serving import requests as rq
    from rocketrec.serving.ops import load_model

    pub = tmp_path / "published"
    good = {"000000001": exported / "light.pt", "000000002": exported / "light_int8.pt"}
    for name, src in good.items():
        (pub / name).mkdir(parents=True)
        shutil.copy(src, pub / name / "light.pt")
    (pub / "000000003").mkdir()
    data = (exported / "light.pt").read_bytes()
    (pub / "000000003" / "light.pt").write_bytes(data[: len(data) // 3])
    (pub / "000000004").mkdir()
    bump_manifest_format(
        exported / "light.pt", pub / "000000004" / "light.pt", "rocketrec-light/99"
    )
    man = read_manifest(exported / "light.pt")
    lines = rq.requests_from_table(pq.read_table(tiny_data["val"]).slice(0, 6), man)
    lines.append(json.dumps({"context": {"user": 5}, "candidates": [{"ad": "a"}, {"ad": "b"}]}))
    req = tmp_path / "req.jsonl"
    req.write_text("\n".join(lines) + "\n")
    want = {n: rq.score_lines(load_model(p), lines, man) for n, p in good.items()}
    assert max(abs(a - b) for a, b in zip(*want.values())) > 1e-5  # distinguishable
    _set_latest(pub, "000000001")
    outf, errf = open(tmp_path / "out.txt", "w"), open(tmp_path / "err.txt", "w")  # drained
    proc = subprocess.Popen(
        [str(predictor), "--watch", str(pub), str(req), "--load-test", "14", "--threads", "2"],
        stdout=outf, stderr=errf, text=True,
    )  # fmt: skip
    import time

    time.sleep(2.0)
    order = ["000000002", "000000001"] * 10
    order.insert(5, "000000003")
    order.insert(12, "000000004")
    for name in order:
        _set_latest(pub, name)
        time.sleep(0.4)
    proc.wait(timeout=120)
    outf.close()
    errf.close()
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["errors"] == 0 and summary["refused"] == 2, summary
    assert summary["swaps"] >= 20, summary
    assert err.count("refused ") == 2 and "000000003" in err and "rocketrec-light/99" in err, err
    seen = set()
    for line in out.splitlines():
        name, *scores = line.split()
        assert name in good, line
        got = [float(x) for x in scores]
        assert (
            len(got) == len(want[name]) and max(abs(a - b) for a, b in zip(got, want[name])) <= 1e-6
        ), (name, got, want[name])
        seen.add(name)
    assert seen == set(good) and len(out.splitlines()) > 40


def _train_more(spec, data, run, steps):
    from conftest import small_model
    from rocketrec.train.loop import train
    from rocketrec.train.train_config import TrainConfig

    train(spec, data["train"], data["val"], str(run), small_model(), None,
          TrainConfig(batch_size=512, max_steps=steps, log_every=0), resume=str(run))  # fmt: skip


def test_publish_gates_on_parity_and_ne_and_prunes(tmp_path, tiny_spec, tiny_data, monkeypatch):
    """rocketrec publish: the first model is published (LATEST); the same step again is a
    no-op; one whose NE on the newest data is worse by more than --max-ne-regression stays
    on disk with its reason and LATEST does not move; an export the parity gate refuses is
    refused the same way; old candidates are pruned, never the published one."""
    import rocketrec.run.publish as publish
    import rocketrec.serving.export as export
    from conftest import venv_bin

    run = tmp_path / "run"
    train_small(tiny_spec, tiny_data, run, steps=4)
    pub = run / "published"
    quiet = {"log": lambda s: None}
    r1 = publish.publish_run(run, tiny_data["val"], **quiet)
    assert r1["published"] and (pub / "LATEST").read_text().strip() == "000000004"
    assert r1["published_ne"] is None and r1["ne"] > 0
    again = publish.publish_run(run, tiny_data["val"], **quiet)
    assert again["published"] and "already published" in again["reason"]

    _train_more(tiny_spec, tiny_data, run, 6)
    real = publish._light_ne
    monkeypatch.setattr(  # the candidate's NE 5% above the published model's
        publish, "_light_ne", lambda m, d, r: real(m, d, r) * (1.05 if "000000006" in str(m) else 1)
    )
    r2 = publish.publish_run(run, tiny_data["val"], max_ne_regression=0.01, **quiet)
    assert not r2["published"] and "worse than the published model's" in r2["reason"], r2
    assert (pub / "000000006" / "REFUSED").read_text().startswith("NE ")
    assert (pub / "000000006" / "light.pt").is_file()  # a refused model stays on disk
    assert (pub / "LATEST").read_text().strip() == "000000004"
    monkeypatch.setattr(publish, "_light_ne", real)

    def refuse(*a, **k):
        raise export.ExportError("parity gate failed: planted")

    monkeypatch.setattr(export, "export_checkpoint", refuse)
    r3 = publish.publish_run(run, tiny_data["val"], **quiet)
    assert not r3["published"] and r3["reason"].startswith("export refused: parity gate failed")
    assert (pub / "LATEST").read_text().strip() == "000000004"
    monkeypatch.undo()

    _train_more(tiny_spec, tiny_data, run, 8)
    r4 = publish.publish_run(run, tiny_data["val"], keep=1, **quiet)
    assert r4["published"] and r4["previous"].endswith("000000004/light.pt")
    assert sorted(d.name for d in pub.iterdir() if d.is_dir()) == ["000000008"]
    log = [json.loads(x) for x in (pub / "log.jsonl").read_text().splitlines()]
    assert [r["published"] for r in log] == [True, True, False, False, True]
    out = subprocess.run(
        [venv_bin("rocketrec"), "publish", str(run), "--data", tiny_data["val"],
         "--max-ne-regression", "-1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and "--max-ne-regression must be >= 0" in out.stderr, out.stderr
