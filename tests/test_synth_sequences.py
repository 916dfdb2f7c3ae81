"""Synthetic behaviour sequences and the teacher column (rocketrec.data.synth)."""

from __future__ import annotations

import copy
import hashlib
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rocketrec.data import synth as synth_mod
from rocketrec.data.synth import SynthConfig, SynthReport, synth
from rocketrec.spec import load_spec, spec_from_dict
from rocketrec.train.metrics import auc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADS_SEQ = os.path.join(ROOT, "feature_specs", "ads_seq.yaml")
ROWS = 5000


@pytest.fixture(scope="module")
def ads_seq():
    return load_spec(ADS_SEQ)


def _digest(d) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(d)):
        h.update(name.encode())
        h.update(open(os.path.join(d, name), "rb").read())
    return h.hexdigest()


def _write(spec, d, **cfg) -> pa.Table:
    cfg.setdefault("rows", ROWS)
    cfg.setdefault("row_group_size", 2000)
    synth(spec, str(d), SynthConfig(**cfg))
    return pq.read_table(d)


def _lists(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, flat values) of a list column without nulls."""
    arr = col.combine_chunks()
    assert arr.null_count == 0
    lens = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    return lens, pc.list_flatten(arr).to_numpy(zero_copy_only=False)


def _spec_dict(spec):
    return copy.deepcopy(spec.to_dict())


def test_sequence_columns_are_lists_of_the_query_ids(tmp_path, ads_seq):
    t = _write(ads_seq, tmp_path, seed=1)
    assert t.num_rows == ROWS
    for col in ("hist_ad_ids", "hist_cat_ids"):
        assert t.schema.field(col).type == pa.list_(pa.int64()), t.schema.field(col)
    lens, ads = _lists(t["hist_ad_ids"])
    cat_lens, cats = _lists(t["hist_cat_ids"])
    assert lens.max() <= 50 and cat_lens.max() <= 50
    assert 0.02 < (lens == 0).mean() < 0.09, "some empty histories"
    assert lens[lens > 0].min() >= 5 and lens.max() == 50 and lens.mean() > 20
    assert (cat_lens == lens).all(), "one category per clicked ad"
    # the history holds ids of the query's id space: mostly ids also seen as candidates
    seen_ads = set(t["ad_id"].drop_null().to_numpy().tolist())
    seen_cats = set(t["ad_category"].drop_null().to_numpy().tolist())
    assert np.isin(ads, list(seen_ads)).mean() > 0.5
    assert np.isin(cats, list(seen_cats)).mean() > 0.8
    assert not np.isin(ads, t["user_id"].drop_null().to_numpy()).any()
    # derived: each ad has one category, in the history and as the candidate alike
    pairs = set(zip(ads.tolist(), cats.tolist()))
    both = pc.and_(t["ad_id"].is_valid(), t["ad_category"].is_valid())
    cand = t.filter(both)
    pairs |= set(zip(cand["ad_id"].to_numpy().tolist(), cand["ad_category"].to_numpy().tolist()))
    ad_of = [a for a, _ in pairs]
    assert len(ad_of) == len(set(ad_of)), "an ad id with two categories"
    assert len(set(cats.tolist())) > 30, "many categories"
    # clicks near the target rate; the teacher is a float32 probability with ~1% nulls
    assert 0.035 < t["click"].to_numpy().mean() < 0.065
    assert t.schema.field("pctr").type == pa.float32()
    assert 15 <= t["pctr"].null_count <= 100
    p = t["pctr"].drop_null().to_numpy()
    assert ((p > 0) & (p < 1)).all()


def test_newest_first_derived_sequence_keeps_the_newest_items(tmp_path, ads_seq):
    """A shorter derived history lists the categories of the FIRST (newest) ads."""
    assert "NEWEST FIRST" in synth_mod.__doc__
    d = _spec_dict(ads_seq)
    for f in d["sparse"]:
        if f["name"] == "hist_categories":
            f["max_len"] = 7
    spec = spec_from_dict(d, "short.yaml")
    t = _write(spec, tmp_path, rows=2000, seed=2)
    lens, ads = _lists(t["hist_ad_ids"])
    cat_lens, cats = _lists(t["hist_cat_ids"])
    assert (cat_lens == np.minimum(lens, 7)).all() and lens.max() > 7
    cat_of = {}
    ad_rows = np.split(ads, np.cumsum(lens)[:-1])
    for a_row, c_row in zip(ad_rows, np.split(cats, np.cumsum(cat_lens)[:-1])):
        for a, c in zip(a_row[: len(c_row)], c_row):
            assert cat_of.setdefault(a, c) == c  # position i of both is the same click
    assert len(cat_of) > 100


def test_deterministic_for_a_seed(tmp_path, ads_seq):
    cfg = dict(rows=3000, seed=3, files=2, row_group_size=1000)
    _write(ads_seq, tmp_path / "a", **cfg)
    _write(ads_seq, tmp_path / "b", **cfg)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    other = _write(ads_seq, tmp_path / "c", **{**cfg, "seed": 4})
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    # another seed draws other rows of the same world: the same ad -> category map
    a = pq.read_table(tmp_path / "a")
    m1 = dict(zip(*(_lists(a[c])[1].tolist() for c in ("hist_ad_ids", "hist_cat_ids"))))
    m2 = dict(zip(*(_lists(other[c])[1].tolist() for c in ("hist_ad_ids", "hist_cat_ids"))))
    common = set(m1) & set(m2)
    assert len(common) > 50 and all(m1[k] == m2[k] for k in common)


def test_teacher_auc_falls_as_noise_grows(tmp_path, ads_seq):
    tables, aucs = {}, {}
    for s in (0.0, 1.0, 3.0):
        t = _write(ads_seq, tmp_path / str(s), seed=5, teacher_noise=s, true_ctr_column="p")
        ok = t["pctr"].is_valid().to_numpy(zero_copy_only=False)
        y = t["click"].to_numpy()[ok]
        aucs[s] = auc(y, t["pctr"].to_numpy(zero_copy_only=False)[ok])
        tables[s] = t
        if s == 0.0:  # a perfect teacher is the true probability
            bayes = auc(y, t["p"].to_numpy()[ok])
            assert aucs[s] == pytest.approx(bayes, abs=1e-12)
            assert np.array_equal(
                t["pctr"].to_numpy(zero_copy_only=False)[ok], t["p"].to_numpy()[ok]
            )
    assert aucs[0.0] > aucs[1.0] + 0.005 > aucs[3.0] + 0.03, aucs
    # the noise changes the teacher column only
    rest = [c for c in tables[0.0].column_names if c != "pctr"]
    assert tables[1.0].select(rest).equals(tables[0.0].select(rest))
    assert tables[3.0]["pctr"].is_valid().equals(tables[0.0]["pctr"].is_valid())


def test_teacher_as_logit(tmp_path, ads_seq):
    d = _spec_dict(ads_seq)
    d["teacher"] = {"column": "pctr_logit", "kind": "logit"}
    t = _write(
        spec_from_dict(d, "logit.yaml"), tmp_path, seed=6, teacher_noise=0.0, true_ctr_column="p"
    )
    z = t["pctr_logit"].to_numpy(zero_copy_only=False)
    ok = ~np.isnan(z)
    assert 0.005 < 1 - ok.mean() < 0.02
    assert (z[ok] < 0).mean() > 0.5  # a logit, not a probability
    p = t["p"].to_numpy()[ok]
    assert np.allclose(1 / (1 + np.exp(-z[ok].astype(np.float64))), p, rtol=1e-4, atol=1e-7)


def test_bayes_auc_with_the_sequence_term_beats_without(tmp_path, ads_seq):
    rep = SynthReport()
    synth(ads_seq, str(tmp_path), SynthConfig(rows=ROWS, seed=7, true_ctr_column="p"), report=rep)
    assert rep.bayes_no_seq is not None and rep.teacher is not None and rep.rows == ROWS
    with_seq, without = rep.bayes.value(), rep.bayes_no_seq.value()
    assert with_seq > without + 0.03, (with_seq, without)
    t = pq.read_table(tmp_path)
    y = t["click"].to_numpy()
    assert rep.bayes.value() == pytest.approx(auc(y, t["p"].to_numpy()), abs=1e-3)
    # the signal is in the written columns: a candidate whose category the user clicked
    # before is clicked far more often than one whose category is new to the user
    lens, cats = _lists(t["hist_cat_ids"])
    rows = np.repeat(np.arange(t.num_rows), lens)
    cand = t["ad_category"].to_numpy(zero_copy_only=False)
    known = np.bincount(rows, cats == cand[rows], minlength=t.num_rows) > 0
    assert y[known].mean() > 2 * y[~known & (lens > 0)].mean()
    # half the candidates are from one of the user's interests: a third of them share a
    # category with the history (were they drawn apart from the interests: ~1/8)
    assert 0.25 < known.mean() < 0.5, known.mean()


SEQ_OTHER_TABLE = {
    "version": 1,
    "label": {"column": "y"},
    "teacher": {"column": "score"},
    "tables": [
        {"name": "t_user", "rows": 300, "dim": 8},
        {"name": "t_ad", "rows": 900, "dim": 8},
        {"name": "t_item", "rows": 2000, "dim": 8},
        {"name": "t_tag", "rows": 50, "dim": 4},
    ],
    "sparse": [
        {"name": "user", "column": "user", "table": "t_user"},
        {"name": "ad", "column": "ad", "dtype": "string", "table": "t_ad"},
        {"name": "tags", "column": "tags", "kind": "list", "table": "t_tag"},
        # a history of other items (its own table and ids), queried by the ad
        {
            "name": "items",
            "column": "items",
            "dtype": "string",
            "kind": "sequence",
            "table": "t_item",
            "max_len": 12,
            "query": "ad",
        },
    ],
    "dense": [{"name": "x", "column": "x"}],
}


def test_independent_sequence_on_its_own_table(tmp_path):
    spec = spec_from_dict(SEQ_OTHER_TABLE, "other.yaml")
    rep = SynthReport()
    synth(spec, str(tmp_path), SynthConfig(rows=4000, seed=8, row_group_size=1500), report=rep)
    t = pq.read_table(tmp_path)
    assert t.schema.field("items").type == pa.list_(pa.string())
    lens, items = _lists(t["items"])
    assert lens.max() <= 12 and (lens == 0).any() and lens[lens > 0].min() >= 5
    assert all(s.startswith("items:") for s in items[:100])  # its own ids, not the ad's
    assert rep.bayes_no_seq is not None and rep.bayes.value() > rep.bayes_no_seq.value() + 0.03


def test_a_sequence_leaves_the_other_columns_alone(tmp_path):
    """Sequence randomness has its own stream: the spec without the sequence draws the
    same feature columns (only the labels, which the history now moves, differ)."""
    plain = copy.deepcopy(SEQ_OTHER_TABLE)
    plain["sparse"] = plain["sparse"][:3]
    plain["tables"] = [t for t in plain["tables"] if t["name"] != "t_item"]
    a = _write(spec_from_dict(SEQ_OTHER_TABLE, "a.yaml"), tmp_path / "a", rows=2000, seed=9)
    b = _write(spec_from_dict(plain, "b.yaml"), tmp_path / "b", rows=2000, seed=9)
    same = ["user", "ad", "tags", "x"]
    assert a.select(same).equals(b.select(same))
    assert not a["y"].equals(b["y"])


def _auc_lines(out: str) -> dict[str, float]:
    found = {}
    for line in out.splitlines():
        m = re.match(r"(bayes auc|bayes auc without the sequence term|teacher auc): (0\.\d+)", line)
        if m:
            found[m.group(1)] = float(m.group(2))
    return found


def test_cli_prints_the_auc_lines(tmp_path, capsys, tiny_spec_path):
    from rocketrec.cli import main

    args = ["synth", "--spec", ADS_SEQ, "--rows", "3000", "--quiet", "--row-group-size", "1000"]
    assert main([*args, "--out", str(tmp_path / "a"), "--teacher-noise", "0.5"]) == 0
    got = _auc_lines(capsys.readouterr().out)
    assert set(got) == {"bayes auc", "bayes auc without the sequence term", "teacher auc"}
    assert got["bayes auc"] > got["bayes auc without the sequence term"] > 0.6
    assert got["bayes auc"] > got["teacher auc"] > 0.6
    assert main([*args, "--out", str(tmp_path / "b"), "--teacher-noise", "0"]) == 0
    exact = _auc_lines(capsys.readouterr().out)
    assert exact["teacher auc"] == pytest.approx(exact["bayes auc"], abs=0.005)
    assert exact["teacher auc"] > got["teacher auc"]
    # a spec without sequences or a teacher: the Bayes line only
    assert (
        main(
            [
                "synth",
                "--spec",
                str(tiny_spec_path),
                "--rows",
                "2000",
                "--quiet",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    assert set(_auc_lines(capsys.readouterr().out)) == {"bayes auc"}
    assert main([*args, "--out", str(tmp_path / "d"), "--teacher-noise", "-1"]) == 2
    assert "--teacher-noise" in capsys.readouterr().err
