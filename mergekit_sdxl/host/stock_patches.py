"""The patches the stock ``mergekit-yaml`` still needs, each with its reason and the upstream
change that would remove it. ``mergekit-sdxl merge`` drives its own planner subclass and needs
only the input routing and the two planning speed-ups.

Each patch wraps one mergekit name listed in ``host/mergekit_api.py`` (checked at
registration), is applied once (idempotent) and leaves every other path to mergekit.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Dict

from mergekit_sdxl.host.mergekit_api import patched_module

LOG = logging.getLogger(__name__)

_ORIGINAL = "_mergekit_sdxl_original"


def _patch(owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    current = getattr(owner, name)
    if getattr(current, _ORIGINAL, None) is not None:
        return
    replacement = make(current)
    functools.update_wrapper(replacement, current)
    setattr(replacement, _ORIGINAL, current)
    setattr(owner, name, replacement)


def unpatched(function: Callable) -> Callable:
    """mergekit's own function behind one of these patches (the function itself if unpatched)."""
    return getattr(function, _ORIGINAL, function)


def route_checkpoint_files() -> None:
    """``.safetensors`` single files as mergekit models, and LoRA files on them as virtual models.

    Why: ``ModelReference.config`` wants a ``config.json`` and ``tensor_index``/``lazy_loader``
    want a model directory; an SDXL checkpoint is one file. ``ModelReference.merged`` would merge
    a LoRA into a whole model on disk with PEFT; a LoRA on a checkpoint is read per key instead
    (``host/lora_model.py``). Upstream: a registry of model loaders keyed by path (or an entry
    point for ``ModelReference`` resolvers).
    """
    from mergekit_sdxl.host.checkpoint import (
        SDXLCheckpointLoader,
        checkpoint_config,
        checkpoint_index,
        is_checkpoint_file,
    )
    from mergekit_sdxl.host.lora_model import (
        is_lora_reference,
        lora_model_config,
        lora_model_index,
        lora_model_loader,
    )
    from mergekit_sdxl.host.mergekit_api import ModelReference

    def config(original: Callable) -> Callable:
        def wrapper(self: Any, trust_remote_code: bool = False) -> Any:
            if self.lora is None and is_checkpoint_file(self.model.path):
                return checkpoint_config(self.model.path)
            if is_lora_reference(self):
                return lora_model_config(self)
            return original(self, trust_remote_code=trust_remote_code)

        return wrapper

    def tensor_index(original: Callable) -> Callable:
        def wrapper(self: Any, cache_dir: Any = None) -> Any:
            if self.lora is None and is_checkpoint_file(self.model.path):
                return checkpoint_index(self.model.path)
            if is_lora_reference(self):
                return lora_model_index(self)
            return original(self, cache_dir)

        return wrapper

    def lazy_loader(original: Callable) -> Callable:
        def wrapper(self: Any, cache_dir: Any = None, lazy_unpickle: bool = True) -> Any:
            if self.lora is None and is_checkpoint_file(self.model.path):
                return SDXLCheckpointLoader(checkpoint_index(self.model.path))
            if is_lora_reference(self):
                return lora_model_loader(self)
            return original(self, cache_dir=cache_dir, lazy_unpickle=lazy_unpickle)

        return wrapper

    # A LoRA on a checkpoint file is a virtual model (host/lora_model.py): base + the LoRA's change
    # computed per key and row chunk, never merged into a whole model on disk with PEFT.
    def merged(original: Callable) -> Callable:
        def wrapper(self: Any, cache_dir: Any = None, trust_remote_code: bool = False, lora_merge_dtype: Any = None) -> Any:
            if is_lora_reference(self):
                return self
            return original(self, cache_dir=cache_dir, trust_remote_code=trust_remote_code, lora_merge_dtype=lora_merge_dtype)

        return wrapper

    _patch(ModelReference, "config", config)
    _patch(ModelReference, "tensor_index", tensor_index)
    _patch(ModelReference, "lazy_loader", lazy_loader)
    _patch(ModelReference, "merged", merged)


def index_parameter_sources() -> None:
    """Parameter lookup in O(1) per model.

    Why: ``ConfigReader.parameter_sources`` compares every slice source with the model (pydantic
    ``__eq__``) for every key and model: O(N^2) per key, 285 s of planning at N = 117. The same
    result from a per-slice dict, built once. Upstream: index ``OutputSliceDefinition.sources``
    by model.
    """
    from mergekit_sdxl.host.mergekit_api import ConfigReader

    def parameter_sources(original: Callable) -> Callable:
        by_slice: Dict[int, Any] = {}

        def wrapper(self: Any, model: Any = None) -> Any:
            if self.slice_out is None or model is None:
                yield from original(self, model)
                return
            entry = by_slice.get(id(self.slice_out))
            if entry is None or entry[0] is not self.slice_out:
                by_model: Dict[Any, list] = {}
                for source in self.slice_out.sources:
                    by_model.setdefault(source.model, []).append(source.parameters)
                entry = (self.slice_out, by_model)
                if len(by_slice) > 256:  # one entry per output slice; merges in a loop stay bounded
                    by_slice.clear()
                by_slice[id(self.slice_out)] = entry
            yield from entry[1].get(model, ())
            yield self.slice_out.parameters
            if self.module:
                yield self.module.parameters
            yield self.config.parameters

        return wrapper

    _patch(ConfigReader, "parameter_sources", parameter_sources)


