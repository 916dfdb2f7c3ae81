"""The fused serving operator (deploy/cpp/rocketrec_ops.cpp) against the reference
semantics: `rocketrec.model.preprocess.Preprocess` (the training-side torch module) for
ids (bit for bit) and dense values (<= 1e-6), and the portable serving module for
scores; hostile rows and randomized rows, fp32 and int8, private twins, both entry
points; input checks; torch.export; a process without the library."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import test_serving as ts
import torch

from conftest import CROSS_SPEC, TINY_SPEC
from rocketrec.model.towers import LightTower, ModelConfig
from rocketrec.serving.fused import FusedLightServing
from rocketrec.serving.module import LightServing
from rocketrec.serving.ops import load_library, op_library_entry, pack_config
from rocketrec.serving.requests import raw_inputs_from_table
from rocketrec.spec import load_spec, private_table_name

I64 = 1 << 63
ops = None


def setup_module() -> None:
    global ops
    load_library()
    ops = torch.ops.rocketrec


def _spec(tmp_path, text: str, name: str):
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return load_spec(p)


def _serving(spec, int8=False, private=0, seed=0, mlp=(16,)) -> LightServing:
    g = torch.Generator().manual_seed(seed)
    tables = {t.name: torch.randn(t.rows, t.dim, generator=g) for t in spec.tables}
    for t in spec.tables:
        tables[private_table_name(t.name)] = torch.randn(t.rows, max(private, 4), generator=g)
    k = sum(spec.table(f.table).dim + private for f in spec.light_sparse) + len(spec.light_dense)
    tower = LightTower(k, ModelConfig(light_mlp=mlp))
    with torch.no_grad():
        for q in tower.parameters():
            q.copy_(torch.randn(q.shape, generator=g) * 0.5)
    return LightServing(spec, tables, tower.eval(), int8, private).eval()


def _random_inputs(
    pre, b: int, rng, extreme: bool = True, one_id: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random raw inputs: bags of 0..5 ids (`one_id`: one id in every bag, as most
    requests, which sends crosses down the operator's one-hash-per-row path) over the
    whole int64 range (some tiny ids), numbers with NaN, exact boundary values and
    (`extreme`) +-inf and +-1e30."""
    lengths = rng.integers(0, 6, size=pre.num_ids * b)
    if one_id:
        lengths[:] = 1
    n = int(lengths.sum())
    values = rng.integers(-(I64), I64 - 1, size=n, dtype=np.int64, endpoint=True)
    small = rng.random(n) < 0.3
    values[small] = rng.integers(-5, 50, size=int(small.sum()))
    c = len(pre.numeric_inputs)
    dense = rng.normal(0, 20, size=(b, c)).astype(np.float32)
    special = np.array([np.nan, 0.0, 0.5, 1.0, 5.0, 100.0, -3.0])
    if extreme:  # float32 LayerNorm overflows on these: fine for ids, not for scores
        special = np.concatenate([special, [np.inf, -np.inf, 1e30, -1e30]])
    mask = rng.random((b, c)) < 0.3
    dense[mask] = rng.choice(special, size=int(mask.sum()))
    return (
        torch.from_numpy(values),
        torch.from_numpy(lengths.astype(np.int64)),
        torch.from_numpy(dense),
    )


