"""SDXL rules for planning a merge in mergekit's graph.

Per output key of an SDXL checkpoint: ``position_ids`` is a constant; the VAE comes from the
base (or the model ``sdxl.vae.source`` names) unless asked to merge; ``logit_scale`` comes from
the base; everything else is merged. A merged key loads through one ``DirectGather`` task (not
N ``LoadTensor`` tasks) and, for this plugin's methods and mergekit's elementwise ones, runs as
a :class:`~mergekit_sdxl.host.tasks.MergeKeyTask` under the merge's memory plan: whole when its
N inputs fit the plan, else in row chunks read from the files.

:class:`SDXLMergePlanner` is the planner ``mergekit-sdxl merge`` drives; the stock
``mergekit-yaml`` gets the same rules through ``host/stock_patches.py``. Other architectures are
planned exactly as mergekit does, except that this plugin's own methods receive their inputs in
the stored dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from mergekit_sdxl.host.architecture import is_sdxl_architecture
from mergekit_sdxl.host.mergekit_api import (
    ConfigReader,
    ExecuteMergeMethodTask,
    ImmutableMap,
    LoaderCache,
    MergePlanner,
    ModelReference,
    WeightInfo,
    dtype_from_name,
    planned_tensors,
    planner_method,
)
from mergekit_sdxl.host.methods import ChunkedMergeMethod
from mergekit_sdxl.host.tasks import DirectGather, DonorTensor, MergeKeyTask, PositionIds
from mergekit_sdxl.kernels.memory_plan import MemoryPlan, compute_dtype_for
from mergekit_sdxl.sdxl.keys import POSITION_IDS_KEY
from mergekit_sdxl.sdxl.manifest import component_of
from mergekit_sdxl.workflow.options import SDXLOptions

LOG = logging.getLogger(__name__)

# mergekit methods that give the same result row chunk by row chunk.
ELEMENTWISE_METHODS = frozenset({"linear", "task_arithmetic", "passthrough"})

PlanTensor = Callable[..., None]


@dataclass(frozen=True)
class SDXLRules:
    """What the SDXL rules need to know of one merge: its ``sdxl:`` options and memory plan."""

    options: SDXLOptions = field(default_factory=SDXLOptions)
    plan: MemoryPlan = field(default_factory=MemoryPlan)


class SDXLMergePlanner(MergePlanner):
    """mergekit's planner with the SDXL rules of one merge (``mergekit-sdxl merge``)."""

    def __init__(self, *args: Any, rules: SDXLRules, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rules = rules
        self._interned: Dict[Any, Any] = {}

    def plan_tensor(
        self, weight: WeightInfo, weights_in: List[WeightInfo], models: List[ModelReference], cfg_reader: ConfigReader
    ) -> None:
        plan_with_rules(self, mergekit_plan_tensor(), weight, weights_in, models, cfg_reader, self.rules, self._interned)


def mergekit_plan_tensor() -> PlanTensor:
    """mergekit's own ``MergePlanner.plan_tensor`` (without the stock-path patch)."""
    from mergekit_sdxl.host.stock_patches import unpatched

    return unpatched(MergePlanner.plan_tensor)


def plan_with_rules(
    planner: Any,
    plan_tensor: PlanTensor,
    weight: WeightInfo,
    weights_in: List[WeightInfo],
    models: List[ModelReference],
    cfg_reader: ConfigReader,
    rules: SDXLRules,
    interned: Dict[Any, Any],
) -> None:
    """Plan one output key: SDXL rules for SDXL checkpoints, mergekit's planning otherwise."""
    ours = isinstance(planner_method(planner), ChunkedMergeMethod)
    if not is_sdxl_architecture(planner.arch_info):
        planned = planned_tensors(planner)
        before = len(planned)
        plan_tensor(planner, weight, weights_in, models, cfg_reader)
        if ours and len(planned) > before:
            w, task = planned[-1]
            planned[-1] = (w, _stored_dtype_inputs(task, planner.config.dtype))
        return
    _plan_sdxl_tensor(planner, plan_tensor, weight, weights_in, models, cfg_reader, rules, ours, interned)


def _stored_dtype_inputs(task: ExecuteMergeMethodTask, dtype: Optional[str]) -> ExecuteMergeMethodTask:
    """Our methods upcast per chunk: load inputs as stored, pass the compute dtype on."""
    gather = task.gather_tensors
    if hasattr(gather, "dtype"):
        gather = gather.model_copy(update={"dtype": None})
    return task.model_copy(update={"gather_tensors": gather, "dtype": dtype})


def _donor(rules: SDXLRules, models: List[ModelReference], base: Optional[ModelReference]) -> ModelReference:
    source = rules.options.vae.source
    if source not in ("base", "merge"):
        return ModelReference.model_validate({"model": {"path": source}})
    return base or models[0]


def _plan_sdxl_tensor(
    planner: Any,
    plan_tensor: PlanTensor,
    weight: WeightInfo,
    weights_in: List[WeightInfo],
    models: List[ModelReference],
    cfg_reader: ConfigReader,
    rules: SDXLRules,
    ours: bool,
    interned: Dict[Any, Any],
) -> None:
    name = weight.name
    base = cfg_reader.base_model
    planned = planned_tensors(planner)
    if name == POSITION_IDS_KEY:
        planned.append((weight, PositionIds(tensor=name)))
        return
    is_vae = component_of(name) == "vae"
    if (is_vae and rules.options.vae.source != "merge") or name.endswith(".logit_scale"):
        donor = _donor(rules, models, base) if is_vae else (base or models[0])
        planned.append((weight, DonorTensor(model=donor, tensor=name, optional=weight.optional)))
        return

    before = len(planned)
    plan_tensor(planner, weight, weights_in, models, cfg_reader)
    if len(planned) == before:
        return  # optional weight absent everywhere
    w, task = planned[-1]
    gather = task.gather_tensors
    direct = DirectGather(
        weight_info=ImmutableMap(data={m: _intern(interned, wi) for m, wi in gather.weight_info.items()}),
        dtype=None if ours else gather.dtype,
        device=gather.device,
    )
    task = task.model_copy(
        update={
            "gather_tensors": direct,
            "dtype": planner.config.dtype if ours else task.dtype,
            "input_parameters": ImmutableMap(
                data={m: _intern_map(interned, p) for m, p in task.input_parameters.items()}
            ),
        }
    )
    planned[-1] = (w, _key_task(planner, task, ours, rules.plan))


# A plan holds one task per key with N per-model WeightInfos and parameter maps; they are equal
# across models (and across keys for the maps), so share one object per value: at N = 117 this
# is most of the plan's memory. The table belongs to one planner.
def _intern(table: Dict[Any, Any], value: Any, key: Any = None) -> Any:
    return table.setdefault(value if key is None else key, value)


def _intern_map(table: Dict[Any, Any], parameters: Any) -> Any:
    try:
        key = ("params", tuple(sorted(parameters.items())))
        hash(key)
    except TypeError:  # an unhashable parameter value: keep this map as it is
        return parameters
    return _intern(table, parameters, key)


def _key_task(planner: Any, task: ExecuteMergeMethodTask, ours: bool, plan: MemoryPlan) -> Any:
    """The task that merges this key: a MergeKeyTask under the plan, or mergekit's own task
    for methods that need whole tensors."""
    elementwise = planner.config.merge_method in ELEMENTWISE_METHODS
    if not ours and not elementwise:
        return task
    name = task.output_weight.name
    shape = None
    for model in task.model_order:
        index = LoaderCache().get(model).index
        if name in getattr(index, "shapes", {}):
            shape = tuple(index.shapes[name])
            break
    if shape is None:
        return task
    configured = dtype_from_name(planner.config.dtype)
    compute = compute_dtype_for(configured) if ours else (configured or torch.float32)
    whole = plan.merge_whole(shape, len(task.model_order), compute)
    if whole and not ours:
        return task  # mergekit runs its elementwise method on the whole tensors itself
    device = planner.options.device if planner.options.device not in (None, "cpu") else None
    return MergeKeyTask(merge=task, plan=plan, shape=shape, from_files=not whole, device=device)