# id(model reference) -> (the reference, its hash): a reference is frozen, so its hash never
# changes. Bounded: cleared when full (a merge holds one reference per input, a few per LoRA).
_HASHES: Dict[int, Any] = {}
_HASHES_MAX = 1 << 16


def fast_model_references() -> None:
    """``ModelReference`` and ``ModelPath``: hash computed once per object, identity checked first.

    Why: pydantic recomputes a frozen model's hash from its fields on every call (three nested
    models per reference) and compares field dicts even for the same object. mergekit's planner
    and executor hash and compare model references per key, model and parameter: millions of
    calls at N = 100-1000 (most of the planning time at 300 LoRAs). Same results: equal objects
    have equal hashes, so different hashes mean unequal. Upstream: cache the hash in
    ``ModelReference`` (a private attribute) and test identity first in ``__eq__``.
    """
    from mergekit_sdxl.host.mergekit_api import ModelPath, ModelReference

    def cached_hash(original: Callable) -> Callable:
        def wrapper(self: Any) -> int:
            entry = _HASHES.get(id(self))
            if entry is not None and entry[0] is self:
                return int(entry[1])
            value = original(self)
            if len(_HASHES) >= _HASHES_MAX:
                _HASHES.clear()
            _HASHES[id(self)] = (self, value)
            return int(value)

        return wrapper

    def identity_first(original: Callable) -> Callable:
        def wrapper(self: Any, other: Any) -> Any:
            if self is other:
                return True
            if type(other) is type(self):
                mine, theirs = _HASHES.get(id(self)), _HASHES.get(id(other))
                if (
                    mine is not None
                    and theirs is not None
                    and mine[0] is self
                    and theirs[0] is other
                    and mine[1] != theirs[1]
                ):
                    return False
            return original(self, other)

        return wrapper

    for cls in (ModelPath, ModelReference):
        _patch(cls, "__hash__", cached_hash)
        _patch(cls, "__eq__", identity_first)


def plan_sdxl_rules() -> None:
    """The SDXL planning rules (``host/planner.py``) for the stock ``MergePlanner``.

    Why: mergekit plans every architecture with one ``MergePlanner``; ``mergekit-yaml`` has no
    way to use :class:`~mergekit_sdxl.host.planner.SDXLMergePlanner`. The stock path gets the
    default rules (VAE from the base, the default memory budget). Upstream: a planner factory
    per architecture. :class:`SDXLMergePlanner` itself is left alone.
    """
    from mergekit_sdxl.host.mergekit_api import MergePlanner
    from mergekit_sdxl.host.planner import SDXLMergePlanner, SDXLRules, plan_with_rules
    from mergekit_sdxl.kernels.memory_plan import MemoryPlan
    from mergekit_sdxl.workflow.options import SDXLOptions, default_memory_budget

    def plan_tensor(original: Callable) -> Callable:
        def wrapper(self: Any, weight: Any, weights_in: Any, models: Any, cfg_reader: Any) -> None:
            if isinstance(self, SDXLMergePlanner):
                return original(self, weight, weights_in, models, cfg_reader)
            rules = SDXLRules(
                options=SDXLOptions(),
                plan=MemoryPlan(budget_bytes=default_memory_budget(), adjust_threads=not self.options.multi_gpu),
            )
            state = self.__dict__.setdefault("_mergekit_sdxl_planning_state", {})
            plan_with_rules(self, original, weight, weights_in, models, cfg_reader, rules, state)
            return None

        return wrapper

    _patch(MergePlanner, "plan_tensor", plan_tensor)


def local_paths_are_not_hub_repos() -> None:
    """No Hub lookup for local files when writing the model card.

    Why: ``mergekit.card.is_hf`` asks the Hub about any relative path with one "/"; offline
    that crashes after the weights are written. Upstream: test ``os.path.exists`` first.
    """
    card = patched_module("mergekit.card")

    def is_hf(original: Callable) -> Callable:
        def wrapper(path: str) -> bool:
            if os.path.exists(path):
                return False
            return bool(original(path))

        return wrapper

    _patch(card, "is_hf", is_hf)


def no_tokenizer_for_checkpoints() -> None:
    """No tokenizer copy from an SDXL checkpoint.

    Why: ``run_merge`` copies a tokenizer from the base model after writing the weights; an
    SDXL checkpoint has none, and mergekit logs the failed attempt with a full traceback.
    Upstream: skip the copy when the donor has no tokenizer files (or per architecture).
    """
    merge = patched_module("mergekit.merge")
    from mergekit_sdxl.host.checkpoint import is_checkpoint_file

    def copy_tokenizer(original: Callable) -> Callable:
        def wrapper(merge_config: Any, out_path: str, options: Any = None, **kwargs: Any) -> Any:
            donor = merge_config.base_model or next(iter(merge_config.referenced_models()), None)
            if donor is not None and is_checkpoint_file(donor.model.path):  # a LoRA on it included
                LOG.info("%s is an SDXL checkpoint: no tokenizer to copy", donor.model.path)
                return None
            return original(merge_config, out_path, options=options, **kwargs)

        return wrapper

    _patch(merge, "_copy_tokenizer", copy_tokenizer)
