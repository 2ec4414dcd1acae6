"""mergekit merge methods ``tgmd``, ``ties_soup`` and ``geometric_median``.

They work on any architecture (LLMs included). Unlike mergekit's stock group
methods they do not upcast whole inputs first: the kernels read row chunks in
the stored dtype and upcast one chunk at a time, so the in-memory and the
out-of-core (``host.chunked``) paths run the same code and give the same bytes.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    BatchOptions,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    OptionalTensorPolicy,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from pydantic import Field
from typing_extensions import Annotated

from mergekit_sdxl.errors import InputDataError
from mergekit_sdxl.kernels.tgmd import (
    InputValuesError,
    TGMDParams,
    merge_geometric_median,
    merge_task_vectors,
    rows_cols,
)

LOG = logging.getLogger(__name__)

RowReader = Callable[[int, int], Optional[torch.Tensor]]

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]

# Per-chunk working set: N inputs plus about three compute-dtype copies of a chunk.
DEFAULT_CHUNK_BYTES = 256 * 1024**2
_chunk_bytes = DEFAULT_CHUNK_BYTES


def set_chunk_bytes(value: int) -> None:
    """Bound on the working memory of one chunk (set by ``--memory-budget``)."""
    global _chunk_bytes
    _chunk_bytes = max(int(value), 1)


def rows_per_chunk(
    shape: Sequence[int], n_inputs: int, compute_dtype: torch.dtype, chunk_bytes: Optional[int] = None
) -> int:
    """Rows per chunk so that N inputs in the compute dtype, about 4 copies, fit the bound."""
    rows, cols = rows_cols(torch.Size(shape))
    itemsize = torch.finfo(compute_dtype).bits // 8
    per_row = max(1, n_inputs) * cols * itemsize * 4
    return max(1, min(rows, (chunk_bytes or _chunk_bytes) // per_row))


# Below this many elements a key is merged on one thread: its hundreds of small tensor ops
# cost more in OpenMP fork/join and spin-waits than they gain (5-13x slower on 2 busy cores,
# docs/benchmarks.md). Results do not depend on the thread count.
SMALL_TENSOR_ELEMENTS = 1 << 20


@contextmanager
def threads_for(numel: int) -> Iterator[None]:
    """One intra-op thread for small tensors, the configured number for large ones."""
    configured = torch.get_num_threads()
    if numel >= SMALL_TENSOR_ELEMENTS or configured == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(configured)


def compute_dtype_for(dtype: Optional[torch.dtype]) -> torch.dtype:
    """float64 when the config asks for it, float32 otherwise (never fp16/bf16 math)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shared(name: str, value_type: Any, default: Any) -> ParameterSpec:
    return ParameterSpec(name=name, value_type=value_type, scope=ParameterScope.SHARED, default=default)


def _per_model(name: str, value_type: Any, default: Any, scope: ParameterScope) -> ParameterSpec:
    return ParameterSpec(name=name, value_type=value_type, scope=scope, default=default)


def _median_parameters() -> Tuple[ParameterSpec, ...]:
    return (
        _shared("eps", Annotated[float, Field(gt=0.0)], 1e-6),
        _shared("maxiter", Annotated[int, Field(ge=0)], 100),
        _shared("ftol", NonNegative, 1e-20),
    )


def _task_vector_spec(name: str, pretty: str, drop_rate: float, aggregate: str) -> MergeMethodSpec:
    return MergeMethodSpec(
        name=name,
        pretty_name=pretty,
        reference_url="https://github.com/6DammK9/nai-anime-pure-negative-prompt/tree/main/ch05",
        contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=1),
        optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
        parameters=(
            _per_model("density", Fraction, 1.0, ParameterScope.NON_BASE),
            _per_model("drop_rate", Fraction, drop_rate, ParameterScope.NON_BASE),
            _per_model("weight", NonNegative, 1.0, ParameterScope.NON_BASE),
            _shared("rescale", Fraction, 0.0),
            _shared("sign_election", Literal["count", "sum"], "count"),
            _shared("aggregate", Literal["median", "mean"], aggregate),
            *_median_parameters(),
            _shared("lambda", float, 1.0),
            _shared("seed", int, 0),
            _shared("on_nonfinite", Literal["skip", "error"], "skip"),
        ),
    )


