"""One SDXL key's ``ExecuteMergeMethodTask``, built as mergekit's ``MergePlanner.plan_tensor``
builds it, with what does not change from key to key worked out once.

mergekit resolves every parameter of every model for every key, builds an N-entry
``GatherTensors`` and validates the task's N inputs (pydantic validation, comparisons and
hashes of ``ModelReference``): O(N) Python work per key, most of the planning time at hundreds
of models or LoRAs. Here, per output slice of the config, the models are grouped once by the
parameter settings that apply to them (their values, so a hundred ``weight: 1.0`` entries are
one group) and by whether they are the base; per key, each parameter is resolved once per group
with mergekit's own ``resolve_parameter`` (filters and gradients evaluated as mergekit does),
and the per-model map is shared by every key that resolves to the same values. The inputs are
checked against the method's contract once per model list, as mergekit's task validation does.

The result is the task mergekit would plan, field for field (tested against it), with the
inputs loaded by one :class:`~mergekit_sdxl.host.tasks.DirectGather`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

from mergekit_sdxl.host.mergekit_api import (
    ConfigReader,
    ExecuteMergeMethodTask,
    ImmutableMap,
    LoaderCache,
    ModelReference,
    ParameterScope,
    WeightInfo,
    resolve_parameter,
)
from mergekit_sdxl.host.tasks import DirectGather


class ModelOrder(tuple):
    """A slice's model order, shared by its keys' tasks: a tuple that computes its hash once
    (mergekit's executor hashes every task, and with it the N models, several times)."""

    def __hash__(self) -> int:
        cached = self.__dict__.get("hash")
        if cached is None:
            cached = self.__dict__["hash"] = tuple.__hash__(self)
        return int(cached)


@dataclass(frozen=True)
class _Group:
    """Models of one slice with the same settings (by value) and base role."""

    settings: Tuple[Any, ...]  # mergekit's parameter sources of the first member, highest first
    is_base: bool
    members: Tuple[int, ...]  # positions in the slice's model order


@dataclass(frozen=True)
class _SliceInputs:
    order: Tuple[ModelReference, ...]
    groups: Tuple[_Group, ...]
    owners: Tuple[Any, ...]  # the slice, module and config objects the cache key names by id


def _frozen(value: Any) -> Hashable:
    """A hashable form of one parameter setting (types kept: 1, 1.0 and True differ)."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _frozen(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_frozen(v) for v in value))
    if hasattr(value, "model_dump"):  # mergekit's ConditionalParameter
        return (type(value).__name__, _frozen(value.model_dump()))
    return (type(value).__name__, value)


class KeyTaskBuilder:
    """Builds the merge task of each SDXL key of one planner (one config, one method).

    Its caches are keyed by the ``id`` of config objects, model lists and resolved maps; every
    entry holds the objects its key names, so an id in a key is never one reused by a new object.
    """

    def __init__(self, method: Any, dtype: Optional[str], device: Optional[str]) -> None:
        self._method = method
        self._dtype = dtype
        self._device = device
        self._slices: Dict[Tuple[int, ...], _SliceInputs] = {}
        self._validated: Dict[Tuple[int, int], Tuple[Any, ...]] = {}
        self._values: Dict[Hashable, Any] = {}
        self._per_input: Dict[Tuple[int, ...], Tuple[Any, ...]] = {}

    def build(
        self,
        weight: WeightInfo,
        weights_in: Sequence[WeightInfo],
        models: Sequence[ModelReference],
        cfg_reader: ConfigReader,
    ) -> Optional[ExecuteMergeMethodTask]:
        """The key's task, or None for an optional key no input has (as mergekit skips it)."""
        if weight.optional and not _any_present(weights_in, models):
            return None
        inputs = self._slice_inputs(models, cfg_reader)
        base = cfg_reader.base_model
        self._validate(inputs.order, base, weight.name)
        spec = self._method.spec
        t = cfg_reader.t
        shared_settings = tuple(cfg_reader.parameter_sources(None))
        shared = {
            p.name: resolve_parameter(p, shared_settings, tensor_name=weight.name, t=t) for p in spec.shared_parameters
        }
        same_weight = all(w is weights_in[0] for w in weights_in)
        return ExecuteMergeMethodTask.model_construct(
            method_name=spec.name,
            gather_tensors=DirectGather.of(inputs.order, weights_in, self._dtype, self._device),
            model_order=inputs.order,
            parameters=self._shared_values(shared),
            input_parameters=self._input_parameters(inputs, weights_in, same_weight, t),
            base_model=base,
            output_weight=weight,
            dtype=None,
            out_dtype=None,
        )

    def _slice_inputs(self, models: Sequence[ModelReference], cfg_reader: ConfigReader) -> _SliceInputs:
        owners = (cfg_reader.slice_out, cfg_reader.module, cfg_reader.config)
        key = tuple(id(o) for o in owners) + tuple(map(id, models))
        found = self._slices.get(key)
        if found is not None:
            return found
        base = cfg_reader.base_model
        by_value: Dict[Tuple[bool, Hashable], List[int]] = {}
        first: Dict[Tuple[bool, Hashable], Tuple[Any, ...]] = {}
        for index, model in enumerate(models):
            settings = tuple(cfg_reader.parameter_sources(model))
            is_base = base is not None and model == base
            group_key = (is_base, tuple(_frozen(s) for s in settings))
            by_value.setdefault(group_key, []).append(index)
            first.setdefault(group_key, settings)
        groups = tuple(_Group(settings=first[k], is_base=k[0], members=tuple(v)) for k, v in by_value.items())
        found = _SliceInputs(order=ModelOrder(models), groups=groups, owners=owners)
        self._slices[key] = found
        return found

    def _validate(self, order: Tuple[ModelReference, ...], base: Optional[ModelReference], name: str) -> None:
        # mergekit validates each task's inputs against the method's contract; the verdict
        # depends only on the model list and the base.
        key = (id(order), id(base))
        if key in self._validated:
            return
        self._method.validate_inputs(order, base, group_name=name)
        self._validated[key] = (order, base)

    def _input_parameters(
        self, inputs: _SliceInputs, weights_in: Sequence[WeightInfo], same_weight: bool, t: float
    ) -> Any:
        spec = self._method.spec
        order = inputs.order
        resolved: List[Any] = [None] * len(order)
        chosen: List[int] = []
        for group in inputs.groups:
            names = (
                [weights_in[group.members[0]].name]
                if same_weight
                else sorted({weights_in[i].name for i in group.members})
            )
            for input_name in names:
                values = {
                    p.name: resolve_parameter(
                        p, group.settings, tensor_name=input_name, model=order[group.members[0]], t=t
                    )
                    for p in spec.input_parameters
                    if not group.is_base or p.scope == ParameterScope.INPUT
                }
                shared_values = self._shared_values(values)
                for i in group.members:
                    if same_weight or weights_in[i].name == input_name:
                        resolved[i] = shared_values
            chosen.append(id(resolved[group.members[0]]) if same_weight else -1)
        # Keys whose groups resolve to the same values share one map of N entries.
        key = (id(order), *(id(v) for v in resolved)) if not same_weight else (id(order), *chosen)
        entry = self._per_input.get(key)
        if entry is not None:
            return entry[1]
        per_input = ImmutableMap(data=dict(zip(order, resolved, strict=True)))
        self._per_input[key] = (order, per_input)
        return per_input

    def _shared_values(self, values: Dict[str, Any]) -> Any:
        try:
            key: Hashable = tuple(sorted(values.items()))
            hash(key)
        except TypeError:  # an unhashable parameter value: this map is not shared
            return ImmutableMap(data=values)
        found = self._values.get(key)
        if found is None:
            found = self._values[key] = ImmutableMap(data=values)
        return found


def _any_present(weights_in: Sequence[WeightInfo], models: Sequence[ModelReference]) -> bool:
    for model, w_in in zip(models, weights_in, strict=True):
        index = LoaderCache().get(model).index
        if any(name in index.tensor_paths for name in [w_in.name, *(w_in.aliases or [])]):
            return True
    return False
