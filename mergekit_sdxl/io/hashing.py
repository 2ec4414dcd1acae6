"""File hashing: sha256, CivitAI AutoV2 short hashes, and a persistent sha256 cache.

Hashing a 6.94 GB checkpoint takes seconds to tens of seconds, and merges reference
tens to hundreds of them, so hashes are cached by (real path, size, mtime_ns).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Dict, Optional, Union

from mergekit_sdxl.io.journal import atomic_write_bytes

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_CHUNK = 16 * 1024 * 1024
CACHE_ENV = "MERGEKIT_SDXL_CACHE_DIR"
CACHE_FILE = "hashes.json"
_CACHE_VERSION = 1
_HEX = frozenset("0123456789abcdef")
SAMPLE_PREFIX = "sample-"
_SAMPLES = 16
_SAMPLE_BYTES = 64 * 1024


class HashingCancelled(Exception):
    """Raised by a hash whose ``stop`` event was set: the caller gave up on it (a failed or
    interrupted merge); nothing is cached."""


def sha256_file(
    path: PathLike,
    chunk: int = DEFAULT_CHUNK,
    callback: Optional[Callable[[int], None]] = None,
    stop: Optional[threading.Event] = None,
) -> str:
    """Hex sha256 of the file at ``path``; ``callback(nbytes)`` is called after each chunk.

    ``stop``: checked before each chunk; once set, :class:`HashingCancelled` is raised (a
    background hash ends within one chunk of being told to).
    """
    h = hashlib.sha256()
    # One reused buffer: no per-chunk allocation while streaming gigabytes.
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            if stop is not None and stop.is_set():
                raise HashingCancelled(f"hashing {os.fspath(path)} was cancelled")
            n = fh.readinto(view)
            if not n:
                break
            h.update(view[:n])
            if callback is not None:
                callback(n)
    return h.hexdigest()


def sample_digest(path: PathLike, samples: int = _SAMPLES, sample_bytes: int = _SAMPLE_BYTES) -> str:
    """A cheap content identity: ``"sample-"`` + the sha256 of the size and ``samples`` slices of
    ``sample_bytes`` spread evenly over the file (the first and the last included).

    Different sample digests prove different contents (equal files always sample alike), so only
    files whose samples agree need a whole-file hash to be told apart. Never a 64-hex digest, so it
    cannot be mistaken for a sha256.
    """
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        last = max(size - sample_bytes, 0)
        offsets = sorted({last * i // max(samples - 1, 1) for i in range(samples)})
        for offset in offsets:
            h.update(os.pread(fh.fileno(), sample_bytes, offset))
    return SAMPLE_PREFIX + h.hexdigest()


def autov2(sha256_hex: str) -> str:
    """CivitAI AutoV2 hash: the first 10 hex characters of the file sha256 (lower case)."""
    s = sha256_hex.strip().lower()
    if len(s) != 64 or not set(s) <= _HEX:
        raise ValueError(f"not a sha256 hex digest: {sha256_hex!r}")
    return s[:10]


def default_cache_dir() -> Path:
    """``$MERGEKIT_SDXL_CACHE_DIR`` if set, else ``~/.cache/mergekit-sdxl``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mergekit-sdxl"


class HashCache:
    """sha256 cache keyed by (real path, size, mtime_ns), persisted as JSON.

    A corrupt or unreadable cache file is treated as empty (with a warning); writes
    are atomic and merge with entries other processes saved meanwhile.
    """

    def __init__(self, cache_dir: Optional[PathLike] = None) -> None:
        self.path: Path = Path(cache_dir).expanduser() / CACHE_FILE if cache_dir is not None else default_cache_dir() / CACHE_FILE
        self._entries: Optional[Dict[str, Dict[str, object]]] = None
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: PathLike) -> str:
        # realpath: the same file reached through a symlink or a relative path is one entry.
        return os.path.realpath(os.fspath(path))

    def _load(self) -> Dict[str, Dict[str, object]]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            logger.warning("hash cache %s is unreadable (%s); starting with an empty cache", self.path, exc)
            return {}
        entries = raw.get("entries") if isinstance(raw, dict) and raw.get("version") == _CACHE_VERSION else None
        if not isinstance(entries, dict):
            logger.warning("hash cache %s has an unexpected layout; starting with an empty cache", self.path)
            return {}
        return {k: v for k, v in entries.items() if _valid_entry(v)}

    def _ensure_loaded(self) -> Dict[str, Dict[str, object]]:
        if self._entries is None:
            self._entries = self._load()
        return self._entries

    def get(self, path: PathLike) -> Optional[str]:
        """Cached sha256 of ``path`` if its size and mtime still match, else None."""
        st = os.stat(path)
        with self._lock:
            entry = self._ensure_loaded().get(self._key(path))
        if (
            entry
            and entry["size"] == st.st_size
            and entry["mtime_ns"] == st.st_mtime_ns
            # ctime and inode cannot be set back by hand: a rewrite with the old mtime restored
            # (or within one timestamp tick) still invalidates the entry.
            and entry.get("ctime_ns") == st.st_ctime_ns
            and entry.get("inode") == st.st_ino
        ):
            return str(entry["sha256"])
        return None

    def record(self, path: PathLike, sha256_hex: str, stat: Optional[os.stat_result] = None) -> None:
        """Store a known sha256 for ``path`` (e.g. one computed while writing it) and persist."""
        st = stat if stat is not None else os.stat(path)
        entry = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino,
            "sha256": sha256_hex.lower(),
        }
        key = self._key(path)
        with self._lock:
            # Re-read before writing so entries saved by other processes meanwhile survive.
            merged = self._load()
            merged[key] = entry
            self._entries = merged
            data = json.dumps({"version": _CACHE_VERSION, "entries": merged}, sort_keys=True, indent=0)
            try:
                atomic_write_bytes(self.path, data.encode("utf-8"))
            except OSError as exc:
                # A read-only or full cache location must not fail a merge.
                logger.warning("could not save hash cache %s: %s", self.path, exc)

    def sha256(self, path: PathLike, progress: bool = False, *, stop: Optional[threading.Event] = None) -> str:
        """sha256 of ``path``, from the cache when size and mtime match, else computed and cached.

        ``stop``: see :func:`sha256_file` (a cancelled hash raises :class:`HashingCancelled`).
        """
        cached = self.get(path)
        if cached is not None:
            return cached
        before = os.stat(path)
        digest = _hash_with_progress(path, before.st_size, stop) if progress else sha256_file(path, stop=stop)
        after = os.stat(path)
        if (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (after.st_size, after.st_mtime_ns, after.st_ctime_ns):
            self.record(path, digest, stat=after)
        else:
            # The file changed while we read it: the digest may match neither version.
            logger.warning("%s changed while being hashed; not caching its sha256", path)
        return digest


def _valid_entry(v: object) -> bool:
    return (
        isinstance(v, dict)
        and isinstance(v.get("size"), int)
        and isinstance(v.get("mtime_ns"), int)
        and isinstance(v.get("sha256"), str)
    )


def _hash_with_progress(path: PathLike, total: int, stop: Optional[threading.Event] = None) -> str:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but hashing must not need it
        logger.info("hashing %s (%.2f GB)", path, total / 1e9)
        return sha256_file(path, stop=stop)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"sha256 {Path(path).name}", leave=False) as bar:
        return sha256_file(path, callback=bar.update, stop=stop)
