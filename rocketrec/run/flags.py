"""A training job's flags and config files, generated from the settings' declarations,
and the one place they become a JobConfig (rocketrec.train.job):

    job = parse_job(parser, argv, ray=...)    defaults < --config YAML < flags

Each setting is a field of its section's dataclass (`rocketrec.settings`): the
sections are `rocketrec.train.job.SECTIONS` (data, loss, model, train, ray), the
flag is the field's name with dashes, the YAML key its name, the help and the
resume rule its declaration. Nothing here names a setting: adding one is one
field plus its use. The sections' dataclasses reject bad values with a message
naming the field, and `JobConfig.check(spec)` what needs the spec.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any

from rocketrec.run.config_file import ConfigError, load_config, run_meta
from rocketrec.settings import Setting, default_of, kind_of, on_off, settings_of
from rocketrec.train.job import SECTIONS, JobConfig, job_from_values

# --help group titles of the sections (only the display: keys and flags come from fields)
GROUP_TITLES = {
    "data": "data",
    "loss": "method (Rocket Launching)",
    "model": "model",
    "train": "training",
    "ray": "Ray",
}


def flag_type(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parser raising ValueError as an argparse type (its message kept)."""

    def parse(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = getattr(fn, "__name__", "value")
    return parse


def _help(f: Field[Any], s: Setting) -> str:
    d = default_of(f)
    shown = "required" if s.required else f"default {_show(d)}"
    rule = "may change on --resume" if s.resume else "fixed on --resume"
    return f"{s.help} ({shown}; {rule})"


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "none"
    if isinstance(v, bool) or v is None:
        return {True: "on", False: "off", None: "none"}[v]
    return str(v)


def add_section(p: argparse.ArgumentParser, section: str) -> Any:
    """One argument group of flags, generated from a section's settings. Defaults are
    SUPPRESSed: parse_job sees only the flags given, over the file and the defaults."""
    cls = SECTIONS[section]
    g = p.add_argument_group(GROUP_TITLES[section])
    for f, s in settings_of(cls):
        names = [s.flag_name(f.name), *s.aliases]
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": _help(f, s)}
        kind, t = kind_of(cls, f)
        if s.choices is not None:
            kw["choices"] = s.choices
        if s.switch:
            kw["action"] = "store_true"
            kw.pop("choices", None)
        elif s.parse is not None:
            kw["type"] = flag_type(s.parse)
        elif kind == "list":
            kw.update(nargs="+", type=t)
        elif t is bool:
            kw["type"] = flag_type(on_off)
        elif kind == "scalar":
            kw["type"] = t
        else:
            raise TypeError(f"setting {section}.{f.name}: give `parse=` for type {t}")
        g.add_argument(*names, **kw)
    return g


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every flag of a training job but Ray's (see `add_ray_args`)."""
    p.add_argument(
        "--config",
        default=None,
        help="run config YAML (sections data, loss, model, train, ray; see jobs/configs/); "
        "flags given on the command line override it",
    )
    for section in ("data", "loss", "model"):
        add_section(p, section)
    g = add_section(p, "train")
    g.add_argument(
        "--resume",
        default=argparse.SUPPRESS,
        help="continue from this run or checkpoint directory (its RUN/config.yaml gives the "
        "settings; those that may change on --resume can be given again)",
    )


def add_ray_args(p: argparse.ArgumentParser) -> None:
    add_section(p, "ray")


def _abs(v: str) -> str:
    return v if "://" in v else str(Path(v).resolve())


def _config_path(argv: list[str]) -> str | None:
    """--config, else the RUN/config.yaml of --resume's run (its own settings)."""
    from rocketrec.run.run_dir import RunDir

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is None and known.resume:
        for cand in (Path(known.resume), *Path(known.resume).parents[:2]):
            if RunDir(cand).config.is_file():
                return str(RunDir(cand).config)
    return str(known.config) if known.config else None


def _spec_of_run(spec: str, config: Path) -> str:
    """A config file's spec path; when it is gone (a Ray job's temporary working
    directory), the copy of the spec's text its run directory keeps (RUN/spec.yaml)."""
    from rocketrec.run.run_dir import RunDir

    kept = RunDir(config.parent).spec
    if Path(spec).is_file() or "://" in spec or not kept.is_file():
        return spec
    print(
        f"[rocketrec] {spec}: not found; using the run's copy of its spec, {kept}", file=sys.stderr
    )
    return str(kept)


def parse_job(p: argparse.ArgumentParser, argv: list[str] | None, ray: bool) -> JobConfig:
    """Defaults < `--config` YAML (or RUN/config.yaml on --resume) < flags -> JobConfig.
    Paths become absolute (workers may start elsewhere). Raises ValueError (ConfigError)
    naming the file, key or flag; argparse exits 2 on a bad or missing flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = _config_path(argv)
    sections = [s for s in SECTIONS if s != "ray" or ray]
    values: dict[str, Any] = {}
    for sec in sections:
        values.update({f.name: default_of(f) for f, _ in settings_of(SECTIONS[sec])})
    from_file = load_config(path, sections) if path else {}
    from_file.pop("resume", None)
    if path and from_file.get("spec"):
        from_file["spec"] = _spec_of_run(str(from_file["spec"]), Path(path))
    values.update({k: v for k, v in from_file.items() if v is not None})
    given = vars(p.parse_args(argv))
    given.pop("config", None)
    values.update(given)
    for sec in sections:
        for f, s in settings_of(SECTIONS[sec]):
            v = values.get(f.name)
            if s.required and (v is MISSING or v in (None, (), [])):
                p.error(f"the following arguments are required: {s.flag_name(f.name)}")
            if s.path and v:
                values[f.name] = [_abs(x) for x in v] if isinstance(v, list | tuple) else _abs(v)
    if values.get("resume"):
        values["resume"] = _abs(values["resume"])
    try:
        return job_from_values(values, ray=ray, run=run_meta(argv))
    except TypeError as e:  # a value of the wrong type from the file
        raise ConfigError(f"{path}: {e}") from None
