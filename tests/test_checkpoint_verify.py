"""Checkpoints verified: sizes and CRC-32 recorded when written; a damaged newest
checkpoint is skipped for the newest intact one (one warning line), none intact is one
error; user errors in `rocketrec train` (divergence, damaged checkpoints) exit 2 with one
line and the traceback in RUN/train.log."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import small_model
from rocketrec.checkpoint.files import CheckpointDamaged, latest_checkpoint, verify_checkpoint
from rocketrec.serving.export import export_checkpoint
from rocketrec.train.loop import train
from rocketrec.train.train_config import TrainConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_spec, tiny_data):
    out = tmp_path_factory.mktemp("ckv") / "run"
    train(
        tiny_spec,
        tiny_data["train"],
        None,
        str(out),
        small_model(),
        None,
        TrainConfig(batch_size=512, max_steps=6, checkpoint_every=3, log_every=0),
    )
    return out


def _copy(run, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _steps(run):
    return sorted(p for p in (run / "checkpoints").glob("step_*"))


def test_files_recorded_and_verified(run):
    ck = latest_checkpoint(run)
    assert ck is not None and verify_checkpoint(ck) is None
    listed = json.loads((ck / "files.json").read_text())["files"]
    assert any(n.endswith(".distcp") for n in listed) and "meta.json" in listed
    assert all(v["bytes"] == (ck / n).stat().st_size for n, v in listed.items())


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_newest_falls_back_to_intact(run, tmp_path, capsys, damage):
    r = _copy(run, tmp_path)
    older, newest = _steps(r)
    shard = sorted(newest.glob("*.distcp"))[0]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "flip":
        b = bytearray(shard.read_bytes())
        b[len(b) // 2] ^= 0xFF
        shard.write_bytes(bytes(b))
    else:
        shard.unlink()
    assert verify_checkpoint(newest) is not None
    got = latest_checkpoint(r)
    assert got == older
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged" in err[0] and newest.name in err[0] and shard.name in err[0]
    # export takes the intact one as well
    rep = export_checkpoint(r, tmp_path / "light.pt")
    assert rep["checkpoint"] == str(older)


def test_none_intact_is_one_error(run, tmp_path):
    r = _copy(run, tmp_path)
    for ck in _steps(r):
        (ck / "dense_optim.pt").write_bytes(b"x")
    with pytest.raises(CheckpointDamaged, match="no intact checkpoint") as e:
        latest_checkpoint(r)
    assert all(ck.name in str(e.value) for ck in _steps(r))


def test_resume_from_damaged_cli_exit_2(run, tmp_path, tiny_spec_path, tiny_data):
    r = _copy(run, tmp_path)
    for ck in _steps(r):
        shard = sorted(ck.glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[:10])
    cmd = [
        sys.executable, "-m", "rocketrec.cli", "train", "--spec", str(tiny_spec_path),
        "--train", tiny_data["train"], "--out", str(r), "--resume", str(r),
        "--batch-size", "512", "--max-steps", "9",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    err = [x for x in out.stderr.strip().splitlines() if x.startswith("rocketrec:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(err) == 1 and "no intact checkpoint" in err[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_divergence_cli_exit_2(tmp_path, tiny_spec_path, tiny_data):
    out_dir = tmp_path / "div"
    cmd = [
        sys.executable, "-m", "rocketrec.cli", "train", "--spec", str(tiny_spec_path),
        "--train", tiny_data["train"], "--out", str(out_dir), "--batch-size", "512",
        "--max-steps", "12", "--dense-lr", "1e12", "--sparse-lr", "1e12",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    err = [x for x in out.stderr.strip().splitlines() if x.startswith("rocketrec:")]
    assert len(err) == 1 and "diverged" in err[0].lower(), out.stderr[-2000:]
    assert "No checkpoint was written" in err[0], err[0]
    assert "Traceback" not in out.stderr
    assert "Traceback" in (out_dir / "train.log").read_text()


def test_divergence_after_a_checkpoint_names_it(tmp_path, tiny_spec_path, tiny_data):
    """A run that diverges after its last checkpoint says which one to resume from, and
    writes none after the bad step."""
    from rocketrec.checkpoint.files import latest_checkpoint

    out_dir = tmp_path / "run"
    base = [
        sys.executable, "-m", "rocketrec.cli", "train", "--spec", str(tiny_spec_path),
        "--train", tiny_data["train"], "--out", str(out_dir), "--batch-size", "512",
        "--no-export",
    ]  # fmt: skip
    ok = subprocess.run(base + ["--max-steps", "4"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    good = latest_checkpoint(out_dir)
    cmd = [
        sys.executable, "-m", "rocketrec.cli", "train", "--resume", str(out_dir),
        "--max-steps", "12", "--dense-lr", "1e12", "--sparse-lr", "1e12",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    err = [x for x in out.stderr.strip().splitlines() if x.startswith("rocketrec:")]
    assert len(err) == 1 and f"The last checkpoint ({good}) is intact" in err[0], err
    assert latest_checkpoint(out_dir) == good


def test_optimizer_state_of_another_shape_is_found(tmp_path, tiny_spec, tiny_data):
    """Row-wise optimizer state under column-wise sharding holds one value per row per
    column shard: resume compares each table's saved and live optimizer-state shapes and
    starts a reshaped table's state fresh (with a warning) instead of loading part of it."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    from conftest import train_small
    from rocketrec.checkpoint.files import latest_checkpoint
    from rocketrec.checkpoint.resume import stale_state_tables

    train_small(tiny_spec, tiny_data, tmp_path / "run", steps=3, val=False)
    ck = latest_checkpoint(tmp_path / "run")
    md = FileSystemReader(str(ck)).read_metadata().state_dict_metadata
    live: dict = {"state": {}}
    for key, m in md.items():
        if key.startswith("sparse_optim.state.") and ".embedding_bags." in key:
            param, state = key[len("sparse_optim.state.") :].rsplit(".", 2)[0], key.rsplit(".", 2)
            table = param.split(".embedding_bags.", 1)[1].split(".", 1)[0]
            shape = tuple(m.size)
            if table == "t_ad":  # as if now column-wise in two shards
                shape = (shape[0] * 2, *shape[1:])
            live["state"].setdefault(param, {})[f"{state[1]}.{state[2]}"] = torch.zeros(shape)
    assert "t_ad" in {k.split(".")[2] for k in live["state"]}, sorted(live["state"])
    assert stale_state_tables(ck, live) == ["t_ad"]
