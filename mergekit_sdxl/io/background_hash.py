"""sha256 of a merge's inputs in background threads, while the merge plans and runs.

Hashing the inputs of a full-width merge takes minutes; nothing but provenance (the published
header, the sidecars) needs the hashes, and only when the output is published. So they are
computed here, through the :class:`~mergekit_sdxl.io.hashing.HashCache` (hits cost nothing, results
are recorded as before), by threads that start right after preflight. A caller that needs one
hash now (a sha256 pin) gets it at once: a file no thread has started is hashed in the caller's
thread, one being hashed is waited for.

The threads never take SIGINT/SIGTERM (they block both, so Ctrl-C always reaches the main thread,
and never lands inside a section the main thread holds signals back for), and :meth:`stop` ends
them within one read chunk.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable, Dict, List, Optional, Sequence

from mergekit_sdxl.io.hashing import HashCache, HashingCancelled, PathLike

logger = logging.getLogger(__name__)

__all__ = ["BackgroundHasher", "default_hash_threads", "start_thread_without_signals"]

_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_WAIT_S = 0.25  # how often a waiting caller wakes (it stays interruptible by Ctrl-C throughout)
_JOIN_S = 10.0

_PENDING, _RUNNING, _DONE = "pending", "running", "done"


def default_hash_threads() -> int:
    """Threads for hashing: one per four cores, 1 to 4 (the disk, not the CPU, is usually the limit,
    and the merge itself wants the cores)."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def start_thread_without_signals(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon thread that has SIGINT and SIGTERM blocked (it inherits the mask it is
    started with), so the process's signals are always handled by the main thread."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - not POSIX
        thread.start()
        return thread
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return thread


class BackgroundHasher:
    """sha256 of ``paths`` (in their order, each real file once) through ``cache``, in threads.

    Use as a context manager: entering starts the threads, leaving stops them (promptly, also on
    an exception or Ctrl-C). :meth:`sha256` gives one file's hash (now), :meth:`known` what is
    already done, :meth:`wait_all` every hash (the calling thread hashes what no thread has started).
    """

    def __init__(self, cache: HashCache, paths: Sequence[PathLike], *, threads: Optional[int] = None) -> None:
        self._cache = cache
        self._paths: Dict[str, str] = {}
        for p in paths:
            self._paths.setdefault(_key(p), os.fspath(p))
        self._order: List[str] = list(self._paths)
        self._state: Dict[str, str] = {k: _PENDING for k in self._order}
        self._results: Dict[str, str] = {}
        self._errors: Dict[str, BaseException] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._n_threads = threads if threads is not None else default_hash_threads()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> BackgroundHasher:
        """Start the hashing threads (no more than there are files)."""
        for i in range(min(self._n_threads, len(self._order))):
            self._threads.append(start_thread_without_signals(self._work, f"mergekit-sdxl-hash-{i}"))
        return self

    def stop(self) -> None:
        """Tell the threads to stop and wait for them (each ends within one read chunk)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(_JOIN_S)
            if thread.is_alive():  # a read that hangs (a dead network share): daemon, so it cannot block exit
                logger.warning("hashing thread %s did not stop within %.0f s", thread.name, _JOIN_S)
        self._threads = [t for t in self._threads if t.is_alive()]

    def __enter__(self) -> BackgroundHasher:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()

    # ------------------------------------------------------------------ results

    def known(self, path: PathLike) -> Optional[str]:
        """The sha256 of ``path`` if it is already computed (never waits), else None."""
        with self._cond:
            return self._results.get(_key(path))

    def all_known(self) -> bool:
        """True when every file's sha256 is computed."""
        with self._cond:
            return len(self._results) == len(self._order)

    def sha256(self, path: PathLike) -> str:
        """The sha256 of ``path`` (one of the files given), now.

        Hashed in this thread when no thread has started it; waited for when one is hashing it;
        an error a thread met hashing it is raised here.
        """
        key = _key(path)
        if key not in self._state:
            raise KeyError(f"{os.fspath(path)} is not one of the files this hasher hashes")
        with self._cond:
            while self._state[key] == _RUNNING:
                self._cond.wait(_WAIT_S)  # interruptible: Ctrl-C raises here
            mine = self._state[key] == _PENDING
            if mine:
                self._state[key] = _RUNNING
        if mine:
            self._hash(key)
        with self._cond:
            if key in self._errors:
                raise self._errors[key]
            return self._results[key]

    def wait_all(self) -> Dict[str, str]:
        """``{path: sha256}`` for every file (paths as first given); raises the first error met."""
        return {self._paths[k]: self.sha256(self._paths[k]) for k in self._order}

    # ------------------------------------------------------------------ work

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                key = next((k for k in self._order if self._state[k] == _PENDING), None)
                if key is None:
                    return
                self._state[key] = _RUNNING
            self._hash(key)

    def _hash(self, key: str) -> None:
        path = self._paths[key]
        try:
            digest = self._cache.sha256(path, stop=self._stop)
        except Exception as error:  # noqa: BLE001 - handed to whoever asks for this file
            cancelled = isinstance(error, HashingCancelled)
            with self._cond:
                if cancelled:
                    self._state[key] = _PENDING  # not done: a caller asking later hashes it itself
                else:
                    self._errors[key] = error
                    self._state[key] = _DONE
                self._cond.notify_all()
            if cancelled and threading.current_thread() is threading.main_thread():
                raise
            return
        except BaseException:
            # Ctrl-C while the caller's thread hashed this file: not an answer, and not swallowed.
            with self._cond:
                self._state[key] = _PENDING
                self._cond.notify_all()
            raise
        with self._cond:
            self._results[key] = digest
            self._state[key] = _DONE
            self._cond.notify_all()
        logger.debug("sha256 %s %s (%s)", digest, path, threading.current_thread().name)


def _key(path: PathLike) -> str:
    # The HashCache's key: one file reached under two names is hashed once.
    return os.path.realpath(os.fspath(path))
