"""Graph tasks the SDXL planner puts into mergekit's plan-and-execute graph."""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any, Dict, List, Optional, Tuple

import torch

from mergekit_sdxl.errors import InputDataError
from mergekit_sdxl.host.budgeted_methods import BuiltinKey, merge_builtin
from mergekit_sdxl.host.lora_model import abstain_untouched
from mergekit_sdxl.host.merge_report import KeyRecording, active_recorder
from mergekit_sdxl.host.mergekit_api import (
    ExecuteMergeMethodTask,
    LoaderCache,
    ModelReference,
    Task,
    WeightInfo,
    dtype_from_name,
    get_method,
)
from mergekit_sdxl.host.methods import (
    BoundParameters,
    ChunkedMergeMethod,
    ReaderInputs,
    RowReader,
    bind_parameters,
    mask_identity,
)
from mergekit_sdxl.kernels.memory_plan import MemoryPlan, compute_dtype_for
from mergekit_sdxl.kernels.tgmd import rows_cols
from mergekit_sdxl.sdxl import keys as sdxl_keys

LOG = logging.getLogger(__name__)


def _file_rows(loader: Any, name: str, device: str) -> RowReader:
    """Reader of rows of ``name`` straight from ``loader``'s file, moved to ``device``."""

    advise = getattr(loader, "advise", None)

    def rows(start: int, stop: int) -> torch.Tensor:
        part = loader.get_rows(name, start, stop)
        if advise is not None:
            advise(name, stop, stop + (stop - start))  # the next chunk is read while this one is merged
        if torch.device(device).type != "cuda":
            return part.to(device)
        # Through pinned memory, asynchronously: the copy overlaps the next read (torch keeps
        # the pinned buffer alive until the copy has run).
        return part.pin_memory().to(device, non_blocking=True)

    return rows


def _slice_rows(flat: torch.Tensor) -> RowReader:
    """Reader of rows of an in-memory tensor viewed as [rows, cols]."""

    def rows(start: int, stop: int) -> torch.Tensor:
        return flat[start:stop]

    return rows


class DirectGather(Task[Dict[ModelReference, torch.Tensor]]):
    """Loads one tensor from every input in a single task.

    mergekit's ``GatherTensors`` schedules one ``LoadTensor`` task per (model, tensor): 2515 x N
    tasks for SDXL, which dominates run time at large N. ``models`` is the key's model order (one
    tuple shared by every key of a slice); ``weight`` is the tensor every model gives, or
    ``weights`` one per model where their names differ.
    """

    models: Tuple[ModelReference, ...]
    weight: Optional[WeightInfo] = None
    weights: Optional[Tuple[WeightInfo, ...]] = None
    dtype: Optional[str] = None
    device: Optional[str] = None

    @classmethod
    def of(
        cls, models: Tuple[ModelReference, ...], weights_in: Any, dtype: Optional[str], device: Optional[str]
    ) -> DirectGather:
        """The gather of ``weights_in[i]`` from ``models[i]``."""
        weights = tuple(weights_in)
        # model_construct keeps the shared ``models`` tuple itself (validation would copy it).
        if weights and all(w is weights[0] for w in weights):
            return cls.model_construct(models=models, weight=weights[0], weights=None, dtype=dtype, device=device)
        return cls.model_construct(models=models, weight=None, weights=weights, dtype=dtype, device=device)

    def weight_of(self, index: int) -> WeightInfo:
        """The tensor the model at ``index`` gives."""
        if self.weights is not None:
            return self.weights[index]
        assert self.weight is not None
        return self.weight

    def arguments(self) -> Dict[str, Task]:
        return {}

    def group_label(self) -> Optional[str]:
        return max(self.weight_of(i).name for i in range(len(self.models)))

    def execute(self, **_kwargs) -> Dict[ModelReference, torch.Tensor]:
        result = {}
        for index, model in enumerate(self.models):
            wi = self.weight_of(index)
            loader = LoaderCache().get(model)
            tensor = loader.get_tensor(wi.name, device=self.device or "cpu", aliases=list(wi.aliases or ()), raise_on_missing=not wi.optional)
            if tensor is None:
                continue
            dtype = wi.force_dtype or self.dtype
            if dtype and tensor.dtype != dtype_from_name(dtype):
                tensor = tensor.to(dtype_from_name(dtype))
            result[model] = tensor
        return result


