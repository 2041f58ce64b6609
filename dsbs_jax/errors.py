"""The one exception type for mistakes a user can fix.

A command that meets a `UserError` prints its message as one line and exits with status 2
(`dsbs_jax.gin_utils.run`); any other exception is a bug here or in a library and keeps its
traceback. Raise it for bad flags, settings, paths and files, with a message that names the
thing and what to do about it.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2


class UserError(ValueError):
    """Bad input: a setting, flag, path or file the user can correct; the message says how.

    A ValueError, so callers that already catch ValueError around user input keep working.
    """


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the run needs is absent; the message names it and what makes it."""
