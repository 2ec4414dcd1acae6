"""The one base exception of mergekit-sdxl and its exit codes.

Every condition a user can cause or fix (a bad file, a bad config, an output that would
clash with an input, a full disk) raises a subclass of :class:`UserError`; the CLI prints
its one-line message and exits with ``exit_code``. Anything else is a bug in this package:
the CLI shows the traceback and asks for a report. No imports: every layer may use it.
"""

from __future__ import annotations

# Exit codes of the ``mergekit-sdxl`` command.
EXIT_ERROR = 1  # bad input, refused merge, I/O failure the user can fix
EXIT_USAGE = 2  # bad config / option, or a refused resume
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT); SIGTERM gives 143
EXIT_BUG = 70  # EX_SOFTWARE: an unexpected exception

REPORT_URL = "https://github.com/mergekit-sdxl/mergekit-sdxl/issues"


class UserError(Exception):
    """A condition the user can fix; ``str(err)`` is one line naming the file, key or parameter."""

    exit_code: int = EXIT_ERROR


class UsageError(UserError):
    """A bad option or config value."""

    exit_code = EXIT_USAGE


class OutputError(UserError):
    """A path the command would write is unsafe (an input, a symlink, locked, not writable, no space)."""


class InputDataError(UserError):
    """An input's values cannot be merged (NaN/inf, a key missing from the base)."""
