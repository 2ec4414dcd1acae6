"""Signals around the moments a partial or finished output changes state.

Between the rename of a verified output onto its name and the removal of its journal, an
interrupt would leave a complete file behind a command that reports failure. SIGINT and
SIGTERM are held back for that short section; one that arrives while it succeeds came too
late to stop anything and is dropped (with a log line), one that arrives while it fails is
delivered as usual.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

logger = logging.getLogger(__name__)

_DEFERRED = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back inside the block (main thread, POSIX; elsewhere a no-op)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        pending = signal.sigpending() & _DEFERRED
        if pending and succeeded:
            saved = {s: signal.signal(s, signal.SIG_IGN) for s in pending}
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            for s, handler in saved.items():
                signal.signal(s, handler)
            logger.warning("interrupt ignored: it came after the output was complete")
        else:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back inside the block and deliver them right after it: a tensor is
    either written and counted, or not written, never written but uncounted."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