class DonorTensor(Task[Optional[torch.Tensor]]):
    """A tensor copied unmerged from one model (VAE from the base, logit_scale, ...)."""

    model: ModelReference
    tensor: str
    optional: bool = False

    def arguments(self) -> Dict[str, Task]:
        return {}

    def group_label(self) -> Optional[str]:
        return self.tensor

    def execute(self, **_kwargs) -> Optional[torch.Tensor]:
        tensor = LoaderCache().get(self.model).get_tensor(self.tensor, raise_on_missing=not self.optional)
        if tensor is None:
            LOG.warning("%s lacks optional key %s; it is left out of the output", self.model, self.tensor)
        return tensor


class PositionIds(Task[torch.Tensor]):
    """CLIP-L ``position_ids``: int64 arange(77), never merged or cast."""

    tensor: str

    def arguments(self) -> Dict[str, Task]:
        return {}

    def group_label(self) -> Optional[str]:
        return self.tensor

    def execute(self, **_kwargs) -> torch.Tensor:
        return sdxl_keys.position_ids()


# The math device of the lane running this thread's keys (``--multi-gpu``: one lane per GPU);
# unset, a key runs on its planned ``device``.
LANE_DEVICE: ContextVar[Optional[str]] = ContextVar("mergekit_sdxl_lane_device", default=None)


class MergeKeyTask(Task[Optional[torch.Tensor]]):
    """Merges one key under the merge's :class:`MemoryPlan`.

    ``from_files``: the key's N inputs do not fit the plan, so row chunks are read straight
    from the files (never N whole inputs in memory); otherwise the inputs come whole from the
    wrapped task's ``DirectGather``. Either way the rows go through the same readers, parameter
    binding and kernel, so both give the same bytes. The wrapped mergekit task supplies the
    method, its resolved parameters and the inputs.
    """

    merge: ExecuteMergeMethodTask
    plan: MemoryPlan
    shape: Tuple[int, ...]
    from_files: bool = False
    device: Optional[str] = None  # math device (mergekit --cuda); file chunks are read on the CPU
    seed: int = 0  # counter-based masks of mergekit's random methods (--random-seed)

    def arguments(self) -> Dict[str, Task]:
        return {} if self.from_files else {"tensors": self.merge.gather_tensors}

    def group_label(self) -> Optional[str]:
        return self.merge.output_weight.name

    def uses_accelerator(self) -> bool:
        return self.merge.uses_accelerator()

    def execute(self, tensors: Optional[Dict[ModelReference, torch.Tensor]] = None, **_kwargs: Any) -> Optional[torch.Tensor]:
        task = self.merge
        method = get_method(task.method_name)
        readers = self._file_readers() if self.from_files else self._memory_readers(tensors or {})
        if isinstance(method, ChunkedMergeMethod) and method.uses_base():
            # LoRA models that leave this key alone: zero task vectors, nothing read.
            readers = abstain_untouched(readers, task.base_model, task.output_weight.name)
        recorder = active_recorder()
        report = None
        if recorder is not None:
            name = task.output_weight.name
            report = recorder.start_key(name, self.shape, readers, lambda: _file_rows(LoaderCache().get(recorder.base), name, "cpu"))
        if report is not None:
            readers = report.wrap(readers)
        compute = compute_dtype_for(dtype_from_name(task.dtype))
        out_dtype = dtype_from_name(task.out_dtype)
        numel = 1
        for dim in self.shape:
            numel *= dim
        # Our methods' cost grows with N (the Gram is N^2 per element): threads pay off sooner.
        work = numel * len(readers) if isinstance(method, ChunkedMergeMethod) else numel
        with self.plan.threads_for(work):
            if isinstance(method, ChunkedMergeMethod):
                merged = self._merge_readers(method, readers, compute, out_dtype, report)
            else:
                merged = self._builtin(method, readers, out_dtype)
            if report is not None:
                report.finish()
        return merged

    def _file_readers(self) -> Dict[ModelReference, Optional[RowReader]]:
        gather = self.merge.gather_tensors
        readers: Dict[ModelReference, Optional[RowReader]] = {}
        for index, model in enumerate(self.merge.model_order):
            loader = LoaderCache().get(model)
            name = gather.weight_of(index).name
            if name not in loader.index.tensor_paths:
                readers[model] = None
                continue
            readers[model] = _file_rows(loader, name, LANE_DEVICE.get() or self.device or "cpu")
        return readers

    def _memory_readers(self, tensors: Dict[ModelReference, torch.Tensor]) -> Dict[ModelReference, Optional[RowReader]]:
        rows, cols = rows_cols(torch.Size(self.shape))
        readers: Dict[ModelReference, Optional[RowReader]] = {}
        for model in self.merge.model_order:
            tensor = tensors.get(model)
            if tensor is None:
                readers[model] = None
                continue
            if not tensor.is_floating_point():
                raise InputDataError(f"{model}: key {self.merge.output_weight.name} is not floating point; it cannot be merged")
            readers[model] = _slice_rows(tensor.reshape(rows, cols))
        return readers

    def _merge_readers(
        self,
        method: ChunkedMergeMethod,
        readers: Dict[ModelReference, Optional[RowReader]],
        compute: torch.dtype,
        out_dtype: Optional[torch.dtype],
        report: Optional[KeyRecording] = None,
    ) -> torch.Tensor:
        task = self.merge
        name = task.output_weight.name
        uses_base = method.uses_base()
        base = task.base_model
        if uses_base and (base is None or readers.get(base) is None):
            raise InputDataError(f"the base model {base} lacks key {name}")
        others = [m for m in task.model_order if not (uses_base and m == base) and readers[m] is not None]
        bound, identities = _bound_inputs(method.spec, task, others)
        inputs = ReaderInputs(
            tensor_name=name,
            shape=tuple(self.shape),
            base=readers[base] if uses_base and base is not None else None,
            models=tuple(readers[m] for m in others),  # type: ignore[misc]
            model_keys=identities,
            labels=identities,
            on_median=report.median_found(others) if report is not None else None,
        )
        rows = self.plan.rows_per_chunk(self.shape, len(task.model_order), compute)
        # Rows read from the files by the first pass are kept for the second, within the plan.
        reuse = self.plan.reuse_bytes if self.from_files else 0
        return method.merge_readers(inputs, bound, compute, rows, out_dtype, reuse)

    def _builtin(
        self, method: Any, readers: Dict[ModelReference, Optional[RowReader]], out_dtype: Optional[torch.dtype]
    ) -> torch.Tensor:
        """One of mergekit's own methods, in row chunks with its per-tensor statistics computed
        first (host/budgeted_methods.py); mergekit's dtype rule, not the plugin's."""
        task = self.merge
        key = BuiltinKey(
            name=task.output_weight.name,
            shape=tuple(self.shape),
            readers=tuple((m, readers[m]) for m in task.model_order),
            base=task.base_model,
            dtype=dtype_from_name(task.dtype),
            out_dtype=out_dtype,
            plan=self.plan,
            seed=self.seed,
        )
        return merge_builtin(method, key, dict(task.parameters.items()), lambda m, p: task.input_parameters[m][p])


