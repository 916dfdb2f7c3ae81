"""Tables born sharded: no process holds a full row-wise table; init is plan-independent;
checkpoints are written in bounded blocks; export streams only the light tower's tables."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_dist import _run_two_ranks

from conftest import small_model

BIG_ROWS, BIG_DIM, BLOCK = 200_000, 8, 30_000
SCALE_SPEC = f"""
version: 1
name: scale
label: {{column: y}}
tables:
  - {{name: big, rows: {BIG_ROWS}, dim: {BIG_DIM}}}
  - {{name: booster_big, rows: 50000, dim: 4}}
  - {{name: small, rows: 100, dim: 4, pooling: mean}}
sparse:
  - {{name: user, column: user, dtype: int64, table: big}}
  - {{name: tags, column: tags, dtype: string, kind: list, table: small}}
  - {{name: ctx, column: ctx, dtype: int64, table: booster_big}}
dense:
  - {{name: price, column: price, fill: 1.0, transform: log1p}}
light:
  features: [user, tags, price]
"""


@pytest.fixture(scope="module")
def scale_setup(tmp_path_factory):
    from rocketrec.data.synth import SynthConfig, synth
    from rocketrec.spec import load_spec

    root = tmp_path_factory.mktemp("scale")
    spec_path = root / "scale.yaml"
    spec_path.write_text(SCALE_SPEC)
    spec = load_spec(spec_path)
    synth(spec, str(root / "train"), SynthConfig(rows=8192, seed=4, files=2, row_group_size=1024))
    return spec, spec_path, str(root / "train"), root


def test_init_is_a_pure_function_of_seed_table_row():
    from rocketrec.model.init import INIT_BLOCK_ROWS, full_table_init, init_bound, init_rows

    rows, dim = 3 * INIT_BLOCK_ROWS + 123, 8
    full = full_table_init(5, "users", rows, dim)
    a = init_bound(rows)
    assert float(full.abs().max()) <= a and float(full.std()) > 0.5 * a / 3**0.5
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # any shard (row range x column range) draws exactly its slice
        r0 = int(torch.randint(0, rows - 1, (1,), generator=g))
        n = int(torch.randint(1, rows - r0 + 1, (1,), generator=g))
        c0 = int(torch.randint(0, dim, (1,), generator=g))
        nc = int(torch.randint(1, dim - c0 + 1, (1,), generator=g))
        got = torch.empty(n, nc)
        for off, v in init_rows(5, "users", rows, dim, r0, n, c0, nc):
            got[off : off + v.shape[0]] = v
        assert torch.equal(got, full[r0 : r0 + n, c0 : c0 + nc])
    # different seed or table: different values
    assert not torch.equal(
        full_table_init(6, "users", 100, dim), full_table_init(5, "users", 100, dim)
    )
    assert not torch.equal(
        full_table_init(5, "ads", 100, dim), full_table_init(5, "users", 100, dim)
    )


def test_row_wise_run_never_holds_a_full_table(tmp_path, scale_setup):
    spec, spec_path, data, _ = scale_setup
    out = tmp_path / "run"
    full = BIG_ROWS * BIG_DIM
    os.environ["ROCKETREC_CKPT_BLOCK_ROWS"] = str(BLOCK)
    try:
        reports = [tmp_path / f"r{r}.json" for r in range(2)]
        _run_two_ranks(
            "dist_scale.py",
            lambda r: [str(r), str(spec_path), data, str(out), str(reports[r]), "6"],
        )
        first = [json.loads(p.read_text()) for p in reports]
        # resume the 2-rank run with 2 ranks: DCP reads blocks, never a whole table
        _run_two_ranks(
            "dist_scale.py",
            lambda r: [str(r), str(spec_path), data, str(out), str(reports[r]), "9", "resume"],
        )
        second = [json.loads(p.read_text()) for p in reports]
    finally:
        del os.environ["ROCKETREC_CKPT_BLOCK_ROWS"]
    for rep in first + second:
        assert rep["local_table_numel"]["ebc.embedding_bags.big.weight"] == full // 2, rep
        # the largest tensor any op made in setup, training, checkpoint, resume: under a table
        assert rep["max_op_numel"] < full, rep
        assert rep["max_optimizer_state_numel"] <= BIG_ROWS // 2, rep
    # the checkpoint holds the big table in blocks of at most BLOCK rows, written once
    from rocketrec.checkpoint.files import latest_checkpoint, read_meta
    from rocketrec.checkpoint.tables import CheckpointTables

    ck = latest_checkpoint(out)
    assert read_meta(ck)["step"] == 9
    ct = CheckpointTables(ck)
    chunks = ct.md.state_dict_metadata["model.ebc.embedding_bags.big.weight"].chunks
    assert len(chunks) >= BIG_ROWS // BLOCK and max(c.sizes[0] for c in chunks) <= BLOCK
    assert sum(c.sizes[0] * c.sizes[1] for c in chunks) == full


def test_equal_initial_weights_one_vs_two_workers(tmp_path, scale_setup):
    """The table values a 1-worker run starts from equal the 2-worker row-wise start."""
    from rocketrec.model.init import full_table_init

    spec, spec_path, data, _ = scale_setup
    out = tmp_path / "run"
    reports = [tmp_path / f"r{r}.json" for r in range(2)]
    os.environ["ROCKETREC_CKPT_BLOCK_ROWS"] = str(BLOCK)
    try:
        _run_two_ranks(
            "dist_scale.py",
            lambda r: [str(r), str(spec_path), data, str(out), str(reports[r]), "init"],
        )
    finally:
        del os.environ["ROCKETREC_CKPT_BLOCK_ROWS"]
    from rocketrec.checkpoint.files import latest_checkpoint
    from rocketrec.checkpoint.tables import CheckpointTables

    ct = CheckpointTables(latest_checkpoint(out))
    for t in spec.tables:
        got = ct.full(f"model.ebc.embedding_bags.{t.name}.weight")
        assert torch.equal(got, full_table_init(3, t.name, t.rows, t.dim)), t.name


def test_export_streams_only_light_tables(tmp_path, scale_setup, monkeypatch):
    from rocketrec.checkpoint.tables import CheckpointTables
    from rocketrec.serving.export import export_checkpoint
    from rocketrec.train.loop import train
    from rocketrec.train.train_config import TrainConfig

    spec, _, data, _ = scale_setup
    out = tmp_path / "run"
    monkeypatch.setenv("ROCKETREC_CKPT_BLOCK_ROWS", str(BLOCK))
    cfg = small_model()
    train(
        spec, data, None, str(out), cfg, None, TrainConfig(batch_size=256, max_steps=8, log_every=0)
    )
    read: list[str] = []
    real = CheckpointTables.row_blocks

    def spy(self, fqn):
        read.append(fqn)
        return real(self, fqn)

    monkeypatch.setattr(CheckpointTables, "row_blocks", spy)
    for int8 in (False, True):
        read.clear()
        rep = export_checkpoint(out, tmp_path / f"light{int8}.pt", int8=int8, data=data)
        assert rep["max_abs_diff"] <= rep["tolerance"]
        # the light tower reads big and small; booster_big is never read
        assert sorted(read) == [
            "model.ebc.embedding_bags.big.weight",
            "model.ebc.embedding_bags.small.weight",
        ]


def test_plan_dry_run_and_refusal_before_training(tmp_path, tiny_spec_path, tiny_data, capsys):
    from rocketrec.cli import main

    assert main(["plan", str(tiny_spec_path), "--workers", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    covered = {}
    for t in plan["tables"]:
        covered[t["table"]] = sum(sz[0] * sz[1] for _, _, sz in t["shards"])
        assert covered[t["table"]] == t["rows"] * t["dim"]  # every row and column placed once
    assert set(covered) == {"t_user", "t_ad", "t_tag", "t_ctx"}
    assert len(plan["per_rank"]) == 2
    assert (
        main(["plan", str(tiny_spec_path), "--workers", "4", "--sharding", "t_user=row_wise"]) == 0
    )
    out = capsys.readouterr().out
    assert "t_user" in out and "row_wise" in out and "fits" in out
    # a spec far bigger than the workers' memory: refused by the planner, in one line
    huge = tmp_path / "huge.yaml"
    huge.write_text(
        tiny_spec_path.read_text().replace(
            "{name: t_user, rows: 500, dim: 8}", "{name: t_user, rows: 4000000000, dim: 64}"
        )
    )
    assert main(["plan", str(huge), "--workers", "2", "--memory-per-worker", "16"]) == 2
    err = capsys.readouterr().err
    assert "do not fit 2 worker(s)" in err and len(err.strip().splitlines()) == 1
    assert main(["plan", str(huge), "--workers", "2", "--device", "cuda"]) == 2
    # training uses the same planner, capped at this machine's memory: it stops before
    # allocating anything, with the same one-line error
    rc = main(
        ["train", "--spec", str(huge), "--train", tiny_data["train"], "--out", str(tmp_path / "r")]
        + ["--max-steps", "2", "--log-every", "0"]
    )
    assert rc == 2
    assert "do not fit 1 worker(s)" in capsys.readouterr().err
