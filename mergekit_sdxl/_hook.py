"""Lazy post-import hook, imported from ``mergekit_sdxl_hook.pth`` at interpreter start.

It costs one tiny import per Python process. The plugin itself is loaded only when mergekit
is: as each of ``mergekit.merge_methods``, ``mergekit.plan`` and ``mergekit.merge`` finishes
importing, the matching registration in ``mergekit_sdxl.host.plugin`` runs, so the stock
``mergekit-yaml`` sees the SDXL methods and checkpoint files with no extra step. Set
``MERGEKIT_SDXL_DISABLE=1`` to turn it off.

A registration never runs while one of this package's own modules is being imported (they
import mergekit themselves, and a registration imports them): it is queued and runs as soon
as the outermost import of a ``mergekit_sdxl`` module completes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List

_TRIGGERS: Dict[str, str] = {
    # module whose import completes -> plugin function (in mergekit_sdxl.host.plugin) to call
    "mergekit.merge_methods": "on_merge_methods_imported",
    "mergekit.plan": "on_plan_imported",
    "mergekit.merge": "on_merge_imported",
}
_PACKAGE = "mergekit_sdxl."

_state = threading.local()


def _depth(name: str) -> int:
    return int(getattr(_state, name, 0))


def _queue() -> List[str]:
    queue = getattr(_state, "queue", None)
    if queue is None:
        queue = _state.queue = []
    return queue


@contextmanager
def suppressed() -> Iterator[None]:
    """mergekit imports made by this package itself: callbacks wait (see the module docstring)."""
    _state.suppressed = _depth("suppressed") + 1
    try:
        yield
    finally:
        _state.suppressed = _depth("suppressed") - 1
    _flush()


def _flush() -> None:
    if _depth("suppressed") or _depth("package"):
        return
    queue = _queue()
    while queue:
        name = queue.pop(0)
        from mergekit_sdxl.host import plugin

        callback: Callable[[], None] = getattr(plugin, _TRIGGERS[name])
        callback()


def _on_trigger(name: str) -> None:
    if name not in _queue():
        _queue().append(name)
    _flush()


class _ExecThenCall(importlib.abc.Loader):
    """Runs the wrapped loader, then ``after`` (a trigger's callback, or the package bookkeeping)."""

    def __init__(self, wrapped: importlib.abc.Loader, name: str):
        self._wrapped = wrapped
        self._name = name

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self._wrapped.create_module(spec)

    def exec_module(self, module) -> None:  # type: ignore[no-untyped-def]
        if self._name in _TRIGGERS:
            self._wrapped.exec_module(module)
            _on_trigger(self._name)
            return
        _state.package = _depth("package") + 1
        try:
            self._wrapped.exec_module(module)
        finally:
            _state.package = _depth("package") - 1
        _flush()

    def __getattr__(self, attr: str):  # delegate get_source, is_package, ...
        return getattr(self._wrapped, attr)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname not in _TRIGGERS and not fullname.startswith(_PACKAGE):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ExecThenCall(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    """Install the finder once; if mergekit is already imported, run the callbacks now."""
    if os.environ.get("MERGEKIT_SDXL_DISABLE", "").strip() not in ("", "0"):
        return
    if any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _PostImportFinder())
    for name in _TRIGGERS:
        if name in sys.modules:
            _on_trigger(name)


install()
