"""Resume journal for the streaming writer, plus durable small-file writes.

The journal is a small JSON file beside the temp output. It is only ever
rewritten atomically (temp file + fsync + ``os.replace`` + directory fsync), and
only after the data bytes it claims have been flushed and fsynced, so a SIGKILL
at any moment leaves either the previous journal or the new one, both true.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from mergekit_sdxl.errors import UsageError

PathLike = Union[str, "os.PathLike[str]"]

JOURNAL_VERSION = 1


class JournalError(Exception):
    """The journal is missing fields, malformed or from another format version."""


class ResumeMismatch(UsageError):
    """A partial output exists but was produced by a different configuration or layout."""


@dataclass(frozen=True)
class JournalState:
    """What the journal claims about the temp file.

    ``offset`` is an absolute file offset: the header plus the data of the first
    ``completed`` entries. ``prefix_sha256`` is the sha256 of bytes ``[0, offset)``.
    """

    fingerprint: str
    header_sha256: str
    total_entries: int
    completed: int
    offset: int
    prefix_sha256: str
    version: int = JOURNAL_VERSION


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported, e.g. Windows)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a unique temp file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp name keeps concurrent writers (two processes, one cache) from clobbering
    # each other's half-written temp files; the last rename wins, which is atomic.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def write_journal(path: PathLike, state: JournalState) -> None:
    """Atomically replace the journal at ``path`` with ``state``."""
    data = json.dumps(asdict(state), sort_keys=True, separators=(",", ":")).encode("utf-8")
    atomic_write_bytes(path, data)


def read_journal(path: PathLike) -> JournalState:
    """Read and validate a journal; raises ``JournalError`` if it cannot be trusted."""
    try:
        raw = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise JournalError(f"unreadable journal {os.fspath(path)}: {exc}") from exc
    if not isinstance(raw, dict):
        raise JournalError(f"journal {os.fspath(path)} is not a JSON object")
    if raw.get("version") != JOURNAL_VERSION:
        raise JournalError(f"journal {os.fspath(path)} has version {raw.get('version')!r}, expected {JOURNAL_VERSION}")
    types = {
        "fingerprint": str,
        "header_sha256": str,
        "total_entries": int,
        "completed": int,
        "offset": int,
        "prefix_sha256": str,
    }
    for key, typ in types.items():
        value = raw.get(key)
        # bool is an int subclass; a journal saying "completed": true is corrupt, not 1.
        if not isinstance(value, typ) or isinstance(value, bool):
            raise JournalError(f"journal {os.fspath(path)}: field {key!r} missing or not {typ.__name__}")
    if raw["completed"] < 0 or raw["offset"] < 0 or raw["completed"] > raw["total_entries"]:
        raise JournalError(f"journal {os.fspath(path)}: inconsistent counts {raw}")
    return JournalState(**{k: raw[k] for k in (*types, "version")})


def remove_quietly(path: PathLike) -> None:
    """Unlink ``path`` if it exists."""
    try:
        os.unlink(os.fspath(path))
    except FileNotFoundError:
        pass


def describe_fingerprint_change(old: str, new: str, limit: int = 200) -> str:
    """Human-readable summary of how two fingerprints differ.

    Fingerprints are opaque strings, but callers usually pass JSON objects; then the
    top-level keys that changed are named, which is what a user needs to see.
    """

    def parse(s: str) -> Optional[Dict[str, Any]]:
        try:
            obj = json.loads(s)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    a, b = parse(old), parse(new)
    if a is not None and b is not None:
        changed: List[str] = sorted(k for k in set(a) | set(b) if a.get(k, object()) != b.get(k, object()))
        if changed:
            return "changed fields: " + ", ".join(changed)

    def clip(s: str) -> str:
        return s if len(s) <= limit else s[:limit] + f"... ({len(s)} chars)"

    return f"recorded {clip(old)!r}, now {clip(new)!r}"
