"""SDXL rules for planning a merge in mergekit's graph.

Per output key of an SDXL checkpoint: ``position_ids`` is a constant; the VAE comes from the
base (or the model ``sdxl.vae.source`` names) unless asked to merge; ``logit_scale`` comes from
the base; everything else is merged. A merged key loads through one ``DirectGather`` task (not
N ``LoadTensor`` tasks) and, for this plugin's methods and mergekit's elementwise ones, runs as
a :class:`~mergekit_sdxl.host.tasks.MergeKeyTask` under the merge's memory plan: whole when its
N inputs fit the plan, else in row chunks read from the files.

A component named under ``sdxl.components`` (unet, clip_l, clip_g) is planned apart: its keys
are copied from one model, or planned by a second planner over a configuration of its own (that
component's method, parameters and models; base, dtype and out_dtype the config's), under the same
rules.

:class:`SDXLMergePlanner` is the planner ``mergekit-sdxl merge`` drives; the stock
``mergekit-yaml`` gets the same rules through ``host/stock_patches.py`` (with default ``sdxl:``
options). Other architectures are planned exactly as mergekit does, except that this plugin's own
methods receive their inputs in the stored dtype.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.host.architecture import is_sdxl_architecture
from mergekit_sdxl.host.budgeted_methods import ELEMENTWISE, budgeted, statistics_bytes_per_element
from mergekit_sdxl.host.key_tasks import KeyTaskBuilder
from mergekit_sdxl.host.mergekit_api import (
    ConfigReader,
    ExecuteMergeMethodTask,
    LoaderCache,
    MergeConfiguration,
    MergePlanner,
    ModelReference,
    WeightInfo,
    dtype_from_name,
    planned_tensors,
    planner_method,
)
from mergekit_sdxl.host.methods import ChunkedMergeMethod
from mergekit_sdxl.host.tasks import DonorTensor, MergeKeyTask, PositionIds
from mergekit_sdxl.kernels.memory_plan import MemoryPlan, compute_dtype_for
from mergekit_sdxl.sdxl.dtypes import dtype_size
from mergekit_sdxl.sdxl.keys import POSITION_IDS_KEY
from mergekit_sdxl.sdxl.manifest import component_of
from mergekit_sdxl.workflow.options import SDXLOptions

LOG = logging.getLogger(__name__)

# mergekit methods that give the same result row chunk by row chunk.
ELEMENTWISE_METHODS = ELEMENTWISE

PlanTensor = Callable[..., None]


@dataclass(frozen=True)
class SDXLRules:
    """What the SDXL rules need to know of one merge: its ``sdxl:`` options and memory plan."""

    options: SDXLOptions = field(default_factory=SDXLOptions)
    plan: MemoryPlan = field(default_factory=MemoryPlan)
    # merge --report: mergekit's elementwise methods run in a MergeKeyTask even when the key fits
    # (the same bytes), so that the report sees their reads (host/merge_report.py).
    report: bool = False


class SDXLMergePlanner(MergePlanner):
    """mergekit's planner with the SDXL rules of one merge (``mergekit-sdxl merge``).

    Components named in ``sdxl.components`` are planned apart: copied from one model
    (:class:`DonorTensor`), or merged by a planner of their own, built from a configuration with
    that component's method, parameters and models (mergekit's ``merge_method`` is global).
    """

    def __init__(self, *args: Any, rules: SDXLRules, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rules = rules
        self._planning_state: Dict[Any, Any] = {}
        self._components: Dict[str, _ComponentPlan] = _component_plans(self, rules)

    def plan_tensor(
        self, weight: WeightInfo, weights_in: List[WeightInfo], models: List[ModelReference], cfg_reader: ConfigReader
    ) -> None:
        component = self._components.get(component_of(weight.name) or "")
        if component is not None and weight.name != POSITION_IDS_KEY:
            component.plan(self, weight, weights_in, models, cfg_reader)
            return
        plan_with_rules(self, mergekit_plan_tensor(), weight, weights_in, models, cfg_reader, self.rules, self._planning_state)


@dataclass(frozen=True)
class _ComponentPlan:
    """The keys of one ``sdxl.components`` entry: a copy from ``donor``, or ``planner``'s merge."""

    name: str
    donor: Optional[ModelReference] = None
    planner: Optional[SDXLMergePlanner] = None

    def plan(
        self,
        owner: SDXLMergePlanner,
        weight: WeightInfo,
        weights_in: List[WeightInfo],
        models: List[ModelReference],
        cfg_reader: ConfigReader,
    ) -> None:
        planned = planned_tensors(owner)
        if self.donor is not None:
            planned.append((weight, DonorTensor(model=self.donor, tensor=weight.name, optional=weight.optional)))
            return
        sub = self.planner
        assert sub is not None
        module = sub.config.modules[self.name]
        out_slice = module.slices[0]
        sub_models = [source.model for source in out_slice.sources]
        by_model = dict(zip(models, weights_in, strict=True))
        reader = ConfigReader(config=sub.config, t=cfg_reader.t, slice_out=out_slice, module=module)
        sub_planned = planned_tensors(sub)
        before = len(sub_planned)
        sub.plan_tensor(weight, [by_model[m] for m in sub_models], sub_models, reader)
        if len(sub_planned) > before:
            planned.append(sub_planned.pop())


