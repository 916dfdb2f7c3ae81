"""Offline evaluation (`rocketrec evaluate`) of exported models and checkpoints, equal to
the training run's own evaluation on the same rows; mismatches in one line; runs side by
side (`rocketrec compare`); TensorBoard event files readable by tensorboard's loader."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import bump_manifest_format, train_small
from rocketrec.checkpoint.files import latest_checkpoint, read_meta
from rocketrec.evaluation import compare_runs, evaluate_model
from rocketrec.serving.export import export_checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cross_spec, cross_data):
    d = tmp_path_factory.mktemp("evalruns")
    train_small(cross_spec, cross_data, d / "a", steps=12)
    train_small(cross_spec, cross_data, d / "b", steps=6, light_mlp=(4,))
    export_checkpoint(d / "a", d / "a" / "light.pt", data=cross_data["val"])
    return d


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rocketrec.cli", *args], capture_output=True, text=True
    )


def test_checkpoint_and_export_equal_the_runs_evaluation(runs, cross_data, tmp_path):
    meta = read_meta(latest_checkpoint(runs / "a"))["metrics"]
    rep = evaluate_model(runs / "a", cross_data["val"], quiet=True)
    assert rep["rows"] == meta["eval_rows"] == pq.read_table(cross_data["val"]).num_rows
    for t in ("booster", "light"):
        for k in ("auc", "logloss", "ne", "calibration"):
            # same rows and metrics code; fbgemm (sharded) vs torch lookups: float32 rounding
            assert rep["towers"][t][k] == pytest.approx(meta[f"{t}_{k}"], rel=1e-6), (t, k)
    # the exported light tower, scored through the module a server loads
    out = tmp_path / "report.json"
    r = _cli(
        "evaluate", str(runs / "a" / "light.pt"), "--data", cross_data["val"], "--out", str(out)
    )
    assert r.returncode == 0, r.stderr
    exp = json.loads(out.read_text())
    assert set(exp["towers"]) == {"light"} and exp["rows"] == meta["eval_rows"]
    for k in ("auc", "logloss", "ne", "calibration"):
        assert abs(exp["towers"]["light"][k] - meta[f"light_{k}"]) <= 1e-5, k
    b = exp["towers"]["light"]["buckets"]
    assert len(b) == 10 and sum(x["rows"] for x in b) == exp["rows"]
    assert out.with_suffix(".png").stat().st_size > 1000


def test_group_column_gives_gauc(runs, cross_data):
    rep = evaluate_model(runs / "a", cross_data["val"], group="user_id", quiet=True, rows=1500)
    assert rep["rows"] == 1500 and 0 < rep["towers"]["light"]["gauc"] < 1


def test_mismatches_are_one_line(runs, cross_data, tmp_path):
    t = pq.read_table(cross_data["val"]).drop_columns(["ad_cat"])
    pq.write_table(t, tmp_path / "no_cat.parquet")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    # a manifest format this version does not read
    future = bump_manifest_format(
        runs / "a" / "light.pt", tmp_path / "future.pt", "rocketrec-light/99"
    )
    for model, data, needle in [
        (runs / "a" / "light.pt", str(tmp_path / "no_cat.parquet"), "ad_cat"),
        (runs / "a", str(tmp_path / "no_cat.parquet"), "ad_cat"),
        (junk, cross_data["val"], "not a rocketrec export"),
        (future, cross_data["val"], "manifest format 'rocketrec-light/99'"),
        (tmp_path / "missing.pt", cross_data["val"], "no such file"),
    ]:
        r = _cli("evaluate", str(model), "--data", data)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and needle in err[0], (model, r.stderr[-1500:])


def test_compare_runs_side_by_side(runs, cross_data):
    rows = compare_runs([str(runs / "a"), str(runs / "b")])
    assert rows[0]["mode"] == "rocket" and rows[1]["steps"] == 6
    assert "diff_light_auc" in rows[1] and rows[0]["examples_per_s"] > 0
    fresh = compare_runs(
        [str(runs / "a"), str(runs / "b")], cross_data["val"], rows=1000, quiet=True
    )
    assert fresh[0]["rows"] == fresh[1]["rows"] == 1000
    r = _cli("compare", str(runs / "a"), str(runs / "b"))
    assert r.returncode == 0 and "vs first" in r.stdout and "light_auc" in r.stdout, r.stderr
    r = _cli("compare", str(runs / "a"), str(runs / "b"), "--json")
    assert json.loads(r.stdout)[1]["run"].endswith("b")


def test_tensorboard_event_files(tmp_path, cross_spec, cross_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import small_model
    from rocketrec.train.loop import train
    from rocketrec.train.train_config import TrainConfig

    train(
        cross_spec,
        cross_data["train"],
        cross_data["val"],
        str(tmp_path / "r"),
        small_model(),
        None,
        TrainConfig(batch_size=512, max_steps=6, log_every=2, eval_every=3),
    )
    acc = EventAccumulator(str(tmp_path / "r" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/hint",
        "train/examples_per_s",
        "train/lr_dense",
        "train/lr_sparse",
        "eval_light/auc",
        "eval_booster/ne",
    ):
        assert tag in tags, sorted(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("eval_light/auc")][-1] == 6


def test_no_tensorboard_flag(tmp_path, cross_spec, cross_data):
    from conftest import small_model
    from rocketrec.train.loop import train
    from rocketrec.train.train_config import TrainConfig

    train(
        cross_spec,
        cross_data["train"],
        None,
        str(tmp_path / "r"),
        small_model(),
        None,
        TrainConfig(batch_size=512, max_steps=2, log_every=1, no_tensorboard=True),
    )
    assert not (tmp_path / "r" / "tb").exists()


def test_mlflow_file_store(tmp_path, cross_spec, cross_data, capfd):
    """--mlflow-uri: the same metrics and the resolved config go to an MLflow run (a local
    file store here); the exported model is added as an artifact; a tracking failure is one
    warning and training goes on."""
    import os

    from conftest import small_model
    from rocketrec.train.loop import train
    from rocketrec.train.tracking import MLFLOW_RUN_FILE, log_model_artifact
    from rocketrec.train.train_config import TrainConfig

    uri = (tmp_path / "mlruns").as_uri()
    run = tmp_path / "r"
    cfg = TrainConfig(batch_size=512, max_steps=4, log_every=2, mlflow_uri=uri)
    train(cross_spec, cross_data["train"], cross_data["val"], str(run), small_model(), None, cfg)
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = (run / MLFLOW_RUN_FILE).read_text().strip()
    got = client.get_run(run_id)
    assert got.data.params["train.batch_size"] == "512"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4]
    assert client.get_metric_history(run_id, "eval_light/auc")[-1].step == 4
    model = tmp_path / "light.pt"
    model.write_bytes(b"model")
    log_model_artifact(run, uri, model)
    assert [a.path for a in client.list_artifacts(run_id)] == ["light.pt"]
    # a tracking URI that cannot work: one warning, the run completes
    capfd.readouterr()
    bad = TrainConfig(batch_size=512, max_steps=2, log_every=1, mlflow_uri="bogus-scheme://x")
    res = train(
        cross_spec, cross_data["train"], None, str(tmp_path / "b"), small_model(), None, bad
    )
    assert res["steps"] == 2
    warn = [x for x in capfd.readouterr().err.splitlines() if "MLflow" in x]
    assert len(warn) == 1 and "tracking is off" in warn[0]


def test_bounded_mode_past_exact_rows(runs, cross_data):
    """Past --exact-rows the state is bounded histograms: AUC close to the exact one,
    logloss, NE and calibration still exact, deciles from the histogram."""
    exact = evaluate_model(runs / "a", cross_data["val"], quiet=True)
    hist = evaluate_model(runs / "a", cross_data["val"], quiet=True, exact_rows=300)
    assert hist["rows"] == exact["rows"]
    for t in ("booster", "light"):
        e, h = exact["towers"][t], hist["towers"][t]
        assert e["auc_method"] == "exact" and h["auc_method"].startswith("histogram")
        assert abs(h["auc"] - e["auc"]) <= 1e-3, (h["auc"], e["auc"])
        for k in ("logloss", "ne", "calibration"):
            assert h[k] == pytest.approx(e[k], rel=1e-9), k
        assert 1 <= len(h["buckets"]) <= 10
        assert sum(b["rows"] for b in h["buckets"]) == pytest.approx(hist["rows"])