# (spec, shared map, per-model map, models) by id -> (those objects, bound parameters, mask
# identities). The keys of one merge share their parameter maps (host/key_tasks.py) and models:
# binding and naming them is done once, not per key (N x parameters validations and lookups each).
# The entry holds the objects, so an id in a live key is never a reused one.
_BOUND: Dict[Tuple[int, ...], Tuple[Tuple[Any, ...], BoundParameters, Tuple[str, ...]]] = {}
_BOUND_MAX = 256


def _bound_inputs(spec: Any, task: ExecuteMergeMethodTask, others: List[ModelReference]) -> Tuple[BoundParameters, Tuple[str, ...]]:
    key = (id(spec), id(task.parameters), id(task.input_parameters), *map(id, others))
    found = _BOUND.get(key)
    if found is not None:
        return found[1], found[2]
    bound = bind_parameters(spec, dict(task.parameters.items()), lambda model, name: task.input_parameters[model][name], others)
    identities = tuple(mask_identity(m) for m in others)
    if len(_BOUND) >= _BOUND_MAX:
        _BOUND.clear()
    _BOUND[key] = ((spec, task.parameters, task.input_parameters, tuple(others)), bound, identities)
    return bound, identities


class OutputTensor(Task[Optional[torch.Tensor]]):
    """A final output tensor in its save dtype; non-finite values are an error naming the key."""

    name: str
    tensor_task: Task
    dtype: Optional[str] = None
    optional: bool = False

    def arguments(self) -> Dict[str, Task]:
        return {"tensor": self.tensor_task}

    def group_label(self) -> Optional[str]:
        return self.name

    def priority(self) -> int:
        return 1000

    def execute(self, tensor: Optional[torch.Tensor], **_kwargs) -> Optional[torch.Tensor]:
        if tensor is None:
            if not self.optional:
                raise RuntimeError(f"No value for required tensor {self.name}")
            return None
        if self.dtype and tensor.is_floating_point():
            tensor = tensor.to(dtype_from_name(self.dtype))
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputDataError(
                f"key {self.name}: merged values are NaN/inf or outside the range of {tensor.dtype}; "
                "nothing was clamped. Check the inputs with `mergekit-sdxl inspect --scan`."
            )
        recorder = active_recorder()
        if recorder is not None:
            recorder.saved(self.name, tensor)
        return tensor.cpu()
