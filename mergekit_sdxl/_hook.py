"""Lazy post-import hook, imported from ``mergekit_sdxl_hook.pth`` at interpreter start.

It costs one tiny import per Python process. The plugin itself is loaded only
when ``mergekit.merge_methods`` is imported, so the stock ``mergekit-yaml``
sees the SDXL methods and checkpoint files with no extra step. Set
``MERGEKIT_SDXL_DISABLE=1`` to turn it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Dict, Iterator

_TRIGGERS: Dict[str, str] = {
    # module whose import completes -> plugin function (in mergekit_sdxl.host.plugin) to call
    "mergekit.merge_methods": "on_merge_methods_imported",
    "mergekit.plan": "on_plan_imported",
    "mergekit.merge": "on_merge_imported",
}


_local = threading.local()


@contextmanager
def suppressed() -> Iterator[None]:
    """Imports of mergekit made by this package itself do not run the callbacks: the plugin's
    modules are then mid-import, and the code that imports them registers explicitly."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def _run_callback(name: str) -> None:
    if getattr(_local, "depth", 0):
        return
    from mergekit_sdxl.host import plugin

    callback: Callable[[], None] = getattr(plugin, _TRIGGERS[name])
    callback()


class _ExecThenCall(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader, name: str):
        self._wrapped = wrapped
        self._name = name

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self._wrapped.create_module(spec)

    def exec_module(self, module) -> None:  # type: ignore[no-untyped-def]
        self._wrapped.exec_module(module)
        _run_callback(self._name)

    def __getattr__(self, attr: str):  # delegate get_source, is_package, ...
        return getattr(self._wrapped, attr)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname not in _TRIGGERS:
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
            _run_callback(name)


install()
