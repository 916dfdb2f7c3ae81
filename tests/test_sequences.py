"""Behaviour sequences (kind: sequence) and a logged teacher score (teacher:): the spec's
checks, the booster's target attention (masking, gradients, which tower reads what),
the teacher's hint (null rows skip it) and the data checks on the new columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import SEQ_SPEC
from rocketrec.data.batch import DataError, decode_table
from rocketrec.model.loss import LossConfig, rocket_loss
from rocketrec.model.model import RocketModel
from rocketrec.model.towers import TargetAttention
from rocketrec.spec import SpecError, load_spec, spec_from_dict


def _yaml(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def test_spec_reads_sequences_and_teacher(seq_spec):
    s = seq_spec
    assert [f.name for f in s.sequences] == ["hist_ads", "hist_cats"]
    assert s.sequence_tables == ["t_ad", "t_hist"]
    assert [f.name for f in s.pooled_features] == ["user", "ctx"]
    hist = s.feature("hist_ads")
    assert hist.max_ids == 6 and hist.query == "ad" and hist.is_list
    assert s.pooling(s.feature("hist_cats")) == "mean"  # as a bag: a mean, whatever the table
    assert (s.teacher_column, s.teacher_kind) == ("pctr", "probability")
    assert "pctr" in s.columns()
    again = spec_from_dict(s.to_dict(), "again")
    assert again == s  # to_dict round trip (checkpoints and manifests carry it)


def _bad(edit: str, old: str, new: str) -> str:
    assert old in SEQ_SPEC, old
    return SEQ_SPEC.replace(old, new)


@pytest.mark.parametrize(
    "old,new,needle",
    [
        (
            "query: ad}",
            "query: add}",
            "feature 'hist_ads': field 'query': no sparse feature named 'add' (did you mean 'ad'?)",
        ),  # noqa: E501
        (
            "query: ad_cat}",
            "query: hist_ads}",
            "feature 'hist_cats': field 'query': 'hist_ads' is a sequence",
        ),  # noqa: E501
        (
            "query: ad_cat}",
            "query: ctx}",
            "feature 'hist_cats': field 'query': 'ctx' reads table 't_ctx' (dim 4), the sequence reads table 't_hist' (dim 8)",
        ),  # noqa: E501
        ("query: ad}", "query: ctx}", "needs the same table or the same dim"),
        ("max_len: 6, ", "", "feature 'hist_ads': field 'max_len' is required by kind 'sequence'"),
        (
            "kind: sequence, table: t_ad, max_len: 6",
            "kind: list, table: t_ad, max_len: 6",
            "field 'max_len' does not apply to kind 'list'",
        ),  # noqa: E501
        ("max_len: 6", "max_len: 0", "field 'max_len' must be >= 1"),
        (
            "kind: probability}",
            "kind: prob}",
            "teacher: field 'kind' must be one of probability, logit",
        ),  # noqa: E501
        ("{column: pctr,", "{column: price,", "teacher: field 'column': 'price' is already"),
        (
            "{name: t_hist, rows: 100, dim: 8}",
            "{name: t_hist, rows: 100, dim: 4}",
            "sequence tables must share one dim",
        ),  # noqa: E501
    ],
)
def test_spec_errors_name_file_feature_and_field(tmp_path, old, new, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(_bad("", old, new))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert str(p) in msg and needle in msg and "\n" not in msg, msg


def _raw_batch(spec, b: int, seed: int = 0, empty_rows: tuple[int, ...] = ()):
    """Random raw inputs: (numeric [B, C], KJT of raw ids, feature-major)."""
    g = torch.Generator().manual_seed(seed)
    keys = [f.name for f in spec.id_features]
    lens = []
    for k in keys:
        f = spec.feature(k)
        ln = (
            torch.randint(1, 9, (b,), generator=g) if f.is_list else torch.ones(b, dtype=torch.long)
        )
        if f.kind == "sequence":
            ln[list(empty_rows)] = 0
        lens.append(ln)
    lengths = torch.cat(lens)
    values = torch.randint(0, 10**6, (int(lengths.sum()),), generator=g)
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
    return torch.rand(b, len(spec.dense), generator=g), kjt


def _model(spec, **over):
    from conftest import small_model

    torch.manual_seed(0)
    return RocketModel(spec, small_model(**over))


def test_attention_masks_padding_and_normalises():
    torch.manual_seed(0)
    q, keys = torch.randn(3, 8), torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    for kind in ("softmax", "din", "mean"):
        att = TargetAttention(8, (16,), kind)
        out = att(q, keys, mask)
        noise = keys.clone()
        noise[~mask] = 1e3  # whatever sits in the padding must not matter
        assert torch.allclose(att(q, noise, mask), out, atol=1e-6), kind
        assert torch.equal(out[2], torch.zeros(8)), kind  # empty history -> 0, no NaN
    mean = TargetAttention(8, (16,), "mean")(q, keys, mask)
    assert torch.allclose(mean[0], keys[0, :3].mean(0), atol=1e-6)
    att = TargetAttention(8, (16,), "softmax")
    # softmax weights sum to 1 over the real items: a history of one item returns it
    assert torch.allclose(att(q, keys, mask)[1], keys[1, 0], atol=1e-6)
    # by hand: score MLP over [q, k, q - k, q * k], masked softmax, weighted sum
    qq = q[0].expand(3, 8)
    k0 = keys[0, :3]
    s = att.unit(torch.cat([qq, k0, qq - k0, qq * k0], -1)).squeeze(-1)
    want = (torch.softmax(s, 0).unsqueeze(1) * k0).sum(0)
    assert torch.allclose(att(q, keys, mask)[0], want, atol=1e-6)


def test_sequence_model_outputs_do_not_depend_on_ids_past_max_len(seq_spec):
    m = _model(seq_spec).eval()
    numeric, kjt = _raw_batch(seq_spec, 6, empty_rows=(2,))
    out = m(numeric, kjt)
    assert torch.isfinite(out.booster).all() and torch.isfinite(out.light).all()
    # append ids after each history's max_len-th: the newest-first rule keeps the first
    per = kjt.to_dict()
    vals, lens = [], []
    for k in kjt.keys():
        v, ln = per[k].values(), per[k].lengths()
        if k == "hist_ads":
            parts = list(torch.split(v, ln.tolist()))
            cap = seq_spec.feature(k).max_ids
            parts = [
                torch.cat([p[:cap], p[cap:], torch.tensor([7, 8, 9])]) if len(p) >= cap else p
                for p in parts
            ]  # noqa: E501
            v, ln = torch.cat(parts), torch.tensor([len(p) for p in parts])
        vals.append(v)
        lens.append(ln)
    kjt2 = KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(vals), lengths=torch.cat(lens))
    assert not torch.equal(kjt2.lengths(), kjt.lengths())  # the test changed something
    out2 = m(numeric, kjt2)
    assert torch.equal(out2.booster, out.booster) and torch.equal(out2.light, out.light)


def test_history_changes_the_booster_only_unless_the_light_tower_lists_it(seq_spec):
    m = _model(seq_spec).eval()
    numeric, kjt = _raw_batch(seq_spec, 6)
    per = kjt.to_dict()

    def with_new(name: str) -> KeyedJaggedTensor:
        vals = [per[k].values() + (12345 if k == name else 0) for k in kjt.keys()]
        return KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(vals), lengths=kjt.lengths())

    out = m(numeric, kjt)
    a = m(numeric, with_new("hist_ads"))  # booster only
    assert not torch.allclose(a.booster, out.booster) and torch.equal(a.light, out.light)
    c = m(numeric, with_new("hist_cats"))  # the light tower lists it (mean-pooled bag)
    assert not torch.allclose(c.booster, out.booster) and not torch.allclose(c.light, out.light)


def test_gradients_attention_is_booster_only_and_the_hint_never_reaches_it(seq_spec):
    m = _model(seq_spec)
    numeric, kjt = _raw_batch(seq_spec, 16)
    y = (torch.rand(16) < 0.3).float()
    out = m(numeric, kjt)
    att = [p for n, p in m.named_parameters() if n.startswith("attention.")]
    # the light tower's losses (BCE + hint, gradient block on) never reach the attention
    cfg = LossConfig(mode="rocket", hint="mimic")
    loss, _ = rocket_loss(out.booster, out.light, y, None, cfg)
    light_only = loss - torch.nn.functional.binary_cross_entropy_with_logits(out.booster, y)
    g = torch.autograd.grad(light_only, att, allow_unused=True, retain_graph=True)
    assert all(x is None or torch.count_nonzero(x) == 0 for x in g)
    # the booster's BCE does train it
    g_b = torch.autograd.grad(
        torch.nn.functional.binary_cross_entropy_with_logits(out.booster, y), att
    )
    assert all(torch.count_nonzero(x) > 0 for x in g_b)
    # hist_ads rows reach the shared table t_ad through the booster only
    ec_w = m.ec.embeddings["t_ad"].weight
    (g_l,) = torch.autograd.grad(out.light.sum(), [ec_w], retain_graph=True)
    ad_rows = set(m.featurize(numeric, kjt)[1]["ad"].values().tolist())
    touched = set(g_l.abs().sum(1).nonzero().flatten().tolist())
    assert touched and touched <= ad_rows  # the light tower reads 'ad' only in t_ad


def test_logged_teacher_rows_without_a_score_skip_the_term():
    torch.manual_seed(0)
    z_b, z_l = torch.randn(8), torch.randn(8, requires_grad=True)
    y = (torch.rand(8) < 0.5).float()
    t = torch.randn(8)
    t_nan = t.clone()
    t_nan[[1, 4]] = float("nan")
    cfg = LossConfig(mode="rocket", hint="mimic", hint_weight=0.0, teacher_lambda=2.0)
    _, terms = rocket_loss(z_b, z_l, y, None, cfg, teacher=t_nan)
    keep = torch.ones(8, dtype=torch.bool)
    keep[[1, 4]] = False
    want = float(((z_l[keep] - t[keep]) ** 2).mean().detach())
    assert terms["teacher"] == pytest.approx(want, rel=1e-6)
    total, _ = rocket_loss(z_b, z_l, y, None, cfg, teacher=t_nan)
    (g,) = torch.autograd.grad(total, [z_l])
    assert torch.isfinite(g).all()
    base = LossConfig(mode="rocket", hint="mimic", hint_weight=0.0, teacher_lambda=0.0)
    _, off = rocket_loss(z_b, z_l, y, None, base, teacher=t_nan)
    assert "teacher" not in off
    assert terms["loss"] == pytest.approx(off["loss"] + 2.0 * want, rel=1e-6)
    # every mode: light_only distils too (plain distillation from production); the
    # booster only when asked
    lo = LossConfig(mode="light_only", hint="mimic", teacher_lambda=1.0)
    _, t_lo = rocket_loss(None, z_l, y, None, lo, teacher=t)
    assert set(t_lo) == {"bce_light", "teacher", "loss"}
    bo = LossConfig(mode="booster_only", hint="mimic", teacher_booster=True)
    _, t_bo = rocket_loss(z_b, None, y, None, bo, teacher=t)
    assert set(t_bo) == {"bce_booster", "teacher_booster", "loss"}
    assert t_bo["teacher_booster"] == pytest.approx(float(((z_b - t) ** 2).mean()), rel=1e-6)


def _teacher_table(values, type_=None) -> pa.Table:  # type: ignore[no-untyped-def]
    n = len(values)
    type_ = type_ or pa.float64()
    return pa.table(
        {
            "y": pa.array([0] * n, pa.int64()),
            "user": pa.array(list(range(n)), pa.int64()),
            "ad": pa.array(["a"] * n),
            "ad_cat": pa.array([1] * n, pa.int64()),
            "hist_ads": pa.array([["a", "b"]] * n, pa.list_(pa.string())),
            "hist_cats": pa.array([[1, 2, 3]] * n, pa.list_(pa.int64())),
            "ctx": pa.array([1] * n, pa.int64()),
            "price": pa.array([1.0] * n),
            "pctr": pa.array(values, type_),
        }
    )


def test_teacher_column_decodes_to_logits_with_nan_for_missing(seq_spec):
    d = decode_table(_teacher_table([0.5, None, 0.25, 1.0]), seq_spec, "day.parquet")
    assert d.teacher is not None and np.isnan(d.teacher[1])
    assert d.teacher[0] == pytest.approx(0.0) and d.teacher[2] == pytest.approx(np.log(1 / 3))
    assert np.isfinite(d.teacher[3])  # 1.0 is clamped, not infinite


@pytest.mark.parametrize(
    "values,type_,kind,needle",
    [
        ([0.5, 1.5], pa.float64(), "probability", "probabilities in [0, 1]"),
        ([0.5, float("nan")], pa.float64(), "probability", "probabilities in [0, 1]"),
        ([-0.1, 0.5], pa.float32(), "probability", "probabilities in [0, 1]"),
        ([1.0, float("inf")], pa.float64(), "logit", "finite logits"),
        (["0.5", "0.1"], pa.string(), "probability", "expected numbers"),
    ],
)
def test_bad_teacher_scores_name_file_and_column(seq_spec, values, type_, kind, needle):
    from dataclasses import replace

    spec = replace(seq_spec, teacher_kind=kind)
    with pytest.raises(DataError) as e:
        decode_table(_teacher_table(values, type_), spec, "day7.parquet")
    msg = str(e.value)
    assert "day7.parquet" in msg and "teacher column 'pctr'" in msg and needle in msg, msg


def test_a_sequence_column_of_the_wrong_type_names_file_and_column(seq_spec):
    t = _teacher_table([0.5, 0.5])
    t = t.set_column(t.column_names.index("hist_ads"), "hist_ads", pa.array(["a", "b"]))
    with pytest.raises(DataError) as e:
        decode_table(t, seq_spec, "day3.parquet")
    msg = str(e.value)
    assert "day3.parquet" in msg and "column 'hist_ads'" in msg and "kind sequence" in msg, msg


def test_sequence_and_teacher_columns_drift_across_files(tmp_path, seq_spec, seq_data):
    """Daily files whose sequence and teacher columns differ in physical type (list<int64>
    vs large_list<int32>, string vs dictionary elements, float32 vs float64 scores, an
    all-null teacher column) read as one dataset, values unchanged; a sequence stored as a
    scalar in one file is refused naming that file and column."""
    import glob

    import pyarrow.parquet as pq

    from rocketrec.data.reader import ParquetReader

    base = pq.read_table(sorted(glob.glob(seq_data["train"] + "/*.parquet"))[0]).slice(0, 900)

    def put(t, col, arr):  # type: ignore[no-untyped-def]
        return t.set_column(t.column_names.index(col), col, arr)

    a, b, c = base.slice(0, 300), base.slice(300, 300), base.slice(600, 300)
    cats = [None if v is None else [x % 1000 for x in v] for v in b["hist_cats"].to_pylist()]
    b = put(b, "hist_cats", pa.array(cats, pa.large_list(pa.int32())))
    b = put(b, "pctr", b["pctr"].cast(pa.float64()))
    ads = pa.array(c["hist_ads"].to_pylist(), pa.list_(pa.dictionary(pa.int32(), pa.string())))
    c = put(c, "hist_ads", ads)
    c = put(c, "pctr", pa.nulls(c.num_rows))  # a day production logged no score
    for i, t in enumerate([a, b, c]):
        pq.write_table(t, tmp_path / f"day{i}.parquet", row_group_size=150)
    r = ParquetReader(str(tmp_path), seq_spec, batch_size=900, shuffle=False, drop_last=False)
    (batch,) = list(r)
    # reference: the same values in the first file's types
    b_ref = put(b, "hist_cats", pa.array(cats, pa.list_(pa.int64())))
    b_ref = put(b_ref, "pctr", b["pctr"].cast(pa.float32()))
    c_ref = put(base.slice(600, 300), "pctr", pa.nulls(300, pa.float32()))
    ref = decode_table(pa.concat_tables([a, b_ref, c_ref]), seq_spec, "ref")
    got = batch.sparse.to_dict()
    for key, (values, offsets) in zip(ref.keys, ref.ids, strict=True):
        assert got[key].values().tolist() == values.tolist(), key
        assert got[key].lengths().tolist() == np.diff(offsets).tolist(), key
    assert len(got["hist_cats"].values()) > 0 and len(got["hist_ads"].values()) > 0
    t = batch.teacher.numpy()
    assert np.isnan(t[600:]).all() and not np.isnan(t[:600]).all()
    assert np.array_equal(np.isnan(t), np.isnan(ref.teacher))
    k = ~np.isnan(t)
    assert np.allclose(t[k], ref.teacher[k])
    # a sequence stored as a scalar column in one file: that file and column are named
    bad = put(base.slice(0, 100), "hist_cats", pa.array([1] * 100, pa.int64()))
    pq.write_table(bad, tmp_path / "day9.parquet")
    with pytest.raises(DataError) as e:
        for _ in ParquetReader(str(tmp_path), seq_spec, batch_size=256, shuffle=False):
            pass
    msg = str(e.value)
    assert "day9.parquet" in msg and "column 'hist_cats'" in msg and "\n" not in msg, msg