def _edge_inputs(pre, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every id input's bag holds the ids where `id mod rows` is easiest to get wrong
    (negative ids map to non-negative rows, as Python's %): the int64 extremes, 0, +-1, and multiples
    of each table's rows and their neighbours."""
    edge = [-(I64), -(I64) + 1, -1, 0, 1, I64 - 1, 2**32, -(2**32), 2**62 + 1]
    for r in rows:
        edge += [r - 1, r, r + 1, -r, -r - 1, -r + 1, 7 * r, (I64 - 1) // r * r]
    b = len(edge)  # row j's bags start at edge[j]: capped bags (max_ids) see every id too
    lengths = torch.full((pre.num_ids * b,), b, dtype=torch.int64)
    bags = [edge[j:] + edge[:j] for j in range(b)]
    values = torch.tensor([x for _ in range(pre.num_ids) for bag in bags for x in bag])
    dense = torch.zeros(b, len(pre.numeric_inputs))
    return values, lengths, dense


def _cases(spec, pre, rng):
    yield raw_inputs_from_table(ts._hostile_rows(), spec) if "user_city" in spec.columns() else None
    yield _edge_inputs(pre, [t.rows for t in spec.tables])
    for b in (1, 2, 7, 64):
        yield _random_inputs(pre, b, rng)
    for b in (3, 64):
        yield _random_inputs(pre, b, rng, one_id=True)


# rows 16, 32, 64 and 24 wide: the AVX-512 pooling's three widths and one it leaves to AVX2
WIDE_SPEC = """
version: 1
name: wide
label: {column: y}
tables:
  - {name: t_user, rows: 700, dim: 32}
  - {name: t_ad, rows: 300, dim: 64}
  - {name: t_tag, rows: 100, dim: 16, pooling: mean}
  - {name: t_ctx, rows: 50, dim: 24}
sparse:
  - {name: user, column: user, dtype: int64, table: t_user}
  - {name: ad, column: ad, dtype: string, table: t_ad}
  - {name: tags, column: tags, dtype: int64, kind: list, table: t_tag, max_ids: 5}
  - {name: ctx, column: ctx, dtype: int64, table: t_ctx}
dense:
  - {name: price, column: price, fill: 1.0, transform: log1p}
light:
  features: [user, ad, tags, ctx, price]
"""


@pytest.fixture(params=["crossy", "tiny", "tiny_twins", "wide"])
def model(request, tmp_path):
    text = {"crossy": CROSS_SPEC, "wide": WIDE_SPEC}.get(request.param, TINY_SPEC)
    spec = _spec(tmp_path, text, request.param)
    return spec, _serving(spec, private=8 if request.param == "tiny_twins" else 0)


def test_preprocess_op_equals_reference(model):
    """Ids bit for bit, lengths exactly, dense <= 1e-6, batch and context modes."""
    spec, m = model
    pre = m.preprocess
    icfg, fcfg = pack_config(m)
    rng = np.random.default_rng(1)
    for x in _cases(spec, pre, rng):
        if x is None:
            continue
        want = pre(*x)
        got = ops.preprocess(*x, icfg, fcfg, False)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-6, equal_nan=True)
        if x[2].size(0) >= 2:
            want = pre.forward_context(*x)
            got = ops.preprocess(*x, icfg, fcfg, True)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-6, equal_nan=True)


ONE_ID_SPEC = """
version: 1
name: one_id
label: {column: y}
tables:
  - {name: t_user, rows: 50, dim: 8}
sparse:
  - {name: user, column: user, dtype: int64, table: t_user}
light:
  features: [user]
"""


def test_rows_are_python_mod_for_any_table_size(tmp_path):
    """The operator's division-free `id mod rows` equals Python's % for table sizes from 1
    to 2^63 - 1 and ids over the whole int64 range: the lookup's rows are patched into
    the config (preprocess reads no table)."""
    spec = _spec(tmp_path, ONE_ID_SPEC, "one_id")
    icfg, fcfg = pack_config(_serving(spec))
    n_lookups, n_groups = int(icfg[5]), int(icfg[6])
    assert n_lookups == 1
    at = icfg.numel() - n_groups - 7  # the lookup: out, rows, offset, group, mean, col, dim
    rng = np.random.default_rng(11)
    ids = [-(I64), -(I64) + 1, -2, -1, 0, 1, 2, I64 - 2, I64 - 1]
    ids += rng.integers(-(I64), I64 - 1, size=3000, dtype=np.int64, endpoint=True).tolist()
    ids += rng.integers(-1000, 1000, size=500).tolist()
    sizes = [1, 2, 3, 7, 50, 1000, 99991, 2**20, 2**31 - 1, 2**32, 2**32 + 1, 10**12 + 39]
    sizes += [2**62, 2**62 + 1, 3 * 2**61 + 5, I64 - 2, I64 - 1]
    sizes += rng.integers(1, I64 - 1, size=20, dtype=np.int64).tolist()
    # the vectorized path's range (2 <= rows < 2^40) and its edges
    sizes += [2**40 - 1, 2**40, 2**40 + 1, 3**25, 2**53 + 1]
    sizes += rng.integers(2, 2**40, size=20, dtype=np.int64).tolist()
    for rows in sizes:
        cfg = icfg.clone()
        cfg[at + 1], cfg[at + 2] = rows, 0
        edge = [rows - 1, rows, rows + 1, -rows, -rows - 1, -rows + 1, (I64 - 1) // rows * rows]
        vals = [v for v in ids + edge if -(I64) <= v < I64]
        values = torch.tensor(vals, dtype=torch.int64)
        lengths = torch.ones(len(vals), dtype=torch.int64)
        got = ops.preprocess(values, lengths, torch.zeros(len(vals), 0), cfg, fcfg, False)[0]
        want = [v % rows for v in vals]
        assert got.tolist() == want, f"rows {rows}"


LOG1P_SPEC = """
version: 1
name: log1p_only
label: {column: y}
tables:
  - {name: t_user, rows: 50, dim: 8}
sparse:
  - {name: user, column: user, dtype: int64, table: t_user}
dense:
  - {name: count, column: count, fill: 0.0, transform: log1p}
light:
  features: [user, count]
"""


def test_log1p_is_float32_log1p(tmp_path):
    """The operator's log1p (8 at a time in double on AVX-512, glibc's elsewhere) against
    the correctly rounded float32 log1p over the whole non-negative range: within one
    float ulp, and the same float in 95% of cases (glibc's log1pf, used below AVX-512,
    differs in 1.8%; the vector code in almost none); negative values are 0 (log1p of
    the clamp), NaN the fill, +inf stays +inf."""
    spec = _spec(tmp_path, LOG1P_SPEC, "log1p_only")
    icfg, fcfg = pack_config(_serving(spec))
    rng = np.random.default_rng(5)
    x = np.concatenate(
        [
            [
                0.0,
                1e-45,
                1e-38,
                1e-12,
                2.0**-29,
                2.0**-20,
                2.0**-20 * (1 - 2**-23),
                2.0**-20 * (1 + 2**-23),
            ],
            [
                0.4142135,
                0.41421357,
                0.5,
                1.0,
                2.0,
                np.e - 1,
                1e6,
                3.4e38,
                np.inf,
                -0.0,
                -1.0,
                -np.inf,
                np.nan,
            ],
            np.exp(rng.uniform(np.log(1e-40), np.log(3e38), size=20000)),  # every binade
            rng.uniform(0, 4, size=5000),
            np.arange(0, 1000, dtype=np.float64),  # counts
        ]
    ).astype(np.float32)
    dense = torch.from_numpy(x).view(-1, 1)
    n = dense.shape[0]
    got = ops.preprocess(
        torch.zeros(n, dtype=torch.int64),
        torch.ones(n, dtype=torch.int64),
        dense,
        icfg,
        fcfg,
        False,
    )[2]
    clamped = np.maximum(np.where(np.isnan(x), 0.0, x), 0.0).astype(np.float64)
    want = torch.from_numpy(np.log1p(clamped).astype(np.float32))  # correctly rounded
    got = got.view(-1) + 0.0  # -0.0 (log1p(-0.0) = -0.0) and 0.0 alike
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    ulp = (got[fin].view(torch.int32).long() - want[fin].view(torch.int32).long()).abs()
    assert int(ulp.max()) <= 1, float(dense.view(-1)[fin][ulp.argmax()])
    # glibc's log1pf (below AVX-512) is one ulp off on 1.8% of these; the vector code on
    # none of them (0.0008% of every float in [2^-21, 8))
    allowed = n // 1000 if _ops_isa() == "avx512" else n // 20
    assert int((ulp > 0).sum()) <= allowed, int((ulp > 0).sum())


@pytest.mark.parametrize("int8", [False, True])
def test_fused_module_equals_portable(model, int8):
    spec, _ = model
    m = _serving(spec, int8=int8, private=model[1].preprocess.twins and 8 or 0)
    fused = FusedLightServing(m).eval()
    scripted = torch.jit.freeze(torch.jit.script(fused), preserved_attrs=["score_candidates"])
    rng = np.random.default_rng(2)
    with torch.no_grad():
        for x in _cases(spec, m.preprocess, rng):
            if x is None:
                continue
            want = m(*x)
            torch.testing.assert_close(fused(*x), want, rtol=0, atol=1e-6, equal_nan=True)
            torch.testing.assert_close(scripted(*x), want, rtol=0, atol=1e-6, equal_nan=True)


def _disjoint(pre, x, context: set[int]):
    """Make raw inputs [1+M rows] a valid context+candidates request: row 0 keeps only
    the inputs in `context`, rows 1..M only the others. Returns (request, merged rows)."""
    values, lengths, dense = x
    b = dense.size(0)
    ni = pre.num_ids
    bags = []
    pos = 0
    for i in range(ni):
        row = []
        for r in range(b):
            n = int(lengths[i * b + r])
            row.append(values[pos : pos + n].tolist())
            pos += n
        bags.append(row)
    req_bags = [
        [bag if (r == 0) == (i in context) else [] for r, bag in enumerate(row)]
        for i, row in enumerate(bags)
    ]
    d = dense.clone()
    for j in range(d.size(1)):
        if (ni + j) in context:
            d[1:, j] = float("nan")
        else:
            d[0, j] = float("nan")
    merged_bags = [[row[0] + bag for bag in row[1:]] for row in req_bags]
    md = d[1:].clone()
    for j in range(d.size(1)):
        if (ni + j) in context:
            md[:, j] = d[0, j]

    def pack(bags_, dd):
        flat = [v for row in bags_ for bag in row for v in bag]
        lens = [len(bag) for row in bags_ for bag in row]
        return (
            torch.tensor(flat, dtype=torch.int64),
            torch.tensor(lens, dtype=torch.int64),
            dd.contiguous(),
        )

    return pack(req_bags, d), pack(merged_bags, md)


@pytest.mark.parametrize("int8", [False, True])
def test_candidates_split_first_layer(model, int8):
    """score_candidates (context share of the first layer computed once) equals forward on
    the merged rows, for random context/candidate splits."""
    spec, m0 = model
    m = _serving(spec, int8=int8, private=8 if m0.preprocess.twins else 0, mlp=(16, 8))
    fused = torch.jit.freeze(
        torch.jit.script(FusedLightServing(m).eval()), preserved_attrs=["score_candidates"]
    )
    pre = m.preprocess
    rng = np.random.default_rng(3)
    n_in = pre.num_ids + len(pre.numeric_inputs)
    with torch.no_grad():
        for trial in range(12):  # from 8 on one id in every bag (crosses' one-key path)
            x = _random_inputs(pre, [2, 3, 41][trial % 3], rng, extreme=False, one_id=trial >= 8)
            context = {i for i in range(n_in) if rng.random() < 0.5}
            req, merged = _disjoint(pre, x, context)
            want = m(*merged)
            torch.testing.assert_close(
                fused.score_candidates(*req), want, rtol=0, atol=2e-6, equal_nan=True
            )
            torch.testing.assert_close(fused(*merged), want, rtol=0, atol=1e-6, equal_nan=True)
            torch.testing.assert_close(
                m.score_candidates(*req), want, rtol=0, atol=2e-6, equal_nan=True
            )


def _row(x, b: int, i: int):
    """Row i of raw inputs x of b rows, as a batch of one."""
    values, lengths, dense = x
    n_in = lengths.numel() // b
    starts = torch.cumsum(lengths, 0) - lengths
    bags = [values[starts[k * b + i] : starts[k * b + i] + lengths[k * b + i]] for k in range(n_in)]
    one = torch.stack([lengths[k * b + i] for k in range(n_in)])
    return torch.cat(bags), one, dense[i : i + 1]


def test_first_layer_does_not_depend_on_the_row_position(tmp_path):
    """A row's first-layer output is the same bits alone and at any place in a batch: the
    statistics' and the product's last rows (13 = 8 + 5 = 6 + 6 + 1) take the same
    instructions as the others."""
    spec = _spec(tmp_path, WIDE_SPEC, "wide")
    m = _serving(spec, mlp=(48,))
    fused = FusedLightServing(m).eval()
    rng = np.random.default_rng(9)
    b = 13
    x = _random_inputs(m.preprocess, b, rng, extreme=False)
    args = (fused.icfg, fused.fcfg, fused.tables, fused.int8, fused.wg_t, fused.wg_sum, fused.b_eff)
    with torch.no_grad():
        full = ops.light_first_layer(*x, *args, fused.eps)
        for i in range(b):
            one = ops.light_first_layer(*_row(x, b, i), *args, fused.eps)
            assert torch.equal(one[0], full[i]), f"row {i}"


def test_tower_without_hidden_layers(tmp_path):
    spec = _spec(tmp_path, CROSS_SPEC, "crossy")
    m = _serving(spec, mlp=())
    fused = FusedLightServing(m).eval()
    pre = m.preprocess
    x = _random_inputs(pre, 9, np.random.default_rng(4))
    req, merged = _disjoint(pre, x, {0, 1})
    with torch.no_grad():
        torch.testing.assert_close(
            fused.score_candidates(*req), m(*merged), rtol=0, atol=2e-6, equal_nan=True
        )


@pytest.mark.parametrize("mlp", [(12,), (40, 4), (48,), (64,)])
def test_first_layer_widths(tmp_path, mlp):
    """The folded first layer at widths off the AVX2 kernel's blocks: 12 (not a multiple
    of 8: at::mm), 40 (a block of 32 and one of 8), 64; batches 1..8 cover the kernel's
    row blocks of 3 and their tails."""
    spec = _spec(tmp_path, CROSS_SPEC, "crossy")
    m = _serving(spec, mlp=mlp)
    fused = FusedLightServing(m).eval()
    pre = m.preprocess
    rng = np.random.default_rng(7)
    with torch.no_grad():
        for b in (1, 2, 3, 4, 5, 8, 33):
            x = _random_inputs(pre, b, rng)
            torch.testing.assert_close(fused(*x), m(*x), rtol=0, atol=1e-6, equal_nan=True)
            if b >= 2:
                req, merged = _disjoint(pre, _random_inputs(pre, b, rng, extreme=False), {0})
                torch.testing.assert_close(
                    fused.score_candidates(*req), m(*merged), rtol=0, atol=2e-6, equal_nan=True
                )


def test_no_rows_in_a_fresh_thread(tmp_path):
    """B = 0 in a thread whose scratch buffers were never used: an empty result."""
    import threading

    spec = _spec(tmp_path, CROSS_SPEC, "crossy")
    m = FusedLightServing(_serving(spec)).eval()
    pre = _serving(spec).preprocess
    x = (
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, len(pre.numeric_inputs)),
    )
    out: list = []
    t = threading.Thread(target=lambda: out.append(m(*x)))
    t.start()
    t.join()
    assert out and out[0].shape == (0,)


def test_op_checks_inputs(tmp_path):
    spec = _spec(tmp_path, CROSS_SPEC, "crossy")
    m = FusedLightServing(_serving(spec)).eval()
    pre = _serving(spec).preprocess
    v, l, d = _random_inputs(pre, 3, np.random.default_rng(5))
    bad = [
        ((v, l, d[:, :-1]), "dense must be float32"),
        ((v, l, d.double()), "dense must be float32"),
        ((v, l[:-1], d), "lengths must have I\\*B"),
        ((v.int(), l, d), "1-D int64"),
        ((v[:-1], l, d), "lengths sum to"),
        ((torch.cat([v, v[:1]]), l, d), "lengths sum to"),
    ]
    neg = l.clone()
    neg[0] = -1
    bad.append(((v, neg, d), "non-negative"))
    for args, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            m(*args)
    with pytest.raises(RuntimeError, match="context row and >= 1 candidate"):
        m.score_candidates(v[:0], torch.zeros(pre.num_ids, dtype=torch.int64), d[:1])
    icfg, fcfg = pack_config(m0 := _serving(spec))
    with pytest.raises(RuntimeError, match="icfg"):
        ops.preprocess(v, l, d, icfg[:-3], fcfg, False)
    with pytest.raises(RuntimeError, match="format"):
        ops.preprocess(v, l, d, torch.cat([icfg[:1] + 7, icfg[1:]]), fcfg, False)
    assert m0 is not None
    # bad tables: one clear error from both first-layer ops, before anything is folded
    for name in ("light_first_layer", "light_first_layer_context"):
        for tabs, msg in (
            (m.tables[:-1], "tables expected"),
            ([m.tables[0].double(), *m.tables[1:]], "must be float32"),
            ([t[:2].contiguous() for t in m.tables], "rows lie outside"),
        ):
            with pytest.raises(RuntimeError, match=msg):
                getattr(ops, name)(
                    v, l, d, m.icfg, m.fcfg, tabs, False, m.wg_t, m.wg_sum, m.b_eff, m.eps
                )


def test_torch_export_runs_the_op(tmp_path):
    """The ops' Meta kernels let torch.export trace the fused forward; the exported
    program scores like the module."""
    spec = _spec(tmp_path, CROSS_SPEC, "crossy")
    m = _serving(spec)
    fused = FusedLightServing(m).eval()
    x = _random_inputs(m.preprocess, 6, np.random.default_rng(6))
    ep = torch.export.export(fused, x)
    assert any("rocketrec.light_first_layer" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*x), m(*x), rtol=0, atol=1e-6, equal_nan=True)