def _identity(ref: ModelReference) -> Tuple[str, Optional[str]]:
    # One file however its path is spelled (as the config checks compare inputs).
    return os.path.realpath(ref.model.path), str(ref.lora) if ref.lora is not None else None


def _component_inputs(config: Any, name: str) -> Optional[List[Any]]:
    """The config's model entries (InputModelDefinition) that feed component ``name``; None when the
    config plans no such module."""
    if config.models:
        return list(config.models)
    module = (config.modules or {}).get(name)
    if module is None:
        return None
    if not module.models:
        raise UsageError(f"sdxl.components.{name}: needs the models of modules.{name} listed under models:, not slices:")
    return list(module.models)


def _find_input(text: Any, where: str, inputs: List[Any], base: Optional[ModelReference]) -> ModelReference:
    """The config's own reference to the model ``text`` names (a path or a reference mapping)."""
    wanted = _identity(ModelReference.model_validate(text))
    for ref in [entry.model for entry in inputs] + ([base] if base is not None else []):
        if _identity(ref) == wanted:
            return ref
    raise UsageError(f"{where}: {text} is not one of the models of this merge; list it under models: first")


def _component_plans(planner: Any, rules: SDXLRules) -> Dict[str, _ComponentPlan]:
    plans: Dict[str, _ComponentPlan] = {}
    config = planner.config
    for name, section in rules.options.components.items():
        inputs = _component_inputs(config, name)
        if inputs is None:
            continue
        where = f"sdxl.components.{name}"
        if section.source is not None:
            if section.source == "base":
                if config.base_model is None:
                    raise UsageError(f"{where}.source: base, but the config has no base_model")
                donor = config.base_model
            else:
                donor = _find_input(section.source, f"{where}.source", inputs, config.base_model)
            plans[name] = _ComponentPlan(name=name, donor=donor)
            continue
        if section.models is None:
            models = [{"model": entry.model} for entry in inputs]
        else:
            models = [
                {"model": _find_input(m.model, f"{where}.models[{i}]", inputs, None), "parameters": m.parameters}
                for i, m in enumerate(section.models)
            ]
        sub_config = MergeConfiguration.model_validate(
            {
                "merge_method": section.merge_method or config.merge_method,
                "base_model": config.base_model,
                "models": models,
                "parameters": section.parameters,
                "dtype": config.dtype,
                "out_dtype": config.out_dtype,
            }
        )
        sub_rules = SDXLRules(options=rules.options.model_copy(update={"components": {}}), plan=rules.plan)
        sub = SDXLMergePlanner(
            sub_config, planner.arch_info, options=planner.options, out_model_config=planner.out_model_config, rules=sub_rules
        )
        sub.normalize_config()  # mergekit's own input checks for this method, and the slices planned from
        plans[name] = _ComponentPlan(name=name, planner=sub)
    return plans


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
    state: Dict[Any, Any],
) -> None:
    """Plan one output key: SDXL rules for SDXL checkpoints, mergekit's planning otherwise.

    ``state`` belongs to ``planner`` and lasts for its whole plan (it holds the key-task builder
    and its caches, ``host/key_tasks.py``)."""
    ours = isinstance(planner_method(planner), ChunkedMergeMethod)
    if not is_sdxl_architecture(planner.arch_info):
        planned = planned_tensors(planner)
        before = len(planned)
        plan_tensor(planner, weight, weights_in, models, cfg_reader)
        if ours and len(planned) > before:
            w, task = planned[-1]
            planned[-1] = (w, _stored_dtype_inputs(task, planner.config.dtype))
        return
    _plan_sdxl_tensor(planner, weight, weights_in, models, cfg_reader, rules, ours, state)


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
    weight: WeightInfo,
    weights_in: List[WeightInfo],
    models: List[ModelReference],
    cfg_reader: ConfigReader,
    rules: SDXLRules,
    ours: bool,
    state: Dict[Any, Any],
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

    builder = state.get(KeyTaskBuilder)
    if builder is None:
        device = planner.options.device if planner.options.read_to_gpu else None
        # Our methods upcast per chunk: their inputs load as stored, the compute dtype goes on.
        builder = state[KeyTaskBuilder] = KeyTaskBuilder(
            planner_method(planner), dtype=None if ours else planner.config.dtype, device=device
        )
    task = builder.build(weight, weights_in, models, cfg_reader)
    if task is None:
        return  # optional weight absent everywhere
    if ours:
        task = task.model_copy(update={"dtype": planner.config.dtype})
    planned.append((weight, _key_task(planner, task, ours, rules.plan, rules.report)))


