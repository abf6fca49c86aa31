"""The project's own exception types: every user-facing failure is one of these.

The CLI prints ``error: <message>`` for them (the traceback only with ``--debug``);
anything else escaping is a bug in ddpmkit.
"""


class DdpmkitError(Exception):
    """Base class: a problem the user can fix, described in one sentence."""


class ConfigError(DdpmkitError, ValueError):
    """A bad config value, flag or preset name."""


class DataError(DdpmkitError, ValueError):
    """Unreadable or malformed input data."""


class CheckpointError(DdpmkitError):
    """A missing, truncated, incompatible or untrusted checkpoint."""


class OutputError(DdpmkitError, OSError):
    """An output could not be written (a full disk, a read-only folder); still an OSError."""
