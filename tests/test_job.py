"""One job config: defaults < YAML < flags, validated before anything starts, serialized
once; both entry points leave the same run directory."""

from __future__ import annotations

import json

import pytest
import yaml

from rocketrec.cli import main

SMALL = ["--booster-mlp", "16", "--light-mlp", "8", "--cross-layers", "1", "--log-every", "0"]


def _parse(argv, ray):
    import argparse

    from rocketrec.run.flags import add_ray_args, add_train_args, parse_job

    p = argparse.ArgumentParser()
    add_train_args(p)
    if ray:
        add_ray_args(p)
    return parse_job(p, argv, ray=ray)


def test_job_config_precedence_and_round_trip(tmp_path, tiny_spec_path, tiny_data):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data": {"spec": str(tiny_spec_path), "train": [tiny_data["train"]]},
                "train": {
                    "batch_size": 64,
                    "seed": 7,
                    "sharding": {"t_user": {"sharding_type": "row_wise"}},
                },
                "model": {"light_mlp": [4]},
                "ray": {"workers": 3, "no_export": True},  # an older file: key read where it moved
            }
        )
    )
    job = _parse(["--config", str(cfg), "--out", str(tmp_path / "o"), "--seed", "9"], ray=True)
    assert job.train.batch_size == 64  # YAML over the default
    assert job.train.seed == 9  # the flag over YAML
    assert job.train.dense_lr == 1e-3  # the default
    assert job.model.light_mlp == (4,) and job.ray.workers == 3 and job.data.no_export
    assert job.data.out == str((tmp_path / "o").resolve())  # paths absolute for workers
    again = type(job).from_dict(json.loads(json.dumps(job.to_dict())))
    assert again == job  # what workers and RUN/config.yaml receive is the whole job
    one = _parse(["--config", str(cfg), "--out", str(tmp_path / "o")], ray=False)
    assert one.ray is None and one.workers == 1 and "ray" not in one.to_dict()
    with pytest.raises(ValueError, match="perfect_teacher needs --teacher-column"):
        _parse(["--config", str(cfg), "--out", "x", "--mode", "perfect_teacher"], ray=False)


@pytest.mark.parametrize(
    "sharding, needle",
    [
        ({"t_usr": {"sharding_type": "row_wise"}}, "unknown table 't_usr'"),
        ({"t_user": {"sharding_type": "diagonal"}}, "sharding_type must be one of"),
        ({"t_user": "row_wise"}, "must map to {sharding_type: ...}"),
    ],
)
def test_sharding_from_yaml_checked_before_anything_starts(
    tmp_path, tiny_spec_path, tiny_data, capsys, sharding, needle
):
    """A sharding mapping in YAML is checked against the spec before any worker starts,
    by both entry points, in one line; nothing is written."""
    from rocketrec.run.ray_driver import main as ray_main

    cfg = tmp_path / "bad.yaml"
    out = tmp_path / "run"
    cfg.write_text(yaml.safe_dump({"train": {"sharding": sharding}}))
    base = ["--config", str(cfg), "--spec", str(tiny_spec_path), "--train", tiny_data["train"]]
    assert main(["train", *base, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert ray_main([*base, "--out", str(out)]) == 2  # before Ray starts
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_rocketrec_train_leaves_the_jobs_run_directory(tmp_path, tiny_spec_path, tiny_data, capsys):
    """`rocketrec train` writes what jobs/ads_train.py writes: summary.json, curves.png,
    light.pt (unless --no-export), config.yaml once."""
    out = tmp_path / "run"
    base = ["train", "--spec", str(tiny_spec_path), "--train", tiny_data["train"]]
    base += ["--val", tiny_data["val"], "--batch-size", "128", "--max-steps", "4", *SMALL]
    assert main([*base, "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["steps"] == res["steps"] == 4 and summary["workers"] == 1
    assert summary["export"]["max_abs_diff"] <= 1e-5
    for f in ("curves.png", "light.pt", "config.yaml", "metrics.jsonl", "train.log"):
        assert (out / f).is_file(), f
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["no_export"] is False
    out2 = tmp_path / "noexport"
    assert main([*base, "--out", str(out2), "--no-export"]) == 0
    assert (out2 / "summary.json").is_file() and not (out2 / "light.pt").exists()


def test_only_user_errors_are_one_line_errors(tmp_path, tiny_spec_path, tiny_data, monkeypatch):
    """The CLI and the Ray driver catch exactly UserError (rocketrec.errors): a bug inside
    the library that raises a plain ValueError is a traceback with exit 1, not a one-line
    'error' with exit 2; the same spot raising a SpecError is one line, exit 2."""
    import subprocess
    import sys

    plant = (
        "import sys, rocketrec.spec.parse as p\n"
        "def boom(*a, **k):\n"
        "    raise {exc}('planted')\n"
        "p.spec_from_dict = boom\n"
        "from rocketrec.cli import main\n"
        f"sys.exit(main(['validate', {str(tiny_spec_path)!r}]))\n"
    )
    bug = subprocess.run(
        [
            sys.executable,
            "-c",
            "from rocketrec.spec import SpecError\n" + plant.format(exc="ValueError"),
        ],
        capture_output=True,
        text=True,
    )
    assert bug.returncode == 1 and "Traceback" in bug.stderr, bug.stderr[-2000:]
    assert "ValueError: planted" in bug.stderr and "rocketrec: error" not in bug.stderr
    user = subprocess.run(
        [
            sys.executable,
            "-c",
            "from rocketrec.spec import SpecError\n" + plant.format(exc="SpecError"),
        ],
        capture_output=True,
        text=True,
    )
    assert user.returncode == 2 and user.stderr.strip() == "rocketrec: error: planted", user.stderr
    # the Ray driver: the same rule before Ray starts (prepare_run runs every check)
    import rocketrec.run.prepare
    from rocketrec.run.ray_driver import main as ray_main

    def boom(job):
        raise ValueError("planted in prepare_run")

    monkeypatch.setattr(rocketrec.run.prepare, "prepare_run", boom)
    args = [
        "--spec",
        str(tiny_spec_path),
        "--train",
        tiny_data["train"],
        "--out",
        str(tmp_path / "r"),
    ]
    with pytest.raises(ValueError, match="planted in prepare_run"):
        ray_main(args)
