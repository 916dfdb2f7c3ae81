"""Run config files: `--config run.yaml` with sections; command-line flags override.

    data:  {spec: ..., train: [...], val: [...], out: ...}
    loss:  {mode: rocket, hint: kd, hint_weight: 1.0, ...}
    model: {booster_mlp: [256, 128, 64], ...}
    train: {batch_size: 1024, epochs: 1, ...}
    ray:   {workers: 2, ...}             # jobs/ads_train.py only

Every key is a setting's name (`--batch-size` is `train.batch_size`), declared once
with its section's dataclass (rocketrec.settings, rocketrec.train.job.SECTIONS). Unknown sections or keys are
errors naming the file and the key, with a "did you mean". Values go through
the same checks as flags (types, choices, the config dataclasses'
`__post_init__`). The resolved job config (rocketrec.train.job.JobConfig.to_dict(): every
flag's final value) is written once to RUN/config.yaml with the rocketrec
version, the git commit (when there is one) and the command line;
`--config RUN/config.yaml --out NEW` reruns it.
"""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from rocketrec.errors import ConfigError

META_KEY = "run"  # written by rocketrec: version, git commit, command line (ignored on read)
IGNORED = {("train", "resume")}  # written to RUN/config.yaml, given by --resume only


def _convert(cls: type, f: Any, s: Any, value: Any, where: str) -> Any:
    """A YAML value -> the setting's value, as its flag would have produced it."""
    from rocketrec.settings import kind_of, on_off

    if value is None:
        return None
    kind, t = kind_of(cls, f)
    try:
        if s.switch:
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            out: Any = value
        elif isinstance(value, dict):  # a mapping (sharding): checked with the spec
            out = value
        elif s.parse is not None:
            text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
            out = s.parse(text)
        elif kind == "list":
            out = [t(v) for v in (value if isinstance(value, list) else [value])]
        elif t is bool:
            out = value if isinstance(value, bool) else on_off(str(value))
        elif isinstance(value, bool | dict | list):
            raise ValueError(f"expected a {t.__name__}, got {value!r}")
        else:
            out = t(value) if t is str else t(str(value))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
    if s.choices is not None and out not in s.choices:
        raise ConfigError(f"{where}: {out!r} is not one of {', '.join(map(str, s.choices))}")
    return out


def _read(path: str) -> dict[str, Any]:
    f = Path(path)
    if not f.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(f.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def load_config(path: str, sections: list[str] | None = None) -> dict[str, Any]:
    """Read a run config into {setting: value} for `sections` (default: all; a section
    of the file that this command does not take, e.g. `ray` for `rocketrec train`, is
    skipped). Errors name the file and the key, with a "did you mean"."""
    from rocketrec.settings import settings_of
    from rocketrec.train.job import SECTIONS

    raw = _read(path)
    taken = list(sections or SECTIONS)
    decl = {sec: {f.name: (f, s) for f, s in settings_of(SECTIONS[sec])} for sec in SECTIONS}
    moved = {
        (old, f.name): sec
        for sec in SECTIONS
        for f, s in settings_of(SECTIONS[sec])
        for old in s.moved_from
    }
    out: dict[str, Any] = {}
    for sec, body in raw.items():
        if sec == META_KEY:
            continue
        if sec not in SECTIONS:
            hint = difflib.get_close_matches(str(sec), list(SECTIONS), n=1)
            more = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(
                f"{path}: unknown section '{sec}'{more}; sections: {', '.join(SECTIONS)}"
            )
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: section '{sec}' must be a mapping of keys")
        for key, value in body.items():
            home = moved.get((sec, key), sec)  # a key that moved: still read where it is now
            if (sec, key) in IGNORED or home not in taken:
                continue
            if key not in decl[home]:
                hint = difflib.get_close_matches(str(key), list(decl[home]), n=1)
                more = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ConfigError(f"{path}: {sec}: unknown key '{key}'{more}")
            f, s = decl[home][key]
            out[key] = _convert(SECTIONS[home], f, s, value, f"{path}: {sec}.{key}")
    return out


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


def portable_paths(cfg: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """The serialized job with every path setting inside `cwd` written relative to it
    (a Ray job runs in a temporary copy of its working directory: its absolute paths
    would not outlive the job), others as they are."""
    from rocketrec.settings import settings_of
    from rocketrec.train.job import SECTIONS

    def rel(v: str) -> str:
        if "://" in v or not Path(v).is_absolute():
            return v
        try:
            return str(Path(v).relative_to(cwd))
        except ValueError:
            return v

    out = {sec: dict(body) if isinstance(body, dict) else body for sec, body in cfg.items()}
    for sec, cls in SECTIONS.items():
        body = out.get(sec)
        if not isinstance(body, dict):
            continue
        for f, s in settings_of(cls):
            v = body.get(f.name)
            if s.path and v:
                body[f.name] = [rel(x) for x in v] if isinstance(v, list | tuple) else rel(v)
    if isinstance(out.get("train"), dict) and out["train"].get("resume"):
        out["train"]["resume"] = rel(out["train"]["resume"])
    return out
