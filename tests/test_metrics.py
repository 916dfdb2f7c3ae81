"""Evaluation metrics against brute-force references on small random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import small_model
from rocketrec.train.metrics import auc, base_rate_logloss, gauc, logloss, tower_metrics


def brute_auc(y, s, w=None):
    w = np.ones(len(y)) if w is None else w
    num = den = 0.0
    for i in range(len(y)):
        for j in range(len(y)):
            if y[i] == 1 and y[j] == 0:
                pair = w[i] * w[j]
                den += pair
                num += pair * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
    return num / den if den else float("nan")


def brute_logloss(y, p, w=None):
    w = np.ones(len(y)) if w is None else w
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return sum(
        wi * -(yi * math.log(pi) + (1 - yi) * math.log(1 - pi)) for yi, pi, wi in zip(y, p, w)
    ) / sum(w)


def brute_gauc(y, s, g, w=None):
    w = np.ones(len(y)) if w is None else w
    acc = tot = 0.0
    for k in set(g.tolist()):
        m = g == k
        if len(set(y[m].tolist())) < 2:
            continue
        imp = w[m].sum()
        acc += imp * brute_auc(y[m], s[m], w[m])
        tot += imp
    return acc / tot if tot else float("nan")


@pytest.mark.parametrize("seed", range(12))
def test_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    y = (rng.random(n) < rng.uniform(0.1, 0.6)).astype(np.float64)
    # coarse scores: many ties
    s = np.round(rng.normal(size=n), int(rng.integers(0, 2))).astype(np.float32)
    w = rng.uniform(0.1, 3.0, n) if seed % 2 else None
    g = rng.integers(0, 5, n)
    for got, want in (
        (auc(y, s, w), brute_auc(y, s, w)),
        (gauc(y, s, g, w), brute_gauc(y, s, g, w)),
    ):
        assert (math.isnan(got) and math.isnan(want)) or abs(got - want) < 1e-12
    p = 1 / (1 + np.exp(-s.astype(np.float64)))
    assert abs(logloss(y, p, w) - brute_logloss(y, p, w)) < 1e-12
    ctr = np.average(y, weights=w)
    if 0 < ctr < 1:
        m = tower_metrics(y, s, w, g)
        assert abs(m["calibration"] - np.average(p, weights=w) / ctr) < 1e-12
        base = brute_logloss(y, np.full(n, ctr), w)
        assert abs(base_rate_logloss(y, w) - base) < 1e-12
        assert abs(m["ne"] - brute_logloss(y, p, w) / base) < 1e-12
        assert abs(m["gauc"] - brute_gauc(y, s, g, w)) < 1e-12 or math.isnan(m["gauc"])


def test_metric_edge_cases():
    y = np.array([0, 1, 0, 1.0])
    assert auc(y, np.zeros(4)) == 0.5  # all ties
    assert auc(y, np.array([0, 1, 0, 1.0])) == 1.0
    assert auc(y, np.array([1, 0, 1, 0.0])) == 0.0
    assert math.isnan(auc(np.ones(4), np.arange(4.0)))  # one class only
    assert math.isnan(auc(np.zeros(0), np.zeros(0)))
    # weights: a zero-weight pair does not count
    assert auc(y, np.array([0, 1, 2, -1.0]), np.array([1, 1, 0, 0.0])) == 1.0
    # gauc skips one-class groups and weighs groups by impressions
    g = np.array([0, 0, 1, 1, 2, 2, 2])
    yy = np.array([0, 1, 0, 1, 1, 1, 1.0])
    ss = np.array([0, 1, 1, 0, 5, 5, 5.0])
    assert gauc(yy, ss, g) == 0.5  # groups 0 (AUC 1) and 1 (AUC 0), equal sizes
    assert abs(gauc(yy, ss, g, np.array([3, 3, 1, 1, 1, 1, 1.0])) - 0.75) < 1e-12
    assert math.isnan(gauc(np.ones(3), np.zeros(3), np.arange(3)))
    # a perfect model has ne close to 0, the base rate has ne 1
    m = tower_metrics(y, np.array([-30, 30, -30, 30.0]))
    assert m["ne"] < 1e-5 and m["auc"] == 1.0
    assert abs(tower_metrics(y, np.zeros(4))["ne"] - 1.0) < 1e-12


def _auc_by_search(y, s):
    """Independent AUC: for each positive, negatives scored below it (+ half the ties)."""
    neg = np.sort(s[y == 0])
    pos = s[y == 1]
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))


def test_group_metrics_end_to_end_match_exported_scores(tmp_path, tiny_spec_path, tiny_data):
    """gauc and ne in metrics.jsonl / the manifest equal a computation from the exported
    model's scores on the validation rows (fp32 export: same scores to 1e-5)."""
    import json

    import pyarrow.parquet as pq
    import torch

    from rocketrec.data.reader import list_parquet_files
    from rocketrec.serving.export import export_checkpoint
    from rocketrec.serving.manifest import read_manifest
    from rocketrec.serving.requests import raw_inputs_from_table
    from rocketrec.spec import load_spec
    from rocketrec.train.loop import train
    from rocketrec.train.train_config import TrainConfig

    spec_path = tmp_path / "grouped.yaml"
    spec_path.write_text(
        tiny_spec_path.read_text().replace("weight: {column: w}", "group: {column: user}")
    )
    spec = load_spec(spec_path)
    assert spec.group_column == "user" and spec.weight_column is None
    out = tmp_path / "run"
    cfg = small_model()
    res = train(
        spec,
        tiny_data["train"],
        tiny_data["val"],
        str(out),
        cfg,
        None,
        TrainConfig(batch_size=256, max_steps=30, log_every=0),
    )
    for t in ("booster", "light"):
        assert 0.0 < res[f"{t}_gauc"] < 1.0 and 0.0 < res[f"{t}_ne"] < 2.0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["light_gauc"] == res["light_gauc"]
    rep = export_checkpoint(out, tmp_path / "light.pt", data=tiny_data["val"])
    assert read_manifest(rep["out"])["metrics"]["light_gauc"] == res["light_gauc"]
    model = torch.jit.load(rep["out"])
    _, files = list_parquet_files(tiny_data["val"])
    table = pq.read_table(files[0])
    with torch.no_grad():
        p = model(*raw_inputs_from_table(table, spec)).double().numpy()
    y = table.column("y").to_numpy().astype(np.float64)
    g = table.column("user").to_numpy(zero_copy_only=False)
    g = np.where(np.isnan(g.astype(np.float64)), -1, g).astype(np.int64)
    acc = tot = 0.0
    for k in np.unique(g):
        m = g == k
        if 0 < y[m].sum() < m.sum():
            acc += m.sum() * _auc_by_search(y[m], p[m])
            tot += m.sum()
    assert abs(acc / tot - res["light_gauc"]) < 2e-3  # ties broken by float rounding only
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    ll = -np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))
    base = y.mean()
    ne = ll / -(base * np.log(base) + (1 - base) * np.log(1 - base))
    assert abs(ne - res["light_ne"]) < 1e-4


