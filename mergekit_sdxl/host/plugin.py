"""Registration of everything the plugin adds to mergekit. Idempotent.

- merge methods ``tgmd``, ``ties_soup``, ``geometric_median`` in mergekit's registry;
- the SDXL architecture in ``NAME_TO_ARCH``;
- ``.safetensors`` single files as models: ``ModelReference.config``,
  ``.tensor_index`` and ``.lazy_loader`` route checkpoint files to this plugin
  and leave every other path to mergekit;
- SDXL key rules in ``MergePlanner.plan_tensor`` (see ``host.planner``).
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from typing import Any, Callable

LOG = logging.getLogger(__name__)

_LOCK = threading.RLock()
_PATCH_MARK = "_mergekit_sdxl_original"


class RegistrationConflict(RuntimeError):
    """Another package registered a method under one of this plugin's names."""


def _patch(owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    current = getattr(owner, name)
    if getattr(current, _PATCH_MARK, None) is not None:
        return
    replacement = make(current)
    functools.update_wrapper(replacement, current)
    setattr(replacement, _PATCH_MARK, current)
    setattr(owner, name, replacement)


_deferred = False


def _initializing(module_name: str) -> bool:
    module = sys.modules.get(module_name)
    spec = getattr(module, "__spec__", None)
    return module is not None and bool(getattr(spec, "_initializing", False))


def complete_deferred() -> None:
    """Finish a registration the hook had to put off (see ``on_merge_methods_imported``)."""
    global _deferred
    if _deferred:
        _deferred = False
        _register_with_mergekit()


def register_methods() -> None:
    from mergekit.merge_methods import registry

    from mergekit_sdxl.host.methods import ChunkedMergeMethod, build_methods

    for method in build_methods():
        name = method.spec.name
        existing = registry._METHODS.get(name)
        if existing is None:
            registry.register(method)
        elif not isinstance(existing, ChunkedMergeMethod):
            raise RegistrationConflict(
                f"mergekit already has a merge method named {name!r} "
                f"({type(existing).__module__}.{type(existing).__name__}); "
                "mergekit-sdxl cannot register its own. Uninstall the other plugin "
                "or set MERGEKIT_SDXL_DISABLE=1."
            )


def register_architecture() -> None:
    from mergekit.architecture.json_definitions import NAME_TO_ARCH

    from mergekit_sdxl.host.architecture import sdxl_architecture
    from mergekit_sdxl.host.checkpoint import ARCHITECTURE_NAME

    NAME_TO_ARCH[ARCHITECTURE_NAME] = [sdxl_architecture()]


def patch_model_reference() -> None:
    from mergekit.common import ModelReference

    from mergekit_sdxl.host.checkpoint import (
        SDXLCheckpointLoader,
        checkpoint_config,
        checkpoint_index,
        is_checkpoint_file,
    )

    def config(original):
        def wrapper(self, trust_remote_code: bool = False):
            if self.lora is None and is_checkpoint_file(self.model.path):
                return checkpoint_config(self.model.path)
            return original(self, trust_remote_code=trust_remote_code)

        return wrapper

    def tensor_index(original):
        def wrapper(self, cache_dir=None):
            if self.lora is None and is_checkpoint_file(self.model.path):
                return checkpoint_index(self.model.path)
            return original(self, cache_dir)

        return wrapper

    def lazy_loader(original):
        def wrapper(self, cache_dir=None, lazy_unpickle: bool = True):
            if self.lora is None and is_checkpoint_file(self.model.path):
                return SDXLCheckpointLoader(checkpoint_index(self.model.path))
            return original(self, cache_dir=cache_dir, lazy_unpickle=lazy_unpickle)

        return wrapper

    _patch(ModelReference, "config", config)
    _patch(ModelReference, "tensor_index", tensor_index)
    _patch(ModelReference, "lazy_loader", lazy_loader)


def patch_card() -> None:
    # mergekit.card.is_hf asks the Hub about any relative path with one "/";
    # offline that crashes after the weights are written. Local files are not Hub repos.
    import os

    import sys

    card = sys.modules.get("mergekit.card")
    if card is None:
        import mergekit.card as card

    def is_hf(original):
        def wrapper(path: str) -> bool:
            if os.path.exists(path):
                return False
            return original(path)

        return wrapper

    if hasattr(card, "is_hf"):
        _patch(card, "is_hf", is_hf)


def patch_config_reader() -> None:
    # ConfigReader.parameter_sources compares every slice source with the model (pydantic
    # __eq__) for every key and model: O(N^2) per key, 285 s of planning at N = 117. Same
    # result from a per-slice dict, built once.
    from mergekit.config import ConfigReader

    cache: dict = {}

    def parameter_sources(original):
        def wrapper(self, model=None):
            if self.slice_out is None or model is None:
                yield from original(self, model)
                return
            entry = cache.get(id(self.slice_out))
            if entry is None or entry[0] is not self.slice_out:
                by_model: dict = {}
                for source in self.slice_out.sources:
                    by_model.setdefault(source.model, []).append(source.parameters)
                entry = (self.slice_out, by_model)
                if len(cache) > 256:  # one entry per output slice; merges in a loop stay bounded
                    cache.clear()
                cache[id(self.slice_out)] = entry
            yield from entry[1].get(model, ())
            yield self.slice_out.parameters
            if self.module:
                yield self.module.parameters
            yield self.config.parameters

        return wrapper

    _patch(ConfigReader, "parameter_sources", parameter_sources)


def patch_planner() -> None:
    from mergekit.plan import MergePlanner

    from mergekit_sdxl.host.planner import make_plan_tensor

    _patch(MergePlanner, "plan_tensor", make_plan_tensor)


def on_merge_methods_imported() -> None:
    """Hook target: ``mergekit.merge_methods`` finished importing."""
    global _deferred
    if _initializing("mergekit_sdxl.host.methods"):
        # Our methods module imported mergekit first and is itself half-initialised;
        # it calls complete_deferred() once it is complete.
        _deferred = True
        return
    _register_with_mergekit()


def _register_with_mergekit() -> None:
    with _LOCK:
        register_methods()
        register_architecture()
        patch_model_reference()


def on_plan_imported() -> None:
    """Hook target: ``mergekit.plan`` finished importing."""
    with _LOCK:
        patch_planner()
        patch_config_reader()
        patch_card()


def patch_tokenizer_copy() -> None:
    # run_merge copies a tokenizer from the base model after writing the weights; an SDXL
    # checkpoint has none, and mergekit logs the failed attempt with a full traceback.
    merge = sys.modules.get("mergekit.merge")
    if merge is None:
        import mergekit.merge as merge

    from mergekit_sdxl.host.checkpoint import is_checkpoint_file

    def copy_tokenizer(original):
        def wrapper(merge_config, out_path, options=None, **kwargs):
            donor = merge_config.base_model or next(iter(merge_config.referenced_models()), None)
            if donor is not None and donor.lora is None and is_checkpoint_file(donor.model.path):
                LOG.info("%s is an SDXL checkpoint: no tokenizer to copy", donor.model.path)
                return None
            return original(merge_config, out_path, options=options, **kwargs)

        return wrapper

    if hasattr(merge, "_copy_tokenizer"):
        _patch(merge, "_copy_tokenizer", copy_tokenizer)


def on_merge_imported() -> None:
    """Hook target: ``mergekit.merge`` finished importing."""
    with _LOCK:
        patch_tokenizer_copy()


def register_all() -> None:
    """Everything at once, for Python users and our own CLI. Safe to call repeatedly."""
    with _LOCK:
        on_merge_methods_imported()
        on_plan_imported()
        patch_card()
        patch_tokenizer_copy()
