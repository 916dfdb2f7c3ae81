"""Run config files: sections, unknown keys, flags override, resolved config, reruns."""

from __future__ import annotations

import json

import yaml

from rocketrec.cli import main

SMALL = ["--booster-mlp", "16", "--light-mlp", "8", "--cross-layers", "1", "--log-every", "0"]


def _write(tmp_path, body: dict, name="run.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(body))
    return p


def test_config_file_flags_override_and_resolved_config_reruns(
    tmp_path, tiny_spec_path, tiny_data, capsys
):
    out = tmp_path / "run"
    cfg = _write(
        tmp_path,
        {
            "data": {"spec": str(tiny_spec_path), "train": [tiny_data["train"]], "out": str(out)},
            "loss": {"hint": "mimic", "hint_weight": 0.5, "gradient_block": True},
            "model": {"booster_mlp": [16], "light_mlp": [8], "cross_layers": 1},
            "train": {"batch_size": 128, "max_steps": 4, "log_every": 0, "seed": 3},
            "ray": {"workers": 2},  # for jobs/ads_train.py; `rocketrec train` skips it
        },
    )
    # a flag overrides the file
    assert main(["train", "--config", str(cfg), "--max-steps", "5"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps"] == 5
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["loss"]["hint"] == "mimic" and resolved["train"]["max_steps"] == 5
    assert resolved["model"]["booster_mlp"] == [16]
    assert resolved["run"]["command"][-2:] == ["--max-steps", "5"]
    assert "rocketrec" in resolved["run"]
    from rocketrec.checkpoint.files import latest_checkpoint, read_meta

    assert read_meta(latest_checkpoint(out))["config"]["loss"]["hint"] == "mimic"
    # the same --out again without --resume: refused
    assert main(["train", "--config", str(cfg)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # rerun from the resolved config: the same run, step for step
    out2 = tmp_path / "rerun"
    assert main(["train", "--config", str(out / "config.yaml"), "--out", str(out2)]) == 0
    res2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res2["steps"] == 5 and res2["rows_seen"] == res["rows_seen"]
    a = (out / "metrics.jsonl").read_text().splitlines()[-1]
    b = (out2 / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(a)["train_seconds"] > 0 and json.loads(b)["steps"] == 5
    # --resume reloads the run's own config: no need to repeat its settings
    assert main(["train", "--resume", str(out), "--max-steps", "7"]) == 0
    res3 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res3["steps"] == 7
    # ... and a changed objective is still refused, naming both values
    assert main(["train", "--resume", str(out), "--max-steps", "9", "--hint", "kd"]) == 2
    assert "'hint' was 'mimic' in the run, now 'kd'" in capsys.readouterr().err


def test_config_errors_name_file_and_key(tmp_path, tiny_spec_path, capsys):
    cases = [
        ({"trian": {"batch_size": 3}}, "unknown section 'trian' (did you mean 'train'?)"),
        (
            {"train": {"batch_sise": 3}},
            "train: unknown key 'batch_sise' (did you mean 'batch_size'?)",
        ),
        ({"loss": {"hint": "nope"}}, "loss.hint: 'nope' is not one of"),
        ({"train": {"batch_size": "many"}}, "train.batch_size"),
        ({"model": {"booster_mlp": ["a"]}}, "model.booster_mlp"),
        ({"train": 5}, "section 'train' must be a mapping"),
    ]
    for body, needle in cases:
        p = _write(tmp_path, body, "bad.yaml")
        assert main(["train", "--config", str(p), "--spec", str(tiny_spec_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "bad.yaml" in err and len(err.splitlines()) == 1, err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_shipped_configs_parse():
    from conftest import ROOT
    from rocketrec.run.config_file import load_config

    for f in sorted((ROOT / "jobs" / "configs").glob("*.yaml")):
        values = load_config(str(f))
        assert values["spec"].endswith(".yaml"), f


def test_a_run_reruns_after_its_working_directory_is_gone(
    tmp_path, tiny_spec_path, tiny_data, monkeypatch, capsys
):
    """RUN/config.yaml holds paths as given (relative to where the command ran, as a Ray
    job's temporary working-directory copy would have them) and RUN/spec.yaml the spec's
    text: `--config RUN/config.yaml` reruns after that directory is gone."""
    import shutil

    work = tmp_path / "work"  # stands for a Ray working-directory copy
    work.mkdir()
    shutil.copy(tiny_spec_path, work / "tiny.yaml")
    out = tmp_path / "run"
    monkeypatch.chdir(work)
    args = ["train", "--spec", "tiny.yaml", "--train", tiny_data["train"], "--out", str(out)]
    assert main([*args, *SMALL, "--max-steps", "2", "--batch-size", "128", "--no-export"]) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["data"]["spec"] == "tiny.yaml"  # not the copy's absolute path
    assert resolved["data"]["train"] == [tiny_data["train"]] and resolved["data"]["out"] == str(out)
    assert (out / "spec.yaml").read_text() == tiny_spec_path.read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    shutil.rmtree(work)
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "config.yaml"), "--out", str(again)]) == 0
    err = capsys.readouterr().err
    assert "tiny.yaml: not found; using the run's copy of its spec" in err, err
    assert json.loads((again / "summary.json").read_text())["metrics"]["steps"] == 2
