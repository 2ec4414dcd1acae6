"""Plan a ``mergekit-sdxl merge``: mergekit's planner (with the SDXL rules) -> the output layout.

The planner's public ``plan_to_disk`` gives one ``SaveTensor`` per output key; each becomes an
:class:`~mergekit_sdxl.host.tasks.OutputTensor` target (the key's task, cast to its save dtype)
and an entry of the single output file, laid out in name order.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch

from mergekit_sdxl.errors import InputDataError, UsageError
from mergekit_sdxl.host.architecture import is_sdxl_architecture
from mergekit_sdxl.host.checkpoint import checkpoint_index
from mergekit_sdxl.host.mergekit_api import (
    LoaderCache,
    MergeConfiguration,
    MergeOptions,
    ModelReference,
    SaveTensor,
    dtype_from_name,
    get_architecture_info,
)
from mergekit_sdxl.host.planner import SDXLMergePlanner, SDXLRules
from mergekit_sdxl.host.tasks import DonorTensor, MergeKeyTask, OutputTensor, PositionIds
from mergekit_sdxl.io.writer import TensorEntrySpec
from mergekit_sdxl.sdxl.manifest import POSITION_IDS_SHAPE

LOG = logging.getLogger(__name__)

DEFAULT_OUT_DTYPE = "float16"


@dataclass(frozen=True)
class PlannedMerge:
    """The output file's entries (name order) and the target task of each merged key."""

    entries: List[TensorEntrySpec]
    targets: List[Tuple[str, OutputTensor]]


def plan_merge(config: MergeConfiguration, options: MergeOptions, rules: SDXLRules, input_files: Sequence[str]) -> PlannedMerge:
    """Plan the merge of SDXL checkpoints ``config`` names, under ``rules``."""
    LoaderCache.loaders.clear()  # a class-level cache: loaders of an earlier merge in this process
    loader_cache = LoaderCache()
    loader_cache.setup(options=options)
    arch = get_architecture_info(config, options)
    if not is_sdxl_architecture(arch):
        raise UsageError("mergekit-sdxl merge writes SDXL single files; use mergekit-yaml for other architectures")
    for model in config.referenced_models():
        loader_cache.get(model)
    donor = config.base_model or config.referenced_models()[0]
    # The output is an SDXL checkpoint like its base: the base's config, copied (mergekit sets
    # attributes on the config it is given).
    out_config = copy.deepcopy(donor.config(trust_remote_code=options.trust_remote_code))
    planner = SDXLMergePlanner(config, arch, options=options, out_model_config=out_config, rules=rules)
    saves = [task for task in planner.plan_to_disk(out_path="(streamed by mergekit-sdxl)") if isinstance(task, SaveTensor)]
    return _layout(saves, config.out_dtype or DEFAULT_OUT_DTYPE, agreed_flags(input_files))


def _layout(saves: Sequence[Any], out_dtype: str, flags: Sequence[str]) -> PlannedMerge:
    specs: Dict[str, TensorEntrySpec] = {}
    targets: List[Tuple[str, OutputTensor]] = []
    for save in saves:
        name, task = save.tensor_name, save.tensor_task
        shape = _output_shape(name, task, save.optional)
        if shape is None:
            continue
        dtype = save.dtype or out_dtype
        specs[name] = TensorEntrySpec(name=name, dtype=dtype_from_name(dtype), shape=tuple(shape))
        targets.append((name, OutputTensor(name=name, tensor_task=task, dtype=dtype, optional=save.optional)))
    for flag in flags:
        specs[flag] = TensorEntrySpec(name=flag, dtype=torch.float32, shape=(0,))
    return PlannedMerge(entries=[specs[name] for name in sorted(specs)], targets=targets)


def _output_shape(name: str, task: Any, optional: bool) -> Any:
    """The key's shape in the output, or None for an optional key no input has."""
    if isinstance(task, PositionIds):
        return POSITION_IDS_SHAPE
    if isinstance(task, DonorTensor):
        index = LoaderCache().get(task.model).index
        if name not in index.tensor_paths:
            if optional:
                return None
            raise InputDataError(f"{task.model}: key {name} is missing (needed from that file)")
        return index.shapes[name]
    for model in models_of(task):
        index = LoaderCache().get(model).index
        if name in index.tensor_paths:
            return index.shapes[name]
    return None


def models_of(task: Any) -> Sequence[ModelReference]:
    """The input models a planned key task reads."""
    if isinstance(task, MergeKeyTask):
        return task.merge.model_order
    if isinstance(task, DonorTensor):
        return (task.model,)
    return tuple(getattr(task, "model_order", ()))


def agreed_flags(paths: Sequence[str]) -> List[str]:
    """v_pred/ztsnr markers, kept only when every input carries them."""
    flag_sets = [set(checkpoint_index(p).flags) for p in paths]
    agreed = set.intersection(*flag_sets) if flag_sets else set()
    if any(s != agreed for s in flag_sets):
        LOG.warning("inputs disagree on v_pred/ztsnr markers; the output carries only %s", sorted(agreed) or "none")
    return sorted(agreed)


def expected_read_bytes(targets: Sequence[Tuple[str, OutputTensor]]) -> int:
    """Input bytes the merge of ``targets`` reads, for the progress bar."""
    total = 0
    for name, target in targets:
        for model in models_of(target.tensor_task):
            ranges = getattr(LoaderCache().get(model).index, "byte_ranges", {})
            if name in ranges:
                start, stop = ranges[name]
                total += stop - start
    return total
