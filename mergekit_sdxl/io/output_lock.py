"""One writer per output: an exclusive advisory ``flock`` on ``OUT.lock``, held for the whole merge.

A second merge to the same output is refused at once, naming the PID that holds the lock.
The lock file is created with ``O_NOFOLLOW`` (a planted symlink is refused) and removed on
release while still locked; a process that opened the old file just before the removal
notices that the name now points elsewhere and tries again.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import Optional, Type, Union

from mergekit_sdxl.errors import OutputError
from mergekit_sdxl.io.safe_write import NOFOLLOW_CLOEXEC, describe_os_error

PathLike = Union[str, "os.PathLike[str]"]



def lock_path_for(out_path: PathLike) -> Path:
    """The lock file of an output: ``OUT.lock`` beside it."""
    p = Path(out_path)
    return p.with_name(p.name + ".lock")


class OutputLock:
    """Context manager holding the exclusive lock of one output path."""

    def __init__(self, out_path: PathLike) -> None:
        self.out_path = Path(out_path)
        self.path = lock_path_for(out_path)
        self._fd: Optional[int] = None

    def acquire(self) -> OutputLock:
        """Take the lock or raise :class:`OutputError` naming the holder."""
        import fcntl

        for _ in range(10):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _read_pid(fd)
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    who = f"process {holder}" if holder else "another process"
                    raise OutputError(
                        f"{self.out_path}: {who} is already merging into this output (lock {self.path}); "
                        "wait for it to finish or stop it"
                    ) from error
                raise OutputError(describe_os_error(error, self.path)) from error
            if _same_file(fd, self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return self
            os.close(fd)  # the holder removed the file between our open and flock: retry
        raise OutputError(f"{self.path}: could not take the output lock (the lock file keeps changing)")

    def _open(self) -> int:
        try:
            fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT | NOFOLLOW_CLOEXEC, 0o644)
        except OSError as error:
            raise OutputError(describe_os_error(error, self.path)) from error
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(f"{self.path}: the lock file is not a regular file")
        return fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""
