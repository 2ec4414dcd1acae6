"""How every way a command ends becomes a message and an exit code.

A :class:`~mergekit_sdxl.errors.UserError` prints its line and exits with its code; an OS error
on a named file (disk full, permission, read-only) is a user condition too; Ctrl-C exits 130
and SIGTERM 143; anything else is a bug in this package: the traceback is shown with a line
asking for a report.
"""

from __future__ import annotations

import errno
import sys
import traceback
from types import FrameType
from typing import Optional

from mergekit_sdxl.errors import EXIT_BUG, EXIT_ERROR, EXIT_INTERRUPTED, REPORT_URL, UserError

# OS errors a user causes and fixes (not bugs): the message names the file.
_USER_ERRNOS = frozenset(
    code
    for code in (
        errno.ENOSPC,
        getattr(errno, "EDQUOT", None),
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOENT,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ELOOP,
        errno.EEXIST,
        errno.EIO,
        errno.ENAMETOOLONG,
        errno.EMFILE,
    )
    if code is not None
)

EXIT_TERMINATED = 143
RESUME_HINT = "run the same command again to resume"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


def raise_terminated(signum: int, frame: Optional[FrameType]) -> None:
    """SIGTERM handler."""
    raise Terminated()


def report(error: BaseException) -> int:
    """Print what the user needs to see about ``error`` (to stderr) and return the exit code."""
    if isinstance(error, Terminated):
        return _say(f"terminated (SIGTERM): {RESUME_HINT}", EXIT_TERMINATED)
    if isinstance(error, KeyboardInterrupt):
        return _say(f"interrupted: {RESUME_HINT}", EXIT_INTERRUPTED)
    if isinstance(error, UserError):
        return _say(f"error: {error}", error.exit_code)
    if isinstance(error, OSError) and error.errno in _USER_ERRNOS:
        from mergekit_sdxl.io.safe_write import describe_os_error

        where = error.filename if error.filename is not None else "mergekit-sdxl"
        return _say(f"error: {describe_os_error(error, where)}", EXIT_ERROR)
    if isinstance(error, MemoryError):
        return _say("error: out of memory; lower --memory-budget", EXIT_ERROR)
    traceback.print_exception(type(error), error, error.__traceback__)
    return _say(
        f"This is a bug in mergekit-sdxl, not a problem with your files. Please report it at {REPORT_URL} "
        "with the command you ran and the traceback above.",
        EXIT_BUG,
    )


def _say(message: str, code: int) -> int:
    from mergekit_sdxl.text import printable

    lines = [printable(line) for line in str(message).splitlines() if line.strip()]
    print("\n".join(lines) if lines else "error", file=sys.stderr)
    return code
