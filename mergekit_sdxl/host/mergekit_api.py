"""The seam to mergekit: every mergekit name this plugin uses, in one table, checked at registration.

Every other module of this package gets mergekit's names from here (``from
mergekit_sdxl.host.mergekit_api import MergePlanner``), never from mergekit itself; the import
contract in ``pyproject.toml`` enforces it. :func:`check_mergekit` imports each name, checks the
signatures this plugin overrides or patches and the few private names it still relies on, and
raises :class:`MergekitIncompatible` naming the symbol and the installed mergekit version, so a
mergekit release that renames one fails at registration, not in the middle of a merge.

Names are imported on first use (PEP 562 module ``__getattr__``): the import hook registers the
merge methods as soon as ``mergekit.merge_methods`` is complete, while other mergekit modules
(``mergekit.plan``) may still be half-imported. Imports made here never re-enter the hook.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any, Dict, Iterable, Tuple

from mergekit_sdxl.errors import UserError

# The mergekit releases this plugin was written and tested against (also in pyproject.toml).
SUPPORTED = ">=0.1.5,<0.2"

# Public names: our name -> (mergekit module, attribute).
SYMBOLS: Dict[str, Tuple[str, str]] = {
    # architecture
    "get_architecture_info": ("mergekit.architecture", "get_architecture_info"),
    "WeightInfo": ("mergekit.architecture.base", "WeightInfo"),
    "ModelArchitecture": ("mergekit.architecture.base", "ModelArchitecture"),
    "ModuleArchitecture": ("mergekit.architecture.base", "ModuleArchitecture"),
    "ModuleDefinition": ("mergekit.architecture.base", "ModuleDefinition"),
    "NAME_TO_ARCH": ("mergekit.architecture.json_definitions", "NAME_TO_ARCH"),
    # models, config, options
    "ModelReference": ("mergekit.common", "ModelReference"),
    "ModelPath": ("mergekit.common", "ModelPath"),
    "ImmutableMap": ("mergekit.common", "ImmutableMap"),
    "dtype_from_name": ("mergekit.common", "dtype_from_name"),
    "MergeConfiguration": ("mergekit.config", "MergeConfiguration"),
    "ConfigReader": ("mergekit.config", "ConfigReader"),
    "resolve_parameter": ("mergekit.parameter_resolver", "resolve_parameter"),
    "MergeOptions": ("mergekit.options", "MergeOptions"),
    "add_merge_options": ("mergekit.options", "add_merge_options"),
    # graph and I/O
    "Task": ("mergekit.graph", "Task"),
    "Executor": ("mergekit.graph", "Executor"),
    "LoaderCache": ("mergekit.io.tasks", "LoaderCache"),
    "GatherTensors": ("mergekit.io.tasks", "GatherTensors"),
    "SaveTensor": ("mergekit.io.tasks", "SaveTensor"),
    "LazyTensorLoader": ("mergekit.io.lazy_tensor_loader", "LazyTensorLoader"),
    "ShardedTensorIndex": ("mergekit.io.lazy_tensor_loader", "ShardedTensorIndex"),
    "ShardInfo": ("mergekit.io.lazy_tensor_loader", "ShardInfo"),
    # merge methods
    "get_method": ("mergekit.merge_methods", "get"),
    "register_method": ("mergekit.merge_methods", "register"),
    "registered_methods": ("mergekit.merge_methods", "registered_methods"),
    "BasePolicy": ("mergekit.merge_methods.base", "BasePolicy"),
    "BatchOptions": ("mergekit.merge_methods.base", "BatchOptions"),
    "GroupMergeMethod": ("mergekit.merge_methods.base", "GroupMergeMethod"),
    "InputContract": ("mergekit.merge_methods.base", "InputContract"),
    "MergeMethod": ("mergekit.merge_methods.base", "MergeMethod"),
    "MergeMethodSpec": ("mergekit.merge_methods.base", "MergeMethodSpec"),
    "OptionalTensorPolicy": ("mergekit.merge_methods.base", "OptionalTensorPolicy"),
    "ParameterScope": ("mergekit.merge_methods.base", "ParameterScope"),
    "ParameterSpec": ("mergekit.merge_methods.base", "ParameterSpec"),
    "TensorEntry": ("mergekit.merge_methods.base", "TensorEntry"),
    "TensorGroup": ("mergekit.merge_methods.base", "TensorGroup"),
    "TensorMetadata": ("mergekit.merge_methods.base", "TensorMetadata"),
    "ExecuteMergeMethodTask": ("mergekit.merge_methods.task_adapter", "ExecuteMergeMethodTask"),
    # mergekit's own method code the budgeted built-ins run on row chunks (host/budgeted_methods.py)
    "GeneralizedTaskArithmeticMerge": (
        "mergekit.merge_methods.generalized_task_arithmetic",
        "GeneralizedTaskArithmeticMerge",
    ),
    "sign_consensus_mask": ("mergekit.merge_methods.generalized_task_arithmetic", "get_mask"),
    "SparsificationMethod": ("mergekit.sparsify", "SparsificationMethod"),
    "sparsify": ("mergekit.sparsify", "sparsify"),
    # planning
    "MergePlanner": ("mergekit.plan", "MergePlanner"),
}

# Methods this plugin overrides (subclasses) or wraps (stock_patches): (our name of the owner,
# attribute, the parameter names it must accept). A rename or a new required parameter in
# mergekit is caught here.
SIGNATURES: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = (
    ("MergePlanner", "plan_tensor", ("self", "weight", "weights_in", "models", "cfg_reader")),
    ("MergePlanner", "plan_to_disk", ("self", "out_path")),
    ("ModelReference", "config", ("self", "trust_remote_code")),
    ("ModelReference", "tensor_index", ("self", "cache_dir")),
    ("ModelReference", "lazy_loader", ("self", "cache_dir", "lazy_unpickle")),
    ("ModelReference", "merged", ("self", "cache_dir", "trust_remote_code", "lora_merge_dtype")),
    ("ConfigReader", "parameter_sources", ("self", "model")),
    ("GroupMergeMethod", "_execute", ("self", "groups", "parameters", "options", "input_dtypes", "out_dtype")),
    ("Executor", "run", ("self", "quiet", "desc")),
    ("LazyTensorLoader", "get_tensor", ("self", "key", "device", "aliases", "raise_on_missing")),
)

# Module-level functions the stock ``mergekit-yaml`` path wraps (host/stock_patches.py).
PATCHED_FUNCTIONS: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = (
    ("mergekit.card", "is_hf", ("path",)),
    ("mergekit.merge", "_copy_tokenizer", ("merge_config", "out_path", "options")),
)

# Private names still relied on, each with why and what upstream change would remove it.
PRIVATE_NAMES: Tuple[Tuple[str, str, str], ...] = (
    (
        "MergePlanner._tensors",
        "plan_tensor appends its (weight, task) here; the SDXL planner replaces the task it just planned",
        "a plan_tensor that returns the task instead of appending it",
    ),
    (
        "MergePlanner._method",
        "the planner's resolved merge method, to tell this plugin's methods from mergekit's",
        "a public MergePlanner.method property",
    ),
)


class MergekitIncompatible(UserError):
    """The installed mergekit lacks or changed a name this plugin uses."""


def mergekit_version() -> str:
    """The installed mergekit's version string ("unknown" when it has no metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergekit")
    except PackageNotFoundError:
        return "unknown"


