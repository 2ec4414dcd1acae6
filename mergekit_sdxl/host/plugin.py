"""Registration of everything the plugin adds to mergekit. Idempotent.

- the merge methods ``tgmd``, ``ties_soup``, ``geometric_median`` in mergekit's registry;
- the SDXL architecture in ``NAME_TO_ARCH``;
- the stock-path patches of ``host/stock_patches.py``.

The import hook (``mergekit_sdxl/_hook.py``) calls ``on_*_imported`` as each mergekit module
finishes importing, so the stock ``mergekit-yaml`` sees the plugin with no extra step; the CLI
and ``mergekit_sdxl.register()`` call :func:`register_all`, which first checks every mergekit
name the plugin uses (``host/mergekit_api.py``).
"""

from __future__ import annotations

import threading

from mergekit_sdxl.errors import UserError

_LOCK = threading.RLock()


class RegistrationConflict(UserError, RuntimeError):
    """Another package registered a method under one of this plugin's names."""


def register_methods() -> None:
    """Add the plugin's merge methods to mergekit's registry (once)."""
    from mergekit_sdxl.host.mergekit_api import get_method, register_method
    from mergekit_sdxl.host.methods import ChunkedMergeMethod, build_methods

    for method in build_methods():
        name = method.spec.name
        try:
            other = get_method(name)
        except RuntimeError:  # mergekit's "Unimplemented merge method"
            other = None
        if other is None:
            register_method(method)
        elif not isinstance(other, ChunkedMergeMethod):
            raise RegistrationConflict(
                f"mergekit already has a merge method named {name!r} "
                f"({type(other).__module__}.{type(other).__name__}); "
                "mergekit-sdxl cannot register its own. Uninstall the other plugin "
                "or set MERGEKIT_SDXL_DISABLE=1."
            )


def register_architecture() -> None:
    """Add the SDXL architecture to mergekit's architecture table."""
    from mergekit_sdxl.host.architecture import ARCHITECTURE_NAME, sdxl_architecture
    from mergekit_sdxl.host.mergekit_api import NAME_TO_ARCH

    NAME_TO_ARCH[ARCHITECTURE_NAME] = [sdxl_architecture()]


def on_merge_methods_imported() -> None:
    """Hook target: ``mergekit.merge_methods`` finished importing."""
    from mergekit_sdxl.host import stock_patches

    with _LOCK:
        register_methods()
        register_architecture()
        stock_patches.route_checkpoint_files()
        stock_patches.fast_model_references()


def on_plan_imported() -> None:
    """Hook target: ``mergekit.plan`` finished importing."""
    from mergekit_sdxl.host import stock_patches

    with _LOCK:
        stock_patches.plan_sdxl_rules()
        stock_patches.index_parameter_sources()


def on_merge_imported() -> None:
    """Hook target: ``mergekit.merge`` finished importing."""
    from mergekit_sdxl.host import stock_patches

    with _LOCK:
        stock_patches.local_paths_are_not_hub_repos()
        stock_patches.no_tokenizer_for_checkpoints()


def register_all() -> None:
    """Check mergekit's names, then register and patch everything. Safe to call repeatedly."""
    from mergekit_sdxl.host.mergekit_api import check_mergekit

    with _LOCK:
        check_mergekit()
        on_merge_methods_imported()
        on_plan_imported()
        on_merge_imported()
