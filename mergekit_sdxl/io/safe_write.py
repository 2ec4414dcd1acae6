"""Creating files without ever writing through a symlink or over another process' file.

Every file this package writes is first created under a fresh temporary name with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (so a symlink or a file planted under that name is refused,
never followed or truncated) and then renamed onto its final name. ``os.replace`` of a
symlink replaces the link itself, never its target.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Union

from mergekit_sdxl.errors import OutputError

PathLike = Union[str, "os.PathLike[str]"]

# Never follow a symlink at the last path component; never leak the descriptor to children.
NOFOLLOW_CLOEXEC = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def describe_os_error(error: OSError, path: PathLike) -> str:
    """One line for an OS error on ``path``: what happened and what to do."""
    where = os.fspath(path)
    code = error.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"{where}: no space left on the device (free some space and run the same command again)"
    if code in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied"
    if code == errno.EROFS:
        return f"{where}: the file system is read-only"
    if code == errno.ELOOP:
        return f"{where}: is a symbolic link; refusing to write through it"
    if code == errno.EEXIST:
        return f"{where}: already exists (another process may be writing it)"
    if code == errno.EISDIR:
        return f"{where}: is a directory"
    if code == errno.ENOENT:
        return f"{where}: no such file or directory"
    return f"{where}: {error.strerror or error}"


def create_exclusive(path: PathLike, mode: int = 0o644) -> BinaryIO:
    """Create ``path`` for writing; fail if anything (a file, a symlink) already has that name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW_CLOEXEC
    try:
        fd = os.open(os.fspath(path), flags, mode)
    except OSError as error:
        raise OutputError(describe_os_error(error, path)) from error
    return os.fdopen(fd, "wb", buffering=0)


def open_existing_nofollow(path: PathLike) -> BinaryIO:
    """Open an existing regular file for update, refusing a symlink or anything that is not a file."""
    try:
        fd = os.open(os.fspath(path), os.O_RDWR | NOFOLLOW_CLOEXEC)
    except OSError as error:
        raise OutputError(describe_os_error(error, path)) from error
    import stat

    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{os.fspath(path)}: not a regular file; refusing to write to it")
    return os.fdopen(fd, "r+b", buffering=0)


def temp_name(path: PathLike) -> Path:
    """A fresh hidden name beside ``path`` for a write-then-rename."""
    p = Path(path)
    return p.with_name(f".{p.name}.{secrets.token_hex(6)}.tmp")


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fresh exclusive temp file and a rename (fsynced)."""
    target = Path(path)
    if target.is_symlink():
        raise OutputError(f"{target}: is a symbolic link; refusing to replace it")
    if target.is_dir():
        raise OutputError(f"{target}: is a directory")
    tmp = temp_name(target)
    handle = create_exclusive(tmp)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[handle.write(view) :]
            os.fsync(handle.fileno())
        finally:
            handle.close()
        os.replace(tmp, target)
    except OSError as error:
        _remove(tmp)
        raise OutputError(describe_os_error(error, target)) from error
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
