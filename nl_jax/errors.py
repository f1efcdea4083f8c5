"""User-facing errors.

Anything raised as a `UserError` is a mistake the user can fix (a config key,
a data file, a shape).  The command line catches it, prints the message on one
line prefixed with ``error:`` and exits with status 2, without a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; the message says what and how to fix it."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type or an impossible value."""


class DataError(UserError):
    """A data or tokenizer file is missing, empty or unreadable."""


class CheckpointError(UserError):
    """A checkpoint cannot be resumed with the given config."""


class CheckpointStructureError(CheckpointError):
    """A checkpoint's train state has another tree structure than the config builds."""


class CheckpointDamagedError(CheckpointError):
    """A checkpoint's files cannot be read or do not match its recorded checksums."""


class WorkdirError(UserError):
    """The workdir cannot be used: held by another run, unwritable, full or gone."""