def model_key(entry_id: Any) -> str:
    """The identity of an input in the DROP masks: the model as written in the config."""
    return str(entry_id)


@dataclass(frozen=True)
class ReaderInputs:
    """One tensor's inputs as row readers, in config order."""

    tensor_name: str
    shape: Tuple[int, ...]
    base: Optional[RowReader]
    models: Tuple[RowReader, ...]
    model_keys: Tuple[str, ...]
    labels: Tuple[str, ...]  # for messages: file names


def _bad_input_handler(inputs: ReaderInputs, policy: str) -> Callable[[int, str], None]:
    def handle(index: int, message: str) -> None:
        text = f"{inputs.labels[index]}: key {inputs.tensor_name}: {message}"
        if policy == "error":
            raise InputDataError(text + " (on_nonfinite: error)")
        LOG.warning("%s; that input is left out of this key", text)

    return handle


@contextmanager
def _input_values_are_user_errors() -> Iterator[None]:
    # The kernels know no package exceptions; what the inputs' values cause is the user's to fix.
    try:
        yield
    except InputValuesError as error:
        raise InputDataError(str(error)) from error


class ChunkedMergeMethod(GroupMergeMethod):
    """A group method whose kernel runs over row readers, in chunks."""

    def merge_readers(
        self,
        inputs: ReaderInputs,
        parameters: Dict[str, Any],
        per_model: Dict[str, List[Any]],
        compute_dtype: torch.dtype,
        rows: int,
        out_dtype: Optional[torch.dtype],
    ) -> torch.Tensor:
        raise NotImplementedError

    def _split_group(
        self, group: TensorGroup, parameters: Dict[str, Any]
    ) -> Tuple[ReaderInputs, Dict[str, Any], Dict[str, List[Any]]]:
        shape = tuple(group.entries[0].tensor.shape)
        rows, cols = rows_cols(torch.Size(shape))

        def reader(tensor: torch.Tensor) -> RowReader:
            flat = tensor.reshape(rows, cols)
            return lambda start, stop: flat[start:stop]

        base = group.base
        others = group.non_base if self.spec.contract.base != BasePolicy.IGNORED else group.entries
        inputs = ReaderInputs(
            tensor_name=group.metadata.name or "tensor",
            shape=shape,
            base=reader(base.tensor) if base is not None and self.spec.contract.base != BasePolicy.IGNORED else None,
            models=tuple(reader(entry.tensor) for entry in others),
            model_keys=tuple(model_key(entry.id) for entry in others),
            labels=tuple(model_key(entry.id) for entry in others),
        )
        shared = {p.name: parameters[p.name] for p in self.spec.shared_parameters}
        per_model = {p.name: [parameters[p.name][entry.id] for entry in others] for p in self.spec.input_parameters}
        return inputs, shared, per_model

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        return self._merge_one(group, parameters, torch.float32, None)

    def _merge_one(
        self, group: TensorGroup, parameters: Dict[str, Any], compute: torch.dtype, out_dtype: Optional[torch.dtype]
    ) -> torch.Tensor:
        inputs, shared, per_model = self._split_group(group, parameters)
        if not inputs.models and inputs.base is not None:
            result = group.base.tensor.to(compute)
            return result.to(out_dtype) if out_dtype is not None else result
        rows = rows_per_chunk(inputs.shape, len(inputs.models) + 1, compute)
        with threads_for(group.entries[0].tensor.numel()):
            return self.merge_readers(inputs, shared, per_model, compute, rows, out_dtype)

    def _execute(
        self,
        groups: Sequence[TensorGroup],
        parameters: List[Dict[str, Any]],
        options: BatchOptions,
        *,
        input_dtypes: Sequence[Optional[torch.dtype]],
        out_dtype: Optional[torch.dtype] = None,
    ) -> Tuple[torch.Tensor, ...]:
        # No align_dtype here: inputs stay in their stored dtype until a chunk is computed.
        return tuple(
            self._merge_one(group, kwargs, compute_dtype_for(dtype), out_dtype)
            for group, kwargs, dtype in zip(groups, parameters, input_dtypes)
        )