def _incompatible(what: str) -> MergekitIncompatible:
    return MergekitIncompatible(
        f"mergekit {mergekit_version()}: {what}; mergekit-sdxl supports mergekit {SUPPORTED} "
        "(install a supported mergekit, or set MERGEKIT_SDXL_DISABLE=1 to run mergekit without this plugin)"
    )


def _resolve(name: str) -> Any:
    module_name, attribute = SYMBOLS[name]
    from mergekit_sdxl._hook import suppressed

    try:
        with suppressed():  # our own import of mergekit must not re-enter the registration hook
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise _incompatible(f"cannot import {module_name} ({error})") from error
    try:
        return getattr(module, attribute)
    except AttributeError as error:
        raise _incompatible(f"{module_name}.{attribute} is missing") from error


def __getattr__(name: str) -> Any:
    if name not in SYMBOLS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _resolve(name)
    globals()[name] = value
    return value


def _check_parameters(owner: str, function: Any, expected: Iterable[str]) -> None:
    try:
        accepted = set(inspect.signature(function).parameters)
    except (TypeError, ValueError) as error:
        raise _incompatible(f"{owner} has no inspectable signature") from error
    missing = [p for p in expected if p not in accepted]
    if missing:
        raise _incompatible(f"{owner} no longer takes {', '.join(missing)}")


def check_mergekit() -> None:
    """Import every name of :data:`SYMBOLS` and check :data:`SIGNATURES` and
    :data:`PATCHED_FUNCTIONS`; raise :class:`MergekitIncompatible` on the first mismatch."""
    for name in SYMBOLS:
        __getattr__(name)
    for owner, attribute, parameters in SIGNATURES:
        cls = __getattr__(owner)
        function = getattr(cls, attribute, None)
        if function is None:
            raise _incompatible(f"{SYMBOLS[owner][0]}.{owner}.{attribute} is missing")
        _check_parameters(f"{owner}.{attribute}", inspect.unwrap(function), parameters)
    from mergekit_sdxl._hook import suppressed

    for module_name, attribute, parameters in PATCHED_FUNCTIONS:
        with suppressed():
            module = importlib.import_module(module_name)
        function = getattr(module, attribute, None)
        if function is None:
            raise _incompatible(f"{module_name}.{attribute} is missing")
        _check_parameters(f"{module_name}.{attribute}", inspect.unwrap(function), parameters)