def _key_task(planner: Any, task: ExecuteMergeMethodTask, ours: bool, plan: MemoryPlan, report: bool = False) -> Any:
    """The task that merges this key: a MergeKeyTask under the plan (this plugin's methods;
    mergekit's elementwise ones when the key does not fit; under a budget, mergekit's built-ins
    with per-tensor statistics, host/budgeted_methods.py), or mergekit's own task."""
    elementwise = planner.config.merge_method in ELEMENTWISE_METHODS
    method = planner_method(planner)
    # mergekit's methods with per-tensor statistics: under a budget, always in chunks with a pre-pass
    # (host/budgeted_methods.py); mergekit's whole-tensor run would hold several copies of all N inputs.
    builtin = not ours and not elementwise and plan.budget_bytes is not None and budgeted(method)
    if not ours and not elementwise and not builtin:
        return task
    name = task.output_weight.name
    shape = None
    stored = 0  # the largest stored item size among the inputs
    present = 0
    for model in task.model_order:
        index = LoaderCache().get(model).index
        if name in getattr(index, "shapes", {}):
            shape = shape or tuple(index.shapes[name])
            stored = max(stored, dtype_size(getattr(index, "dtypes", {}).get(name, "")) or 8)
            present += 1
    if shape is None or (builtin and present < len(task.model_order)):
        return task  # an optional key some inputs lack: mergekit's own policy for it
    configured = dtype_from_name(planner.config.dtype)
    compute = compute_dtype_for(configured) if ours or builtin else (configured or torch.float32)
    n = len(task.model_order)
    if builtin:
        # The pre-pass holds about that many more stored inputs' worth of the key.
        n += -(-statistics_bytes_per_element(method) // max(1, stored))
    # Our methods and the budgeted built-ins compute in chunks from stored inputs: only the stored
    # bytes must fit.
    whole = plan.merge_whole(shape, n, compute, stored if ours or builtin else None)
    if whole and elementwise and not report:
        return task  # mergekit runs its elementwise method on the whole tensors itself
    if not ours:
        # mergekit casts whole inputs to the config dtype in the gather; here they stay as stored
        # and each chunk is cast to that dtype instead.
        gather = task.gather_tensors
        task = task.model_copy(
            update={"gather_tensors": gather.model_copy(update={"dtype": None}), "dtype": task.dtype or gather.dtype}
        )
    device = planner.options.device if planner.options.device not in (None, "cpu") else None
    seed = planner.options.random_seed or 0
    return MergeKeyTask(merge=task, plan=plan, shape=shape, from_files=not whole, device=device, seed=seed)