def test_missing_library_is_one_clear_error(tmp_path):
    """A process that cannot find the op library gets an error naming it."""
    spec = _spec(tmp_path, CROSS_SPEC, "crossy")
    m = torch.jit.freeze(torch.jit.script(FusedLightServing(_serving(spec)).eval()))
    path = tmp_path / "fused.pt"
    import json

    torch.jit.save(
        m, str(path), _extra_files={"manifest.json": json.dumps({"op_library": op_library_entry()})}
    )
    code = (
        "import sys\n"
        "from rocketrec.serving.ops import load_model\n"
        "try:\n"
        f"    load_model({str(path)!r})\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e); sys.exit(3)\n"
    )
    env = {"ROCKETREC_OPS_LIBRARY": str(tmp_path / "nope.so"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 3, r.stderr
    assert "OpsLibraryError" in r.stdout and "librocketrec_ops.so" in r.stdout


def test_library_found_behind_a_working_dir_copy(tmp_path):
    """A Ray `--working-dir` job imports the source copy it was sent (git-ignored build
    outputs are not sent: no op library); the library of the installed package later on
    sys.path is found. With none anywhere: one error line saying how to get one. Run
    without site (`-S`): no editable-install finder helps."""
    import shutil
    import sysconfig

    from conftest import ROOT

    def copy(dst, with_library):
        shutil.copytree(
            ROOT / "rocketrec",
            dst / "rocketrec",
            ignore=shutil.ignore_patterns("*.so", "__pycache__"),
        )
        if with_library:
            shutil.copy(ROOT / "rocketrec" / "_rocketrec_ops.so", dst / "rocketrec")

    wd, site = tmp_path / "wd", tmp_path / "site"
    copy(wd, False)
    copy(site, True)
    code = (
        "import rocketrec\n"
        "from rocketrec.serving.ops import load_library\n"
        "try:\n"
        "    print(rocketrec.__file__, load_library())\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    purelib = sysconfig.get_paths()["purelib"]
    for path, want in (
        ([wd, site, purelib], f"{wd}/rocketrec/__init__.py {site}/rocketrec/_rocketrec_ops.so"),
        (
            [wd, purelib],
            "OpsLibraryError rocketrec's op library (rocketrec/_rocketrec_ops.so) is not built",
        ),
    ):
        env = {**os.environ, "PYTHONPATH": ":".join(map(str, path))}
        env.pop("ROCKETREC_OPS_LIBRARY", None)
        r = subprocess.run(
            [sys.executable, "-S", "-c", code],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert r.returncode == 0 and r.stdout.strip().startswith(want), r.stdout + r.stderr


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _lower_isa_levels() -> list[str]:
    """The operator's instruction-set levels below this CPU's best (rocketrec_ops.cpp's
    isa_level: portable, avx2, avx512)."""
    levels = ["portable"]
    if {"avx2", "fma", "avx512f", "avx512dq"} <= _cpu_flags():
        levels.append("avx2")
    return levels


def _ops_isa() -> str:
    """The level the operator runs at here: the CPU's best, capped by ROCKETREC_OPS_ISA
    or ROCKETREC_OPS_PORTABLE as isa_level() does."""
    flags = _cpu_flags()
    best = 0
    if {"avx2", "fma"} <= flags:
        best = 2 if {"avx512f", "avx512dq"} <= flags else 1
    want = os.environ.get("ROCKETREC_OPS_ISA", "").lower()
    cap = {"portable": 0, "avx2": 1}.get(want, 2)
    if os.environ.get("ROCKETREC_OPS_PORTABLE") is not None:
        cap = 0
    return ["portable", "avx2", "avx512"][min(best, cap)]


@pytest.mark.parametrize("isa", _lower_isa_levels())
def test_lower_isa_levels_match_too(isa):
    """This machine takes its best kernels (AVX-512 or AVX2); ROCKETREC_OPS_ISA forces a
    lower level (portable: what a CPU without AVX2 + FMA runs; avx2: a CPU without
    AVX-512): the same parity tests pass on it."""
    env = dict(os.environ, ROCKETREC_OPS_ISA=isa)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
         __file__, "-k", "equals or candidates_split or without_hidden or widths or python_mod or log1p"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


@pytest.mark.parametrize("int8", [False, True])
def test_first_layer_folding_equals_unfolded(model, int8):
    """The first layer folded into the single-id tables (FoldSet in rocketrec_ops.cpp) gives
    forward and score_candidates within rounding of the unfolded operator (budget 0), and
    the portable module; it folds only lookups of one id per row, and only within budget."""
    spec, m0 = model
    m = _serving(spec, int8=int8, private=8 if m0.preprocess.twins else 0, mlp=(16, 8))
    fused = FusedLightServing(m).eval()
    pre = m.preprocess
    rng = np.random.default_rng(5)
    n_in = pre.num_ids + len(pre.numeric_inputs)
    old = ops.fold_budget_mb(1024)
    try:
        with torch.no_grad():
            cases = [x for x in _cases(spec, pre, rng) if x is not None]
            folded = [fused(*x) for x in cases]
            gc.collect()  # earlier tests' models, freed now: not while counting below
            models, lookups, size = ops.fold_stats()
            assert models >= 1 and lookups >= 1 and size > 0, (models, lookups, size)
            reqs = []
            for trial in range(6):
                x = _random_inputs(pre, [2, 3, 41][trial % 3], rng, extreme=False)
                reqs.append(_disjoint(pre, x, {i for i in range(n_in) if rng.random() < 0.5}))
            folded_c = [fused.score_candidates(*req) for req, _ in reqs]
            ops.fold_budget_mb(0)
            assert ops.fold_stats()[0] == models  # built sets stay while their model lives
            for x, got in zip(cases, folded, strict=True):
                want = fused(*x)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6, equal_nan=True)
                torch.testing.assert_close(got, m(*x), rtol=0, atol=1e-6, equal_nan=True)
            for (req, merged), got in zip(reqs, folded_c, strict=True):
                torch.testing.assert_close(got, fused.score_candidates(*req), rtol=0, atol=1e-6)
                torch.testing.assert_close(got, m(*merged), rtol=0, atol=2e-6)
    finally:
        ops.fold_budget_mb(old)


def test_folded_tables_follow_the_model(tmp_path):
    """A table changed in place (its version) is folded again, a freed model's folded tables
    are dropped, and lookups of lists are never folded."""
    spec = _spec(tmp_path, WIDE_SPEC, "wide")
    old = ops.fold_budget_mb(1024)
    try:
        gc.collect()
        base = ops.fold_stats()
        m = _serving(spec)
        fused = FusedLightServing(m).eval()
        x = _random_inputs(m.preprocess, 16, np.random.default_rng(7), extreme=False)
        with torch.no_grad():
            before = fused(*x)
            stats = ops.fold_stats()
            # user, ad, ctx fold; tags (a list) does not
            assert stats[0] == base[0] + 1 and stats[1] == base[1] + 3, (base, stats)
            # another module on the same tables, its own (equal) icfg and wg_t tensors, as
            # AOTInductor's two entry points: the same folded tables, not a second set
            twin = FusedLightServing(m).eval()
            assert twin.wg_t.data_ptr() != fused.wg_t.data_ptr()
            torch.testing.assert_close(twin(*x), before, rtol=0, atol=0)
            assert ops.fold_stats() == stats
            del twin
            for t in fused.tables:
                t.mul_(0.5)  # in place: the same storage, a new version
            after = fused(*x)
            assert ops.fold_stats() == stats  # the old version's set is dropped
            ops.fold_budget_mb(0)
            want = fused(*x)
            assert (after - before).abs().max() > 1e-3
            torch.testing.assert_close(after, want, rtol=0, atol=1e-6)
            # a write the version counter does not see: fold_clear folds again
            fused.tables[0].data.mul_(2.0)
            want = fused(*x)
            ops.fold_budget_mb(1024)
            assert ops.fold_clear() >= 1
            torch.testing.assert_close(fused(*x), want, rtol=0, atol=1e-6)
            assert ops.fold_stats() == [1, 3, stats[2] - base[2]]  # every other set dropped
        del fused, m
        gc.collect()
        assert ops.fold_stats()[0] == 0
    finally:
        ops.fold_budget_mb(old)


# CROSS_SPEC without its multi-id cross (a list's ids x the ad): every lookup but the list folds
LEAN_SPEC = (
    CROSS_SPEC.replace("name: crossy", "name: lean")
    .replace(
        "  - {name: tags_x_ad, kind: cross, inputs: [user_tags, ad_id], table: t_cross, max_ids: 3}\n",
        "",
    )
    .replace(" tags_x_ad,", "")
)
assert "tags_x_ad" not in LEAN_SPEC


@pytest.mark.parametrize("mlp", [(16, 8), (12,)])
@pytest.mark.parametrize("int8", [False, True])
def test_lean_candidates_equals_general(tmp_path, int8, mlp):
    """score_candidates' lean path (candidates_lean in rocketrec_ops.cpp: each candidate's
    folded rows found straight from the raw inputs, the context pooled from row 0 alone)
    scores what the general path scores and what forward scores on the merged rows: for
    every split of the inputs between context and candidates that leaves the list to the
    context, with candidates of one id or none per input, crosses with sources on either
    side (a bucket among them), buckets on either side. A request it cannot take (a
    candidate's list, a candidate with two ids) goes the general way. H = 16 takes the
    AVX-512 gather, H = 12 the portable one."""
    spec = _spec(tmp_path, LEAN_SPEC, "lean")
    m = _serving(spec, int8=int8, mlp=mlp)
    fused = FusedLightServing(m).eval()
    pre = m.preprocess
    rng = np.random.default_rng(11)
    n_in = pre.num_ids + len(pre.numeric_inputs)
    lists = {i for i, c in enumerate(pre.id_cap.tolist()) if c != 1}
    assert lists, pre.id_cap

    def one_or_none(x, keep):  # one id per bag, some bags emptied (not the list's: an empty
        values, lengths, dense = x  # list in the context leaves it to the candidates)
        kept = torch.from_numpy(rng.random(lengths.numel()) < keep)
        b = dense.size(0)
        for i in lists:
            kept[i * b : (i + 1) * b] = True
        return values[kept], kept.to(torch.int64), dense

    takes, falls = [], []
    for trial in range(16):
        b = [2, 3, 41, 200][trial % 4]
        x = _random_inputs(pre, b, rng, extreme=False, one_id=True)
        if trial % 2:
            x = one_or_none(x, 0.7)
        context = lists | {i for i in range(n_in) if rng.random() < 0.5}
        takes.append(_disjoint(pre, x, context))
    for trial in range(4):  # the list on the candidates' side, or a candidate with 3 ids
        x = _random_inputs(pre, 9, rng, extreme=False, one_id=trial % 2 == 0)
        context = {i for i in range(n_in) if rng.random() < 0.5} - lists
        falls.append(_disjoint(pre, x, context))
    old_fold, old_lean = ops.fold_budget_mb(1024), ops.lean_candidates(1)
    try:
        with torch.no_grad():
            n0 = ops.lean_calls()
            lean = [fused.score_candidates(*req) for req, _ in takes]
            assert ops.lean_calls() - n0 == len(takes)
            general_fallback = [fused.score_candidates(*req) for req, _ in falls]
            assert ops.lean_calls() - n0 == len(takes)  # none of these took it
            ops.lean_candidates(0)
            for (req, merged), got in zip(takes, lean, strict=True):
                torch.testing.assert_close(got, fused.score_candidates(*req), rtol=0, atol=1e-6)
                torch.testing.assert_close(got, m(*merged), rtol=0, atol=2e-6)
            for (_req, merged), got in zip(falls, general_fallback, strict=True):
                torch.testing.assert_close(got, m(*merged), rtol=0, atol=2e-6)
            assert ops.lean_calls() - n0 == len(takes)  # off: none taken
    finally:
        ops.fold_budget_mb(old_fold)
        ops.lean_candidates(old_lean)
