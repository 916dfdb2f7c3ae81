"""How a setting is declared: once, as a field of its section's dataclass.

    batch_size: int = setting(1024, "rows per worker per step", resume=False)

The field's name is the YAML key (`train.batch_size`) and, with dashes, the flag
(`--batch-size`); its type and default are the dataclass's; `help` is its `--help`
text; `resume` says whether a `--resume` may change it (the resume check reads it).
The flags and the YAML sections are generated from the sections' fields
(`rocketrec.run.flags`), so adding a setting is one edit (the field) plus its use.

Options for the few settings whose flag is not the plain rule:
    flag / aliases     another flag name (`--no-tensorboard`), more names (`--lambda`)
    switch             a bool given as a bare flag (`--verbose`), not `on`/`off`
    parse              text -> value for a flag or a YAML scalar (layer sizes, sharding)
    choices            the values accepted
    path               a path: made absolute before workers start elsewhere
    required           no default; must come from a flag or the config file
    moved_from         sections that held the key in older config files (still read)

Sections validate their values in `__post_init__`, with messages naming the field.
This module imports nothing of rocketrec: every layer may declare settings.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Setting:
    help: str
    resume: bool  # may a --resume change it
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    switch: bool = False
    parse: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    path: bool = False
    required: bool = False
    moved_from: tuple[str, ...] = ()

    def flag_name(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    resume: bool,
    default_factory: Callable[[], Any] | Any = MISSING,
    **options: Any,
) -> Any:
    """A dataclass field carrying its `Setting` (see the module docstring)."""
    meta = {"setting": Setting(help=help, resume=resume, **options)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def settings_of(cls: type) -> list[tuple[Field[Any], Setting]]:
    """(field, Setting) of every declared setting of a section dataclass, in order."""
    return [(f, f.metadata["setting"]) for f in fields(cls) if "setting" in f.metadata]


def default_of(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def kind_of(cls: type, f: Field[Any]) -> tuple[str, type]:
    """('scalar', int | float | str | bool), ('list', item type) or ('other', type) of a
    setting's annotation (Optional unwrapped)."""
    t = _hints(cls)[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        t = args[0] if len(args) == 1 else t
    origin = typing.get_origin(t)
    if origin is tuple:
        return "list", typing.get_args(t)[0]
    if t in (int, float, str, bool):
        return "scalar", t
    return "other", t


def resume_may_change(cls: type) -> tuple[str, ...]:
    """Names of the settings of `cls` a --resume may change."""
    return tuple(f.name for f, s in settings_of(cls) if s.resume)


# -- parsers shared by several settings (text -> value; ValueError names the problem) --


def layer_sizes(text: str) -> tuple[int, ...]:
    """'256,128,64' -> (256, 128, 64); '' or 'none' -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated layer sizes, got {text!r}") from None
    if any(x < 1 for x in out):
        raise ValueError(f"layer sizes must be >= 1, got {text!r}")
    return out


def on_off(text: str) -> bool:
    t = text.lower()
    if t in ("on", "true", "1", "yes"):
        return True
    if t in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"expected on or off, got {text!r}")
