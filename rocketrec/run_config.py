"""Run config files: `--config run.yaml` with sections; command-line flags override.

    data:  {spec: ..., train: [...], val: [...], out: ...}
    loss:  {mode: rocket, hint: kd, hint_weight: 1.0, ...}
    model: {booster_mlp: [256, 128, 64], ...}
    train: {batch_size: 1024, epochs: 1, ...}
    ray:   {workers: 2, ...}             # jobs/ads_train.py only

Every key is a flag's name with `_` (`--batch-size` is `train.batch_size`);
the sections are the flags' groups in `--help`. Unknown sections or keys are
errors naming the file and the key, with a "did you mean". Values go through
the same checks as flags (types, choices, the config dataclasses'
`__post_init__`). The resolved job config (rocketrec.train.job.JobConfig.to_dict(): every
flag's final value) is written once to RUN/config.yaml with the rocketrec
version, the git commit (when there is one) and the command line;
`--config RUN/config.yaml --out NEW` reruns it.
"""

from __future__ import annotations

import argparse
import difflib
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

SECTION_OF_GROUP = {
    "data": "data",
    "method (Rocket Launching)": "loss",
    "model": "model",
    "training": "train",
    "Ray": "ray",
}
MOVED = {("ray", "no_export"): "data"}  # (section, key) -> the key's section now
META_KEY = "run"  # written by rocketrec: version, git commit, command line (ignored on read)


class ConfigError(ValueError):
    pass


def _sections(p: argparse.ArgumentParser) -> dict[str, dict[str, argparse.Action]]:
    out: dict[str, dict[str, argparse.Action]] = {}
    for g in p._action_groups:  # argparse keeps the groups here (stable for years)
        sec = SECTION_OF_GROUP.get(g.title or "")
        if sec:
            out[sec] = {a.dest: a for a in g._group_actions}
    return out


def _convert(a: argparse.Action, value: Any, where: str) -> Any:
    """A YAML value -> what the flag would have produced."""
    if value is None:
        return None
    if a.nargs in ("+", "*") and not isinstance(value, list):
        value = [value]
    try:
        if isinstance(value, list) and a.nargs in ("+", "*"):
            vals = [a.type(str(v)) if a.type else v for v in value]  # type: ignore[operator]
            out: Any = vals
        elif isinstance(value, list):  # layer sizes written as a YAML list
            out = tuple(int(v) for v in value)
        elif isinstance(value, dict):
            out = value
        elif isinstance(value, bool) and a.type is not None and a.type is not bool:
            out = a.type("on" if value else "off")  # type: ignore[operator]
        elif isinstance(a, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
            out = value
        elif a.type is not None:
            out = a.type(str(value) if not isinstance(value, str) else value)  # type: ignore[operator]
        else:
            out = value if isinstance(value, str) else str(value)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
    if a.choices is not None:
        items = out if isinstance(out, list) else [out]
        bad = [v for v in items if v not in a.choices]
        if bad:
            raise ConfigError(f"{where}: {bad[0]!r} is not one of {', '.join(map(str, a.choices))}")
    return out


def load_config(path: str, p: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a run config into {dest: value}; errors name the file and the key."""
    f = Path(path)
    if not f.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(f.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    secs = _sections(p)
    out: dict[str, Any] = {}
    for sec, body in raw.items():
        if sec == META_KEY:
            continue
        if sec not in secs and sec in SECTION_OF_GROUP.values():
            continue  # e.g. `ray` for `rocketrec train`, which runs in this process
        if sec not in secs:
            hint = difflib.get_close_matches(str(sec), list(secs), n=1)
            more = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{path}: unknown section '{sec}'{more}; sections: {', '.join(secs)}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: section '{sec}' must be a mapping of keys")
        for key, value in body.items():
            if (sec, key) in MOVED:  # a key that moved to another section: still read
                sec_of_key = MOVED[(sec, key)]
                if sec_of_key in secs:
                    out[key] = _convert(secs[sec_of_key][key], value, f"{path}: {sec}.{key}")
                continue
            actions = secs[sec]
            if key not in actions:
                hint = difflib.get_close_matches(str(key), list(actions), n=1)
                more = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ConfigError(f"{path}: {sec}: unknown key '{key}'{more}")
            out[key] = _convert(actions[key], value, f"{path}: {sec}.{key}")
    return out


def apply_config(p: argparse.ArgumentParser, argv: list[str] | None) -> str | None:
    """`--config FILE` values become `p`'s defaults, which flags override. Without
    --config, `--resume RUN` reloads RUN/config.yaml the same way (the run's own
    settings; budget flags may still be given). Returns the file used, if any."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    path = known.config
    if path is None and known.resume:
        for cand in (Path(known.resume), *Path(known.resume).parents[:2]):
            if (cand / "config.yaml").is_file():
                path = str(cand / "config.yaml")
                break
    if path:
        values = load_config(path, p)
        values.pop("resume", None)
        p.set_defaults(**values)
        for a in p._actions:
            if a.dest in values and values[a.dest] is not None:
                a.required = False  # given by the config file
    return path


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="run config YAML (sections data, loss, model, train, ray; see jobs/configs/); "
        "flags given on the command line override it",
    )


def _git_commit() -> str | None:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_meta(argv: list[str] | None = None) -> dict[str, Any]:
    """Where a job came from: the rocketrec version, git commit and command line."""
    from rocketrec import __version__

    return {
        "rocketrec": __version__,
        "git_commit": _git_commit(),
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
    }


def write_resolved(path: Path, cfg: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        "# Resolved run config written by rocketrec: rerun with\n"
        "#   --config THIS_FILE --out NEW_RUN_DIR\n" + yaml.safe_dump(cfg, sort_keys=False)
    )
    tmp.replace(path)