class TaskVectorMedianMethod(ChunkedMergeMethod):
    """TGMD: DROP, trim, sign election, disjoint mask, geometric median (or mean), add back."""

    def __init__(self, spec: MergeMethodSpec):
        self.spec = spec

    def merge_readers(self, inputs, parameters, per_model, compute_dtype, rows, out_dtype):  # type: ignore[override]
        params = TGMDParams(
            drop_rate=tuple(per_model["drop_rate"]),
            density=tuple(per_model["density"]),
            weight=tuple(per_model["weight"]),
            rescale=parameters["rescale"],
            sign_election=parameters["sign_election"],
            aggregate=parameters["aggregate"],
            eps=parameters["eps"],
            maxiter=parameters["maxiter"],
            ftol=parameters["ftol"],
            lambda_=parameters["lambda"],
            seed=parameters["seed"],
        )
        with _input_values_are_user_errors():
            return merge_task_vectors(
                inputs.tensor_name,
                torch.Size(inputs.shape),
                inputs.base,
                inputs.models,
                inputs.model_keys,
                params,
                compute_dtype,
                rows,
                out_dtype=out_dtype,
                on_bad_input=_bad_input_handler(inputs, parameters["on_nonfinite"]),
            )


class GeometricMedianMethod(ChunkedMergeMethod):
    """Plain geometric median of the models' tensors (Weiszfeld on the Gram matrix)."""

    def __init__(self) -> None:
        self.spec = MergeMethodSpec(
            name="geometric_median",
            pretty_name="Geometric median",
            reference_url="https://en.wikipedia.org/wiki/Geometric_median",
            contract=InputContract(base=BasePolicy.IGNORED, min_inputs=1),
            parameters=(
                _per_model("weight", NonNegative, 1.0, ParameterScope.INPUT),
                *_median_parameters(),
                _shared("on_nonfinite", Literal["skip", "error"], "skip"),
            ),
        )

    def merge_readers(self, inputs, parameters, per_model, compute_dtype, rows, out_dtype):  # type: ignore[override]
        with _input_values_are_user_errors():
            return merge_geometric_median(
                inputs.tensor_name,
                torch.Size(inputs.shape),
                inputs.models,
                weights=tuple(per_model["weight"]),
                eps=parameters["eps"],
                maxiter=parameters["maxiter"],
                ftol=parameters["ftol"],
                compute_dtype=compute_dtype,
                rows_per_chunk=rows,
                out_dtype=out_dtype,
                on_bad_input=_bad_input_handler(inputs, parameters["on_nonfinite"]),
            )


def build_methods() -> Tuple[ChunkedMergeMethod, ...]:
    """Construct (not register) the plugin's methods."""
    return (
        TaskVectorMedianMethod(_task_vector_spec("tgmd", "TIES-GeoMedian with DROP (TGMD)", 0.1, "median")),
        TaskVectorMedianMethod(_task_vector_spec("ties_soup", "TIES-SOUP", 0.0, "mean")),
        GeometricMedianMethod(),
    )


def _complete_deferred_registration() -> None:
    # Imported before mergekit, this module triggered mergekit's post-import hook while it was
    # half-initialised, so the hook left the registration for now.
    from mergekit_sdxl.host import plugin

    plugin.complete_deferred()


_complete_deferred_registration()
