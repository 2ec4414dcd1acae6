"""Graph tasks the SDXL planner puts into mergekit's plan-and-execute graph."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import torch
from mergekit.common import ModelReference, dtype_from_name
from mergekit.graph import Task
from mergekit.io.tasks import GatherTensors, LoaderCache
from mergekit.merge_methods.base import ParameterScope, PerInputValues, TensorEntry, TensorGroup, TensorMetadata
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

from mergekit_sdxl.errors import InputDataError
from mergekit_sdxl.kernels.tgmd import rows_cols
from mergekit_sdxl.sdxl import keys as sdxl_keys

LOG = logging.getLogger(__name__)


class DirectGather(GatherTensors):
    """Loads one tensor from every input in a single task.

    mergekit's ``GatherTensors`` schedules one ``LoadTensor`` task per (model,
    tensor): 2515 x N tasks for SDXL, which dominates run time at large N.
    """

    def arguments(self) -> Dict[str, Task]:
        return {}

    def group_label(self) -> Optional[str]:
        return max(wi.name for wi in self.weight_info.values())

    def execute(self, **_kwargs) -> Dict[ModelReference, torch.Tensor]:
        result = {}
        for model, wi in self.weight_info.items():
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


class ChunkedMergeTask(Task[Optional[torch.Tensor]]):
    """Merges one tensor in row chunks read straight from the input files.

    Never materialises N whole inputs: memory is O(N x chunk). Used for tensors
    whose N inputs do not fit the memory budget. The wrapped task supplies the
    method, parameters and inputs; its loading dependencies are not scheduled.
    """

    merge: ExecuteMergeMethodTask
    rows_per_chunk: int
    shape: Tuple[int, ...]
    device: Optional[str] = None  # math device (mergekit --cuda); chunks are read on the CPU

    def arguments(self) -> Dict[str, Task]:
        return {}

    def group_label(self) -> Optional[str]:
        return self.merge.output_weight.name

    def uses_accelerator(self) -> bool:
        return self.merge.uses_accelerator()

    def _readers(self):
        weight_info = self.merge.gather_tensors.weight_info
        readers = {}
        for model in self.merge.model_order:
            loader = LoaderCache().get(model)
            name = weight_info[model].name
            if name not in loader.index.tensor_paths:
                readers[model] = None
                continue
            readers[model] = (
                lambda start, stop, loader=loader, name=name: loader.get_rows(name, start, stop).to(self.device or "cpu")
            )
        return readers

    def execute(self, **_kwargs) -> Optional[torch.Tensor]:
        from mergekit import merge_methods

        from mergekit_sdxl.host.methods import ChunkedMergeMethod, ReaderInputs, compute_dtype_for, threads_for

        task = self.merge
        method = merge_methods.get(task.method_name)
        readers = self._readers()
        present = [model for model in task.model_order if readers[model] is not None]
        compute = compute_dtype_for(dtype_from_name(task.dtype))
        out_dtype = dtype_from_name(task.out_dtype)
        name = task.output_weight.name
        if isinstance(method, ChunkedMergeMethod):
            base_model = task.base_model
            uses_base = method.spec.contract.base.value != "ignored"
            others = [m for m in present if not (uses_base and m == base_model)]
            if uses_base and readers.get(base_model) is None:
                raise InputDataError(f"the base model {base_model} lacks key {name}")
            inputs = ReaderInputs(
                tensor_name=name,
                shape=tuple(self.shape),
                base=readers[base_model] if uses_base else None,
                models=tuple(readers[m] for m in others),
                model_keys=tuple(str(m) for m in others),
                labels=tuple(str(m) for m in others),
            )
            shared = dict(task.parameters.items())
            per_model = {
                p.name: [task.input_parameters[m][p.name] for m in others] for p in method.spec.input_parameters
            }
            numel = 1
            for dim in self.shape:
                numel *= dim
            with threads_for(numel):
                return method.merge_readers(inputs, shared, per_model, compute, self.rows_per_chunk, out_dtype)
        return self._elementwise(method, present, readers, compute, out_dtype)

    def _elementwise(self, method: Any, present, readers, compute, out_dtype) -> torch.Tensor:
        """Row chunks through an elementwise mergekit method (linear, task_arithmetic)."""
        task = self.merge
        rows, _cols = rows_cols(torch.Size(self.shape))
        output: Optional[torch.Tensor] = None
        for start in range(0, rows, self.rows_per_chunk):
            stop = min(rows, start + self.rows_per_chunk)
            entries = tuple(
                TensorEntry(id=m, tensor=readers[m](start, stop), is_base=m == task.base_model) for m in present
            )
            group = TensorGroup(entries=entries, metadata=TensorMetadata(name=task.output_weight.name))
            parameters = dict(task.parameters.items())
            for parameter in method.spec.input_parameters:
                inputs = entries if parameter.scope == ParameterScope.INPUT else group.non_base
                parameters[parameter.name] = PerInputValues(
                    [(e.id, task.input_parameters[e.id][parameter.name]) for e in inputs]
                )
            (chunk,) = method._execute_resolved((group,), [parameters], dtype=compute, out_dtype=out_dtype or compute)
            if output is None:
                output = torch.empty((rows,) + tuple(chunk.shape[1:]), dtype=chunk.dtype)
            output[start:stop] = chunk
        assert output is not None
        return output.reshape(self.shape)


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
        return tensor.cpu()
