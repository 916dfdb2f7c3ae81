"""User errors: the one family of exceptions that means "the input is at fault".

    UserError                 one line on the console, exit 2 (the CLI and the Ray
    |                         driver catch exactly this, each in one place)
    +-- SpecError             a feature spec (rocketrec.spec)
    +-- DataError             Parquet logs: a column, a type, a value (rocketrec.data)
    +-- ConfigError           a setting, a flag, a config file, a sharding constraint
    +-- CheckpointError       a checkpoint to resume or warm-start from: missing
    |                         (CheckpointNotFound), damaged, or another run's settings
    +-- ExportError           a model that cannot be exported or served as asked
    +-- TrainingDiverged      a non-finite loss (rocketrec.train.task)

Raise the narrowest subclass where user input is found at fault, naming the file,
field or column. Anything else (a ValueError inside the library, a KeyError) is a
bug: it reaches the user as a traceback with exit 1, never as a one-line "error".
UserError subclasses ValueError, so code that validates and catches ValueError
keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """User input is at fault: printed as one line, exit 2."""


class ConfigError(UserError):
    """A setting, flag, config file or sharding constraint."""


class CheckpointError(UserError):
    """A checkpoint to resume or warm-start from: missing, damaged or incompatible."""


class ExportError(UserError):
    """A model that cannot be exported or served as asked."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No complete checkpoint where one was named (also a FileNotFoundError)."""