def patched_module(module_name: str) -> Any:
    """A mergekit module whose function a stock-path patch wraps (see :data:`PATCHED_FUNCTIONS`)."""
    if module_name not in {module for module, _, _ in PATCHED_FUNCTIONS}:
        raise ValueError(f"{module_name} is not listed in PATCHED_FUNCTIONS")
    from mergekit_sdxl._hook import suppressed

    with suppressed():
        return importlib.import_module(module_name)


def planned_tensors(planner: Any) -> list:
    """The planner's list of planned ``(WeightInfo, Task)`` pairs (see :data:`PRIVATE_NAMES`)."""
    tensors = getattr(planner, "_tensors", None)
    if not isinstance(tensors, list):
        raise _incompatible("MergePlanner._tensors is not the list of planned tensors any more")
    return tensors


def planner_method(planner: Any) -> Any:
    """The merge method a planner resolved from the config (see :data:`PRIVATE_NAMES`)."""
    method = getattr(planner, "_method", None)
    if method is None:
        raise _incompatible("MergePlanner._method is missing")
    return method


if TYPE_CHECKING:  # the names as the type checker sees them
    from mergekit.architecture import get_architecture_info as get_architecture_info
    from mergekit.architecture.base import ModelArchitecture as ModelArchitecture
    from mergekit.architecture.base import ModuleArchitecture as ModuleArchitecture
    from mergekit.architecture.base import ModuleDefinition as ModuleDefinition
    from mergekit.architecture.base import WeightInfo as WeightInfo
    from mergekit.architecture.json_definitions import NAME_TO_ARCH as NAME_TO_ARCH
    from mergekit.common import ImmutableMap as ImmutableMap
    from mergekit.common import ModelPath as ModelPath
    from mergekit.common import ModelReference as ModelReference
    from mergekit.common import dtype_from_name as dtype_from_name
    from mergekit.config import ConfigReader as ConfigReader
    from mergekit.config import MergeConfiguration as MergeConfiguration
    from mergekit.graph import Executor as Executor
    from mergekit.graph import Task as Task
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader as LazyTensorLoader
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex as ShardedTensorIndex
    from mergekit.io.lazy_tensor_loader import ShardInfo as ShardInfo
    from mergekit.io.tasks import GatherTensors as GatherTensors
    from mergekit.io.tasks import LoaderCache as LoaderCache
    from mergekit.io.tasks import SaveTensor as SaveTensor
    from mergekit.merge_methods import get as get_method  # noqa: F401 - renamed re-export (SYMBOLS)
    from mergekit.merge_methods import register as register_method  # noqa: F401 - renamed re-export
    from mergekit.merge_methods import registered_methods as registered_methods
    from mergekit.merge_methods.base import BasePolicy as BasePolicy
    from mergekit.merge_methods.base import BatchOptions as BatchOptions
    from mergekit.merge_methods.base import GroupMergeMethod as GroupMergeMethod
    from mergekit.merge_methods.base import InputContract as InputContract
    from mergekit.merge_methods.base import MergeMethod as MergeMethod
    from mergekit.merge_methods.base import MergeMethodSpec as MergeMethodSpec
    from mergekit.merge_methods.base import OptionalTensorPolicy as OptionalTensorPolicy
    from mergekit.merge_methods.base import ParameterScope as ParameterScope
    from mergekit.merge_methods.base import ParameterSpec as ParameterSpec
    from mergekit.merge_methods.base import TensorEntry as TensorEntry
    from mergekit.merge_methods.base import TensorGroup as TensorGroup
    from mergekit.merge_methods.base import TensorMetadata as TensorMetadata
    from mergekit.merge_methods.generalized_task_arithmetic import (
        GeneralizedTaskArithmeticMerge as GeneralizedTaskArithmeticMerge,
    )
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask as sign_consensus_mask  # noqa: F401
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask as ExecuteMergeMethodTask
    from mergekit.options import MergeOptions as MergeOptions
    from mergekit.options import add_merge_options as add_merge_options
    from mergekit.parameter_resolver import resolve_parameter as resolve_parameter
    from mergekit.plan import MergePlanner as MergePlanner
    from mergekit.sparsify import SparsificationMethod as SparsificationMethod
    from mergekit.sparsify import sparsify as sparsify
