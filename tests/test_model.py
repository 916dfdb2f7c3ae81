"""Model, rocket loss and switches (by autograd), the training loop and its checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import small_model
from rocketrec.checkpoint.files import latest_checkpoint
from rocketrec.checkpoint.tables import load_unsharded
from rocketrec.data.reader import ParquetReader
from rocketrec.model.loss import HINTS, LossConfig, bce, hint_loss, rocket_loss
from rocketrec.model.model import RocketModel
from rocketrec.model.towers import ModelConfig
from rocketrec.train.loop import train
from rocketrec.train.task import TrainingDiverged
from rocketrec.train.train_config import TrainConfig

SMALL = ModelConfig(cross_layers=2, cross_rank=4, booster_mlp=(32, 16), light_mlp=(8,))


@pytest.fixture()
def model_and_batch(tiny_spec, tiny_data):
    torch.manual_seed(0)
    m = RocketModel(tiny_spec, SMALL)
    b = next(iter(ParquetReader(tiny_data["train"], tiny_spec, 256, shuffle=False)))
    return m, b


def _grads(loss, params):
    gs = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(params, gs)}


def _with_scale(m, scale):
    """The model called with the light losses' gradient scale (the phase plan's)."""
    return lambda dense, sparse: m(dense, sparse, light_shared_grad_scale=scale)


def _booster_only(m):
    return [(n, p) for n, p in m.named_parameters() if n.startswith("booster.")]


def _light(m):
    return [(n, p) for n, p in m.named_parameters() if n.startswith("light.")]


def _tables(m):
    return [(n, p) for n, p in m.named_parameters() if n.startswith("ebc.")]


@pytest.mark.parametrize("hint", HINTS)
def test_gradient_block_on(model_and_batch, hint):
    m, b = model_and_batch
    out = m(b.dense, b.sparse)
    h = hint_loss(out.light, out.booster.detach(), hint, 2.0, b.weights)
    g_booster = _grads(h, _booster_only(m))
    assert all(torch.count_nonzero(g) == 0 for g in g_booster.values())
    assert all(torch.count_nonzero(g) > 0 for n, g in _grads(h, _light(m)).items() if "weight" in n)
    # the hint reaches the rows that the light features looked up, and only their tables
    g_tab = _grads(h, _tables(m))
    assert torch.count_nonzero(g_tab["ebc.embedding_bags.t_user.weight"]) > 0
    assert torch.count_nonzero(g_tab["ebc.embedding_bags.t_ad.weight"]) > 0
    assert (
        torch.count_nonzero(g_tab["ebc.embedding_bags.t_ctx.weight"]) == 0
    )  # ctx: booster-only feature
    user_rows = torch.remainder(b.sparse["user"].values(), 500).unique()
    touched = g_tab["ebc.embedding_bags.t_user.weight"].abs().sum(1).nonzero().flatten()
    assert set(touched.tolist()) <= set(user_rows.tolist())
    # and the full loss gives the booster exactly the gradient of its own BCE
    cfg = LossConfig(hint=hint, hint_weight=0.7, gradient_block=True)
    total, terms = rocket_loss(out.booster, out.light, b.labels, b.weights, cfg)
    assert set(terms) == {"bce_booster", "bce_light", "hint", "loss"}
    own = _grads(bce(out.booster, b.labels, b.weights), _booster_only(m))
    for n, g in _grads(total, _booster_only(m)).items():
        assert torch.equal(g, own[n]), n


def test_gradient_block_off(model_and_batch):
    m, b = model_and_batch
    out = m(b.dense, b.sparse)
    cfg = LossConfig(hint="mimic", hint_weight=1.0, gradient_block=False)
    total, _ = rocket_loss(out.booster, out.light, b.labels, b.weights, cfg)
    own = _grads(bce(out.booster, b.labels, b.weights), _booster_only(m))
    diff = [torch.count_nonzero(g - own[n]) for n, g in _grads(total, _booster_only(m)).items()]
    assert sum(int(d) for d in diff) > 0, "without the block the hint must reach the booster"
    h = hint_loss(out.light, out.booster, "mimic", 1.0, None)
    assert any(torch.count_nonzero(g) > 0 for g in _grads(h, _booster_only(m)).values())


def test_light_shared_grad_scale(model_and_batch):
    m, b = model_and_batch
    cfg = LossConfig(hint="kd", hint_weight=1.0)

    def light_terms(scale):
        out = m(b.dense, b.sparse, light_shared_grad_scale=scale)
        _, _ = rocket_loss(out.booster, out.light, b.labels, b.weights, cfg)
        return bce(out.light, b.labels, b.weights) + hint_loss(
            out.light, out.booster.detach(), "kd", 2.0, b.weights
        )

    off = _grads(light_terms(0.0), _tables(m))
    assert all(torch.count_nonzero(g) == 0 for g in off.values()), (
        "scale 0: no light loss reaches a table"
    )
    full = _grads(light_terms(1.0), _tables(m))
    half = _grads(light_terms(0.5), _tables(m))
    assert any(torch.count_nonzero(g) > 0 for g in full.values())
    for n in full:
        torch.testing.assert_close(half[n], 0.5 * full[n])
    # the forward value does not depend on the scale
    assert torch.equal(
        _with_scale(m, 0.3)(b.dense, b.sparse).light, _with_scale(m, 1.0)(b.dense, b.sparse).light
    )


def test_bucketing_is_nonnegative_modulo(tiny_spec):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    m = RocketModel(tiny_spec, SMALL)
    ids = torch.tensor([-1, -501, 499, 500, 2**62, -(2**63)])
    b = len(ids)  # one id per row of the scalar feature 'user', every other bag empty
    n_inputs = len(tiny_spec.id_features)
    kjt = KeyedJaggedTensor(
        keys=[f.name for f in tiny_spec.id_features],
        values=ids,
        lengths=torch.tensor([1] * b + [0] * (b * (n_inputs - 1))),
    )
    dense = torch.zeros(b, len(tiny_spec.dense))
    rows = m.features(dense, kjt)[1].values()
    assert rows.tolist() == [499, 499, 499, 0, 2**62 % 500, (-(2**63)) % 500]
    assert (rows >= 0).all()


def test_loss_config_rejects_bad_values():
    for bad in [
        dict(mode="x"),
        dict(hint="y"),
        dict(hint_weight=-1),
        dict(temperature=0),
        dict(light_shared_grad_scale=2),
    ]:
        with pytest.raises(ValueError):
            LossConfig(**bad)


# -- training loop ---------------------------------------------------------------------

TC = TrainConfig(
    batch_size=256, epochs=1, log_every=0, warmup_steps=5, dense_lr=3e-3, sparse_lr=0.05, seed=11
)


def _run(tmp_path, tiny_spec, tiny_data, name, loss=None, tc=TC, **kw):
    out = tmp_path / name
    res = train(
        tiny_spec,
        tiny_data["train"],
        tiny_data["val"],
        str(out),
        SMALL,
        loss or LossConfig(),
        tc,
        **kw,
    )
    return out, res


def _final_model(out):
    m, meta = load_unsharded(latest_checkpoint(out))
    return m, meta


def _initial_model(tiny_spec, seed):
    torch.manual_seed(seed)
    return RocketModel(tiny_spec, SMALL)


def _same(a, b, prefix):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix))


def test_learning_both_towers_beat_base_rate(tmp_path, tiny_spec, tiny_data):
    out, res = _run(
        tmp_path, tiny_spec, tiny_data, "learn", tc=dataclasses.replace(TC, epochs=3, eval_every=20)
    )
    assert res["booster_logloss"] < res["base_logloss"]
    assert res["light_logloss"] < res["base_logloss"]
    assert res["booster_auc"] > 0.55 and res["light_auc"] > 0.55
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("booster_auc" in r for r in lines) >= 2


def test_modes_train_what_they_should(tmp_path, tiny_spec, tiny_data):
    tc = dataclasses.replace(TC, max_steps=12)
    init = _initial_model(tiny_spec, TC.seed)
    lo, _ = _run(tmp_path, tiny_spec, tiny_data, "light_only", LossConfig(mode="light_only"), tc)
    m_lo, _ = _final_model(lo)
    assert (
        _same(m_lo, init, "booster.")
        and not _same(m_lo, init, "light.")
        and not _same(m_lo, init, "ebc.")
    )
    bo, _ = _run(
        tmp_path, tiny_spec, tiny_data, "booster_only", LossConfig(mode="booster_only"), tc
    )
    m_bo, _ = _final_model(bo)
    assert _same(m_bo, init, "light.") and not _same(m_bo, init, "booster.")
    # light_shared_grad_scale 0 + gradient block: the booster is bit-identical to booster_only
    r0, _ = _run(
        tmp_path, tiny_spec, tiny_data, "rocket_s0", LossConfig(light_shared_grad_scale=0.0), tc
    )
    m_r0, _ = _final_model(r0)
    assert (
        _same(m_r0, m_bo, "booster.")
        and _same(m_r0, m_bo, "ebc.")
        and not _same(m_r0, init, "light.")
    )
    # paper setting: the light losses also train the tables, so the booster differs
    r1, _ = _run(tmp_path, tiny_spec, tiny_data, "rocket", LossConfig(), tc)
    assert not _same(_final_model(r1)[0], m_bo, "ebc.")
    # teacher_student: phase 1 is booster_only; phase 2 trains only the light tower
    ts, res = _run(tmp_path, tiny_spec, tiny_data, "ts", LossConfig(mode="teacher_student"), tc)
    m_ts, meta = _final_model(ts)
    assert meta["step"] == 24
    assert (
        _same(m_ts, m_bo, "booster.")
        and _same(m_ts, m_bo, "ebc.")
        and not _same(m_ts, init, "light.")
    )


def test_resume_matches_uninterrupted(tmp_path, tiny_spec, tiny_data):
    tc = dataclasses.replace(TC, epochs=2, checkpoint_every=7, eval_every=0)
    ref, ref_res = _run(tmp_path, tiny_spec, tiny_data, "ref", LossConfig(), tc)

    class Crash(Exception):
        pass

    calls = []

    def crash_after_second_checkpoint(metrics, path):
        calls.append(path)
        if len(calls) == 2:  # step 14: mid-way through epoch 1 (32 steps per epoch)
            raise Crash()

    with pytest.raises(Crash):
        _run(
            tmp_path,
            tiny_spec,
            tiny_data,
            "crashed",
            LossConfig(),
            tc,
            report=crash_after_second_checkpoint,
        )
    out, res = _run(
        tmp_path,
        tiny_spec,
        tiny_data,
        "crashed",
        LossConfig(),
        tc,
        resume=str(tmp_path / "crashed"),
    )
    a, meta_a = _final_model(ref)
    b, meta_b = _final_model(out)
    rows_a, rows_b = (m["trainer"]["progress"]["rows_seen"] for m in (meta_a, meta_b))
    assert meta_a["step"] == meta_b["step"] and rows_a == rows_b
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert res["light_auc"] == ref_res["light_auc"]


def test_trainer_state_dict_round_trips_counters_readers_and_rng(tmp_path, tiny_spec, tiny_data):
    """Trainer.state_dict() (JSON) into a fresh Trainer: the same counters, the same next
    batch, the same random draws; a checkpoint's meta.json holds it and the job config
    once (each setting appears one time in the file)."""
    from rocketrec.checkpoint.files import read_meta
    from rocketrec.checkpoint.meta import saved_trainer_state
    from rocketrec.train.loop import run
    from rocketrec.train.trainer import Trainer

    tc = dataclasses.replace(TC, max_steps=5, eval_every=0, checkpoint_every=0)
    t = Trainer(tiny_spec, SMALL, LossConfig(), tc, tmp_path / "a", tiny_data["train"])
    run(t)
    state = json.loads(json.dumps(t.state_dict()))
    want_batch = next(iter(t.train_reader))
    want_draw = torch.rand(8)

    t2 = Trainer(tiny_spec, SMALL, LossConfig(), tc, tmp_path / "b", tiny_data["train"])
    torch.manual_seed(1234)  # another RNG state: load_state_dict must restore it
    t2.load_state_dict(state)
    # a finished run (phase_idx past the last phase) continues its last phase
    assert t.progress.phase_idx == len(t.phases) and t2.progress.phase_idx == len(t.phases) - 1
    t2.progress.phase_idx = t.progress.phase_idx
    assert dataclasses.asdict(t2.progress) == dataclasses.asdict(t.progress)
    assert t2.progress.step == 5 and t2.progress.rows_seen == 5 * tc.batch_size
    assert torch.equal(torch.rand(8), want_draw)
    got_batch = next(iter(t2.train_reader))
    assert torch.equal(got_batch.labels, want_batch.labels)
    for k in want_batch.sparse.keys():
        assert torch.equal(got_batch.sparse[k].values(), want_batch.sparse[k].values()), k
    t.env.close()
    t2.env.close()

    meta = read_meta(latest_checkpoint(tmp_path / "a"))
    assert saved_trainer_state(meta)["progress"] == state["progress"]
    assert {"model_config", "loss_config", "train_config", "run_config"}.isdisjoint(meta)
    text = (latest_checkpoint(tmp_path / "a") / "meta.json").read_text()
    for setting in ('"dense_lr"', '"cross_rank"', '"hint_weight"'):
        assert text.count(setting) == 1, setting


def test_format1_checkpoint_meta_reads_as_trainer_state():
    """meta.json of rocketrec before format 2 (counters and readers at the top level,
    configs twice) still reads: its state, its configs."""
    from rocketrec.checkpoint.meta import saved_config, saved_trainer_state

    old = {
        "step": 7, "phase_idx": 0, "phase_start": 0, "epoch_step": 7, "rows_seen": 1792,
        "rows_unused": 0, "world_size": 2, "readers": [{"epoch": 0}, {"epoch": 0}],
        "model_config": {"cross_rank": 4}, "loss_config": {"mode": "rocket"},
        "train_config": {"dense_lr": 0.01}, "run_config": {"data": {"spec": "x.yaml"}},
    }  # fmt: skip
    st = saved_trainer_state(old)
    assert st["world_size"] == 2 and st["progress"]["rows_seen"] == 1792 and st["rng"] is None
    assert saved_config(old, "model") == {"cross_rank": 4}
    assert saved_config(old, "data") == {"spec": "x.yaml"}


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny_spec, tiny_data, monkeypatch):
    import rocketrec.train.task as task

    real = task.rocket_loss
    n = {"calls": 0}

    def poisoned(*a, **k):
        total, terms = real(*a, **k)
        n["calls"] += 1
        if n["calls"] == 5:
            total = total * float("nan")
            terms["loss"] = float("nan")
        return total, terms

    monkeypatch.setattr(task, "rocket_loss", poisoned)
    tc = dataclasses.replace(TC, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match="step 4"):
        _run(tmp_path, tiny_spec, tiny_data, "nan", LossConfig(), tc)
    ck = latest_checkpoint(tmp_path / "nan")
    assert ck is not None and ck.name == "step_000000004"
    m, meta = load_unsharded(ck)
    assert all(torch.isfinite(v).all() for v in m.state_dict().values() if v.is_floating_point())


def test_perfect_teacher_trains_light_only_against_the_column(tmp_path, tiny_spec):
    from rocketrec.data.synth import SynthConfig, synth

    synth(
        tiny_spec,
        str(tmp_path / "d"),
        SynthConfig(rows=3000, seed=4, row_group_size=1000, true_ctr_column="p"),
    )
    tc = dataclasses.replace(TC, max_steps=6, teacher_column="p")
    out = tmp_path / "pt"
    train(
        tiny_spec,
        str(tmp_path / "d"),
        None,
        str(out),
        SMALL,
        LossConfig(mode="perfect_teacher"),
        tc,
    )
    m, _ = _final_model(out)
    init = _initial_model(tiny_spec, TC.seed)
    assert _same(m, init, "booster.") and not _same(m, init, "light.")
    with pytest.raises(ValueError, match="teacher"):
        train(
            tiny_spec,
            str(tmp_path / "d"),
            None,
            str(tmp_path / "x"),
            SMALL,
            LossConfig(mode="perfect_teacher"),
            dataclasses.replace(TC, max_steps=2),
        )


def test_crash_while_writing_a_checkpoint_keeps_latest_good(
    tmp_path, tiny_spec, tiny_data, monkeypatch
):
    import torch.distributed.checkpoint as dcp

    import rocketrec.checkpoint.files as ck

    real = dcp.save
    calls = {"n": 0}

    def dying_save(state, checkpoint_id):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-written
            real(
                {"model": {k: v for k, v in list(state["model"].items())[:3]}},
                checkpoint_id=checkpoint_id,
            )
            raise OSError("disk vanished")
        return real(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(ck.dcp, "save", dying_save)
    with pytest.raises(OSError, match="disk vanished"):
        _run(
            tmp_path,
            tiny_spec,
            tiny_data,
            "crashy",
            None,
            dataclasses.replace(TC, checkpoint_every=3),
        )
    latest = latest_checkpoint(tmp_path / "crashy")
    assert latest is not None and latest.name == "step_000000003"
    m, meta = load_unsharded(latest)  # complete and loadable
    assert meta["step"] == 3
    monkeypatch.setattr(ck.dcp, "save", real)
    out, res = _run(
        tmp_path, tiny_spec, tiny_data, "crashy", None, TC, resume=str(tmp_path / "crashy")
    )
    assert res["steps"] == 31  # 8000 rows / 256 per step, short last batch dropped


def test_light_private_tables_keep_the_booster_identical(tmp_path, tiny_spec, tiny_data):
    """Light-only embedding part + shared-grad scale 0: the light tower still learns its own
    embeddings while the booster and shared tables train exactly as booster_only."""
    priv = dataclasses.replace(SMALL, light_private_dim=4)
    tc = dataclasses.replace(TC, max_steps=10)
    bo = tmp_path / "bo"
    train(tiny_spec, tiny_data["train"], None, str(bo), priv, LossConfig(mode="booster_only"), tc)
    rp = tmp_path / "rp"
    train(
        tiny_spec,
        tiny_data["train"],
        None,
        str(rp),
        priv,
        LossConfig(light_shared_grad_scale=0.0),
        tc,
    )
    m_bo, _ = _final_model(bo)
    m_rp, _ = _final_model(rp)
    assert _same(m_rp, m_bo, "booster.") and _same(m_rp, m_bo, "ebc.")
    assert not _same(m_rp, m_bo, "light_ebc.") and not _same(m_rp, m_bo, "light.")
    # by autograd: light losses reach the private tables, not the shared ones
    torch.manual_seed(0)
    m = RocketModel(tiny_spec, priv)
    b = next(iter(ParquetReader(tiny_data["train"], tiny_spec, 128, shuffle=False)))
    out = m(b.dense, b.sparse, light_shared_grad_scale=0.0)
    all_tables = [(n, p) for n, p in m.named_parameters() if "ebc." in n]
    g_shared = _grads(bce(out.light, b.labels, None), all_tables)
    assert all(torch.count_nonzero(g) == 0 for n, g in g_shared.items() if n.startswith("ebc."))
    assert any(
        torch.count_nonzero(g) > 0 for n, g in g_shared.items() if n.startswith("light_ebc.")
    )


def test_private_tables_do_not_change_the_booster_init(tiny_spec):
    torch.manual_seed(3)
    a = RocketModel(tiny_spec, SMALL)
    torch.manual_seed(3)
    b = RocketModel(tiny_spec, dataclasses.replace(SMALL, light_private_dim=4))
    assert _same(a, b, "booster.") and _same(a, b, "ebc.")


def test_pipeline_step_path_matches_plain_loop(tmp_path, tiny_spec, tiny_data):
    """TorchRec's TrainPipelineSparseDist (the default step path, the CUDA one too) gives
    the same losses and weights as the plain forward/backward/step loop on CPU."""
    import json

    from rocketrec.train.loop import train
    from rocketrec.train.train_config import TrainConfig

    cfg = small_model()
    logs = {}
    for path in ("pipeline", "plain"):
        out = tmp_path / path
        train(
            tiny_spec,
            tiny_data["train"],
            None,
            str(out),
            cfg,
            None,
            TrainConfig(batch_size=128, max_steps=12, log_every=1, step_path=path, seed=3),
        )
        logs[path] = [
            json.loads(x)["train_loss"]
            for x in (out / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in x
        ]
        logs[path + "_model"] = load_unsharded(latest_checkpoint(out))[0].state_dict()
    assert len(logs["pipeline"]) == 12
    assert logs["pipeline"] == pytest.approx(logs["plain"], abs=1e-6)
    assert logs["pipeline"][0] != logs["pipeline"][-1]
    for k, v in logs["pipeline_model"].items():
        assert torch.allclose(v, logs["plain_model"][k], atol=1e-6), k


def test_saving_the_same_step_twice_never_leaves_latest_dangling(tmp_path, monkeypatch):
    """The final save can repeat the last periodic step: a crash at any point of the
    second save leaves `latest` naming a complete checkpoint."""
    import os as _os

    from rocketrec.checkpoint.files import read_meta, save_checkpoint

    state = {"model": {"w": torch.arange(6.0)}}
    first = save_checkpoint(tmp_path, 300, state, {}, {"step": 300, "n": 1}, keep=1)
    assert latest_checkpoint(tmp_path) == first

    def crash(*a, **k):
        raise OSError("killed")

    real_replace = _os.replace
    monkeypatch.setattr(_os, "replace", crash)  # dies when publishing the second save
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 300, state, {}, {"step": 300, "n": 2}, keep=1)
    monkeypatch.setattr(_os, "replace", real_replace)
    ck = latest_checkpoint(tmp_path)
    assert ck == first and read_meta(ck)["n"] == 1  # intact and loadable
    second = save_checkpoint(tmp_path, 300, state, {}, {"step": 300, "n": 3}, keep=1)
    assert second != first and latest_checkpoint(tmp_path) == second
    assert read_meta(second)["n"] == 3 and not first.exists()  # old one cleaned up after


def test_resume_refuses_changed_settings_in_one_line(tmp_path, tiny_spec_path, tiny_data, capsys):
    from rocketrec.cli import main

    out = tmp_path / "run"
    base = [
        "train",
        "--spec",
        str(tiny_spec_path),
        "--train",
        tiny_data["train"],
        "--out",
        str(out),
        "--max-steps",
        "3",
        "--log-every",
        "0",
        "--batch-size",
        "128",
        "--booster-mlp",
        "16",
        "--light-mlp",
        "8",
        "--cross-layers",
        "1",
    ]
    assert main(base) == 0
    capsys.readouterr()
    grown = tmp_path / "grown.yaml"
    grown.write_text(tiny_spec_path.read_text().replace("rows: 500", "rows: 700"))
    cases = [
        (["--hint", "mimic"], "loss setting 'hint' was 'kd' in the run, now 'mimic'"),
        (["--light-mlp", "16"], "model setting 'light_mlp[0]' was 8 in the run, now 16"),
        (["--seed", "9"], "train setting 'seed' was 0"),
    ]
    for extra, needle in cases:
        assert main(base + ["--max-steps", "6", "--resume", str(out)] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    spec_i = base.index(str(tiny_spec_path))
    changed = base[:spec_i] + [str(grown)] + base[spec_i + 1 :]
    assert main(changed + ["--max-steps", "6", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "spec setting 'tables[0].rows' was 500 in the run, now 700" in err
    # budget fields may change
    assert main(base + ["--max-steps", "6", "--eval-every", "2", "--resume", str(out)]) == 0


def test_warm_start_from_a_run_with_a_changed_spec(tmp_path, tiny_spec, tiny_spec_path, tiny_data):
    """ads teams' daily run: yesterday's weights, a bigger table and a new feature today."""
    import dataclasses as dc

    from rocketrec.checkpoint.warm_start import WarmStartError
    from rocketrec.model.init import full_table_init
    from rocketrec.spec import load_spec
    from rocketrec.train.loop import train
    from rocketrec.train.train_config import TrainConfig
    from rocketrec.train.trainer import Trainer

    cfg = small_model()
    old_run = tmp_path / "yesterday"
    train(
        tiny_spec,
        tiny_data["train"],
        None,
        str(old_run),
        cfg,
        None,
        TrainConfig(batch_size=128, max_steps=20, log_every=0, seed=1),
    )
    old, _ = load_unsharded(latest_checkpoint(old_run))
    old_sd = old.state_dict()
    grown = tmp_path / "today.yaml"
    grown.write_text(
        tiny_spec_path.read_text()
        .replace("{name: t_user, rows: 500, dim: 8}", "{name: t_user, rows: 700, dim: 8}")
        .replace(
            "  - {name: t_ctx, rows: 50, dim: 4}",
            "  - {name: t_ctx, rows: 50, dim: 4}\n  - {name: t_new, rows: 40, dim: 4}",
        )
        .replace(
            "  - {name: ctx, column: ctx, dtype: int64, table: t_ctx}",
            "  - {name: ctx, column: ctx, dtype: int64, table: t_ctx}\n"
            "  - {name: ctx2, column: ctx, dtype: int64, table: t_new}",
        )
    )
    spec2 = load_spec(grown)
    tc = TrainConfig(batch_size=128, max_steps=5, log_every=0, seed=4, init_from=str(old_run))
    run = Trainer(spec2, cfg, LossConfig(), tc, str(tmp_path / "today"), tiny_data["train"])
    run.warm_start(str(old_run))
    sd = run.dmp.state_dict()

    def full(key):
        v = sd[key]
        if not hasattr(v, "local_shards"):
            return v.detach().clone()
        out = torch.zeros(v.size())
        for s in v.local_shards():
            (r0, c0), (n, c) = s.metadata.shard_offsets, s.metadata.shard_sizes
            out[r0 : r0 + n, c0 : c0 + c] = s.tensor
        return out

    user = full("ebc.embedding_bags.t_user.weight")
    assert torch.equal(user[:500], old_sd["ebc.embedding_bags.t_user.weight"])  # old rows kept
    assert torch.equal(user[500:], full_table_init(4, "t_user", 700, 8)[500:])  # new rows fresh
    assert torch.equal(
        full("ebc.embedding_bags.t_ad.weight"), old_sd["ebc.embedding_bags.t_ad.weight"]
    )
    assert torch.equal(full("ebc.embedding_bags.t_new.weight"), full_table_init(4, "t_new", 40, 4))
    # the light tower reads the same features: copied; the booster's input grew: fresh first layer
    for k, v in run.model.light.state_dict().items():
        assert torch.equal(v, old_sd[f"light.{k}"]), k
    first = next(k for k in run.model.booster.state_dict() if k.endswith("weight"))
    assert run.model.booster.state_dict()[first].shape != old_sd[f"booster.{first}"].shape
    run.env.close()  # the process group this Trainer created
    # through train(): it runs and writes its own checkpoints
    res = train(spec2, tiny_data["train"], None, str(tmp_path / "today2"), cfg, None, tc)
    assert res["steps"] == 5
    # a shrunk table is refused unless allowed
    shrunk = load_spec_text(tmp_path, tiny_spec_path.read_text().replace("rows: 500", "rows: 300"))
    with pytest.raises(WarmStartError, match="t_user.*500.*300.*allow-shrink"):
        train(shrunk, tiny_data["train"], None, str(tmp_path / "s1"), cfg, None, tc)
    ok = train(
        shrunk,
        tiny_data["train"],
        None,
        str(tmp_path / "s2"),
        cfg,
        None,
        dc.replace(tc, init_from_allow_shrink=True),
    )
    assert ok["steps"] == 5


def load_spec_text(tmp_path, text):
    from rocketrec.spec import load_spec

    p = tmp_path / "s.yaml"
    p.write_text(text)
    return load_spec(p)


def test_each_loss_term_equals_its_formula():
    """Every term by value on fixed inputs (deleting kd's T^2, or the weights, fails here)."""
    import math

    z_b = torch.tensor([2.0, -1.0, 0.5, -3.0])
    z_l = torch.tensor([1.0, -2.0, 0.0, -0.5])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    w = torch.tensor([1.0, 2.0, 0.5, 1.5])

    def sig(x):
        return 1 / (1 + math.exp(-x))

    def wmean(xs, ws):
        return sum(a * b for a, b in zip(xs, ws)) / sum(ws)

    def bce_ref(z, t):
        return -(t * math.log(sig(z)) + (1 - t) * math.log(1 - sig(z)))

    ws = w.tolist()
    bce_b = wmean([bce_ref(a, t) for a, t in zip(z_b.tolist(), y.tolist())], ws)
    bce_l = wmean([bce_ref(a, t) for a, t in zip(z_l.tolist(), y.tolist())], ws)
    T = 3.0
    hints = {
        "mimic": wmean([(a - b) ** 2 for a, b in zip(z_l.tolist(), z_b.tolist())], ws),
        "mse_prob": wmean([(sig(a) - sig(b)) ** 2 for a, b in zip(z_l.tolist(), z_b.tolist())], ws),
        "kd": T
        * T
        * wmean([bce_ref(a / T, sig(b / T)) for a, b in zip(z_l.tolist(), z_b.tolist())], ws),
    }
    for hint, ref in hints.items():
        lam = 0.7
        cfg = LossConfig(hint=hint, hint_weight=lam, temperature=T)
        loss, terms = rocket_loss(z_b, z_l, y, w, cfg)
        assert terms["bce_booster"] == pytest.approx(bce_b, abs=1e-6)
        assert terms["bce_light"] == pytest.approx(bce_l, abs=1e-6)
        assert terms["hint"] == pytest.approx(ref, abs=1e-6), hint
        assert float(loss) == pytest.approx(bce_b + bce_l + lam * ref, abs=1e-5)
    # the global weight normaliser (W workers): the denominator is replaced, nothing else
    loss_n, terms_n = rocket_loss(z_b, z_l, y, w, LossConfig(), w_norm=torch.tensor(10.0))
    assert terms_n["bce_booster"] == pytest.approx(bce_b * float(w.sum()) / 10.0, abs=1e-6)


def test_padding_rows_weigh_nothing(tmp_path, tiny_spec, tiny_data):
    """--follow pads each partition's short last batch: a batch whose n_real is k gives
    the loss (every term) and row count of its first k rows alone, whatever the rest."""
    from rocketrec.train.trainer import Trainer

    tc = dataclasses.replace(TC, max_steps=1, eval_every=0, checkpoint_every=0)
    t = Trainer(tiny_spec, SMALL, LossConfig(), tc, tmp_path / "a", tiny_data["train"])
    task = t.task(t.phases[0])
    first = next(iter(ParquetReader(tiny_data["train"], tiny_spec, 10, shuffle=False)))
    padded = next(iter(ParquetReader(tiny_data["train"], tiny_spec, 64, shuffle=False)))
    padded.n_real = 10  # rows 10..63 are other real rows: they must not count
    with torch.no_grad():
        loss1, (terms1, n1) = task(first)
        loss2, (terms2, n2) = task(padded)
        full, _ = task(next(iter(ParquetReader(tiny_data["train"], tiny_spec, 64, shuffle=False))))
    assert n1 == n2 == 10
    assert abs(float(loss1) - float(loss2)) < 1e-5, (float(loss1), float(loss2))
    assert abs(float(full) - float(loss2)) > 1e-4  # the padding rows would change it
    for k in terms1:
        assert abs(float(terms1[k]) - float(terms2[k])) < 1e-5, k


def test_last_step_on_the_periodic_schedule_is_evaluated_and_saved_once(
    tmp_path, tiny_spec, tiny_data
):
    """max_steps a multiple of eval_every and checkpoint_every: the run's end reuses the
    periodic evaluation and checkpoint of that step (it wrote a second evaluation and a
    second checkpoint, step_N-1, before)."""
    tc = dataclasses.replace(TC, max_steps=6, eval_every=3, checkpoint_every=3, keep_checkpoints=5)
    out, res = _run(tmp_path, tiny_spec, tiny_data, "r", LossConfig(), tc)
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_000000003", "step_000000006"], names
    log = (out / "train.log").read_text()
    assert log.count("eval step 6:") == 1 and log.count("eval step 3:") == 1, log
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in recs if "train_seconds" in r]
    assert len(final) == 1 and final[0]["step"] == 6 and final[0]["light_auc"] == res["light_auc"]
    _, meta = _final_model(out)
    assert meta["step"] == 6
