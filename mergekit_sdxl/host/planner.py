"""SDXL rules inside ``MergePlanner.plan_tensor``.

For SDXL checkpoints, per output key: ``position_ids`` is a constant; the VAE
comes from the base (or the model ``sdxl.vae.source`` names) unless asked to
merge; ``logit_scale`` comes from the base; everything else is merged. Merged
keys load through one ``DirectGather`` task (not N ``LoadTensor`` tasks), and a
key whose N inputs exceed the memory budget becomes a ``ChunkedMergeTask``.
Other architectures are planned exactly as mergekit does, except that this
plugin's own methods receive inputs in their stored dtype.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, List, Optional

from mergekit.architecture import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.config import ConfigReader

from mergekit_sdxl.workflow.options import SDXLOptions

LOG = logging.getLogger(__name__)

# Elementwise mergekit methods that give the same result row chunk by row chunk.
ELEMENTWISE_METHODS = frozenset({"linear", "task_arithmetic", "passthrough"})

_state = threading.local()


def current_options() -> SDXLOptions:
    """Options of the merge being planned (defaults under the stock ``mergekit-yaml``)."""
    return getattr(_state, "options", None) or SDXLOptions()


class planning_options:
    """Context manager: plan with these SDXL options in this thread."""

    def __init__(self, options: SDXLOptions):
        self.options = options

    def __enter__(self) -> SDXLOptions:
        self._previous = getattr(_state, "options", None)
        _state.options = self.options
        return self.options

    def __exit__(self, *exc) -> None:
        _state.options = self._previous


def _donor(options: SDXLOptions, models: List[ModelReference], base: Optional[ModelReference]) -> ModelReference:
    source = options.vae.source
    if source not in ("base", "merge"):
        return ModelReference.model_validate({"model": {"path": source}})
    return base or models[0]


def make_plan_tensor(original: Callable) -> Callable:
    def plan_tensor(self, weight: WeightInfo, weights_in: List[WeightInfo], models: List[ModelReference], cfg_reader: ConfigReader):
        from mergekit_sdxl.host.architecture import is_sdxl_architecture
        from mergekit_sdxl.host.methods import ChunkedMergeMethod

        method = self._method
        ours = isinstance(method, ChunkedMergeMethod)
        if not is_sdxl_architecture(self.arch_info):
            before = len(self._tensors)
            original(self, weight, weights_in, models, cfg_reader)
            if ours and len(self._tensors) > before:
                w, task = self._tensors[-1]
                self._tensors[-1] = (w, _stored_dtype_inputs(task, self.config.dtype))
            return
        return _plan_sdxl_tensor(self, original, weight, weights_in, models, cfg_reader, ours)

    return plan_tensor


def _stored_dtype_inputs(task, dtype: Optional[str]):
    """Our methods upcast per chunk: load inputs as stored, pass the compute dtype on."""
    gather = task.gather_tensors
    if hasattr(gather, "dtype"):
        gather = gather.model_copy(update={"dtype": None})
    return task.model_copy(update={"gather_tensors": gather, "dtype": dtype})


def _plan_sdxl_tensor(planner, original, weight, weights_in, models, cfg_reader, ours: bool) -> None:
    from mergekit_sdxl.host.checkpoint import POSITION_IDS_KEY
    from mergekit_sdxl.host.tasks import DirectGather, DonorTensor, PositionIds
    from mergekit_sdxl.sdxl.manifest import component_of

    options = current_options()
    name = weight.name
    base = cfg_reader.base_model
    if name == POSITION_IDS_KEY:
        planner._tensors.append((weight, PositionIds(tensor=name)))
        return
    take_from_donor = (component_of(name) == "vae" and options.vae.source != "merge") or name.endswith(".logit_scale")
    if take_from_donor:
        donor = _donor(options, models, base) if component_of(name) == "vae" else (base or models[0])
        planner._tensors.append((weight, DonorTensor(model=donor, tensor=name, optional=weight.optional)))
        return

    before = len(planner._tensors)
    original(planner, weight, weights_in, models, cfg_reader)
    if len(planner._tensors) == before:
        return  # optional weight absent everywhere
    w, task = planner._tensors[-1]
    gather = task.gather_tensors
    direct = DirectGather(
        weight_info=ImmutableMap(data={m: _interned(wi) for m, wi in gather.weight_info.items()}),
        dtype=None if ours else gather.dtype,
        device=gather.device,
    )
    task = task.model_copy(
        update={
            "gather_tensors": direct,
            "dtype": planner.config.dtype if ours else task.dtype,
            "input_parameters": ImmutableMap(
                data={m: _interned_map(p) for m, p in task.input_parameters.items()}
            ),
        }
    )
    chunked = _maybe_chunked(planner, task, ours, options)
    planner._tensors[-1] = (w, chunked or task)


# A plan holds one task per key with N per-model WeightInfos and parameter maps; they are
# equal across models (and across keys for the maps), so share one object per value: at
# N = 117 this is most of the plan's memory.
_INTERNED: dict = {}


def _interned(value, key=None):
    """The shared object equal to ``value`` (looked up by ``key``, default the value itself)."""
    if len(_INTERNED) > 200_000:
        _INTERNED.clear()
    return _INTERNED.setdefault(value if key is None else key, value)


def _interned_map(parameters):
    try:
        key = ("params", tuple(sorted(parameters.items())))
        hash(key)
    except TypeError:  # an unhashable parameter value: keep this map as it is
        return parameters
    return _interned(parameters, key)


def _maybe_chunked(planner, task, ours: bool, options: SDXLOptions):
    import torch
    from mergekit.common import dtype_from_name
    from mergekit.io.tasks import LoaderCache

    from mergekit_sdxl.host.methods import compute_dtype_for, rows_per_chunk
    from mergekit_sdxl.host.tasks import ChunkedMergeTask

    if not ours and planner.config.merge_method not in ELEMENTWISE_METHODS:
        return None
    name = task.output_weight.name
    shape = None
    for model in task.model_order:
        index = LoaderCache().get(model).index
        if name in getattr(index, "shapes", {}):
            shape = index.shapes[name]
            break
    if shape is None:
        return None
    compute = compute_dtype_for(dtype_from_name(planner.config.dtype)) if ours else (dtype_from_name(planner.config.dtype) or torch.float32)
    itemsize = torch.finfo(compute).bits // 8 if compute.is_floating_point else 8
    numel = 1
    for dim in shape:
        numel *= dim
    n = len(task.model_order)
    # Whole-tensor working set: N inputs upcast, plus about 3 more copies for masks and sums;
    # half the budget, the rest is for the N stored inputs, the output and allocator slack.
    budget = options.memory_budget_bytes
    if numel * itemsize * (n + 3) <= budget // 2:
        return None
    rows = rows_per_chunk(shape, n, compute, chunk_bytes=budget // 4)
    device = planner.options.device if planner.options.device not in (None, "cpu") else None
    return ChunkedMergeTask(merge=task, rows_per_chunk=rows, shape=tuple(shape), device=device)