def test_negative_downsampling_keeps_served_probabilities_calibrated(
    tmp_path, tiny_spec, tiny_data
):
    """Trained on a quarter of the non-clicks; evaluated on all rows with the correction;
    the exported model applies it too (manifest records the rate)."""
    import pyarrow.parquet as pq
    import torch

    from rocketrec.data.reader import list_parquet_files
    from rocketrec.serving.export import export_checkpoint
    from rocketrec.serving.manifest import read_manifest
    from rocketrec.serving.requests import raw_inputs_from_table
    from rocketrec.train.loop import train
    from rocketrec.train.train_config import TrainConfig

    cfg = small_model()
    res = {}
    for r in (1.0, 0.25):
        out = tmp_path / f"run{r}"
        res[r] = train(
            tiny_spec,
            tiny_data["train"],
            tiny_data["val"],
            str(out),
            cfg,
            None,
            TrainConfig(batch_size=128, epochs=3, log_every=0, negative_sample_rate=r),
        )
    # fewer rows trained on, yet calibrated on the full validation data
    assert res[0.25]["rows_seen"] < 0.7 * res[1.0]["rows_seen"]
    for r in (1.0, 0.25):
        assert 0.8 < res[r]["light_calibration"] < 1.25, res[r]
    rep = export_checkpoint(tmp_path / "run0.25", tmp_path / "light.pt", data=tiny_data["val"])
    man = read_manifest(rep["out"])
    assert man["negative_sample_rate"] == 0.25
    _, files = list_parquet_files(tiny_data["val"])
    table = pq.read_table(files[0])
    with torch.no_grad():
        p = torch.jit.load(rep["out"])(*raw_inputs_from_table(table, tiny_spec)).double().numpy()
    y = table.column("y").to_numpy().astype(np.float64)
    w = table.column("w").to_numpy(zero_copy_only=False).astype(np.float64)
    served = np.average(p, weights=w) / np.average(y, weights=w)
    assert abs(served - res[0.25]["light_calibration"]) < 1e-4
    assert 0.8 < served < 1.25
