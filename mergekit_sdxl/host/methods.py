"""mergekit merge methods ``tgmd``, ``ties_soup``, ``dgmla`` and ``geometric_median``.

They work on any architecture (LLMs included). Unlike mergekit's stock group
methods they do not upcast whole inputs first: the kernels read row chunks in
the stored dtype and upcast one chunk at a time, so the in-memory and the
out-of-core (``host.chunked``) paths run the same code and give the same bytes.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Dict, Hashable, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple

import torch
from pydantic import Field

from mergekit_sdxl.errors import InputDataError
from mergekit_sdxl.host.mergekit_api import (
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
from mergekit_sdxl.kernels.memory_plan import MemoryPlan, compute_dtype_for
from mergekit_sdxl.kernels.tgmd import (
    InputValuesError,
    MedianObserver,
    TGMDParams,
    merge_geometric_median,
    merge_task_vectors,
    rows_cols,
)

LOG = logging.getLogger(__name__)

RowReader = Callable[[int, int], Optional[torch.Tensor]]

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Finite = Annotated[float, Field(allow_inf_nan=False)]

# The plan of merges run by mergekit itself (mergekit-yaml, the Python API): no budget.
UNBUDGETED = MemoryPlan()


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


_AUTHOR_NOTES = "https://github.com/6DammK9/nai-anime-pure-negative-prompt/tree/main/ch05"


def _task_vector_spec(
    name: str,
    pretty: str,
    drop_rate: float,
    aggregate: str,
    *,
    drop_method: str = "uniform",
    epsilon: float = 0.0,
    reference_url: str = _AUTHOR_NOTES,
) -> MergeMethodSpec:
    """The spec of one TGMD-family method: the same parameters, with these defaults."""
    return MergeMethodSpec(
        name=name,
        pretty_name=pretty,
        reference_url=reference_url,
        contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=1),
        optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
        parameters=(
            _per_model("density", Fraction, 1.0, ParameterScope.NON_BASE),
            _per_model("drop_rate", Fraction, drop_rate, ParameterScope.NON_BASE),
            _per_model("epsilon", Finite, epsilon, ParameterScope.NON_BASE),
            _per_model("weight", NonNegative, 1.0, ParameterScope.NON_BASE),
            _shared("drop_method", Literal["uniform", "della"], drop_method),
            _shared("rescale", Fraction, 0.0),
            _shared("sign_election", Literal["count", "sum"], "count"),
            _shared("aggregate", Literal["median", "mean"], aggregate),
            *_median_parameters(),
            _shared("lambda", float, 1.0),
            _shared("seed", int, 0),
            _shared("on_nonfinite", Literal["skip", "error"], "skip"),
        ),
    )


def mask_identity(model: Any) -> str:
    """The identity of an input in the DROP masks: the model as written in the config
    (``str`` of its mergekit ``ModelReference``). Both the in-memory and the chunked path use
    this one function, so their masks, and outputs, cannot diverge."""
    return str(model)


@dataclass(frozen=True)
class BoundParameters:
    """A method's parameters for one key: shared values, and per-model values in input order."""

    shared: Dict[str, Any]
    per_model: Dict[str, Tuple[Any, ...]]


def bind_parameters(
    spec: MergeMethodSpec,
    shared: Mapping[str, Any],
    per_model: Callable[[Hashable, str], Any],
    models: Sequence[Hashable],
) -> BoundParameters:
    """The one binding path of this plugin's methods: each value checked by mergekit's own
    ``ParameterSpec.validate``. ``per_model(model, name)`` looks a per-model value up."""
    return BoundParameters(
        shared={p.name: _validated(p, shared[p.name]) for p in spec.shared_parameters},
        per_model={p.name: tuple(_validated(p, per_model(m, p.name)) for m in models) for p in spec.input_parameters},
    )


# (id(parameter), type, value) -> (parameter, validated value). Every key binds the same few values
# for each of its N models (a million pydantic validations at N = 1000 with 2515 keys); a
# parameter's validation is a pure function of the value, so each distinct value is checked once.
_VALIDATED: Dict[Tuple[int, type, Any], Tuple[Any, Any]] = {}
_VALIDATED_MAX = 4096


def _validated(parameter: Any, value: Any) -> Any:
    try:
        key = (id(parameter), type(value), value)
        found = _VALIDATED.get(key)
    except TypeError:  # an unhashable value (a list): validated every time
        return parameter.validate(value)
    if found is not None and found[0] is parameter:
        return found[1]
    checked = parameter.validate(value)
    if len(_VALIDATED) >= _VALIDATED_MAX:
        _VALIDATED.clear()
    _VALIDATED[key] = (parameter, checked)
    return checked


@dataclass(frozen=True)
class ReaderInputs:
    """One tensor's inputs as row readers, in config order."""

    tensor_name: str
    shape: Tuple[int, ...]
    base: Optional[RowReader]
    models: Tuple[RowReader, ...]
    model_keys: Tuple[str, ...]  # mask_identity of each model
    labels: Tuple[str, ...]  # for messages
    on_median: Optional[MedianObserver] = None  # told a median's coefficients (merge --report)


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
    """A group method whose kernel runs over row readers, in chunks.

    mergekit calls :meth:`_execute` with whole in-memory groups (mergekit-yaml, the Python API);
    mergekit-sdxl's own tasks call :meth:`merge_readers` directly (host/tasks.py). Both bind
    parameters with :func:`bind_parameters` and name models with :func:`mask_identity`.
    """

    def uses_base(self) -> bool:
        return self.spec.contract.base != BasePolicy.IGNORED

    def merge_readers(
        self,
        inputs: ReaderInputs,
        parameters: BoundParameters,
        compute_dtype: torch.dtype,
        rows: int,
        out_dtype: Optional[torch.dtype],
        reuse_bytes: int = 0,
    ) -> torch.Tensor:
        raise NotImplementedError

    def _merge_group(
        self, group: TensorGroup, parameters: Dict[str, Any], compute: torch.dtype, out_dtype: Optional[torch.dtype]
    ) -> torch.Tensor:
        shape = tuple(group.entries[0].tensor.shape)
        base = group.base if self.uses_base() else None
        others = group.non_base if self.uses_base() else group.entries
        if not others and base is not None:
            result = base.tensor.to(compute)
            return result.to(out_dtype) if out_dtype is not None else result
        rows, cols = rows_cols(torch.Size(shape))

        def reader(tensor: torch.Tensor) -> RowReader:
            flat = tensor.reshape(rows, cols)
            return lambda start, stop: flat[start:stop]

        ids = [entry.id for entry in others]
        inputs = ReaderInputs(
            tensor_name=group.metadata.name or "tensor",
            shape=shape,
            base=reader(base.tensor) if base is not None else None,
            models=tuple(reader(entry.tensor) for entry in others),
            model_keys=tuple(mask_identity(i) for i in ids),
            labels=tuple(mask_identity(i) for i in ids),
        )
        bound = bind_parameters(self.spec, parameters, lambda model, name: parameters[name][model], ids)
        chunk_rows = UNBUDGETED.rows_per_chunk(shape, len(others) + 1, compute)
        with UNBUDGETED.threads_for(group.entries[0].tensor.numel()):
            return self.merge_readers(inputs, bound, compute, chunk_rows, out_dtype)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        return self._merge_group(group, parameters, torch.float32, None)

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
            self._merge_group(group, kwargs, compute_dtype_for(dtype), out_dtype)
            for group, kwargs, dtype in zip(groups, parameters, input_dtypes, strict=True)
        )


class TaskVectorMedianMethod(ChunkedMergeMethod):
    """TGMD and its relatives (TIES-SOUP, DGMLA): DROP (uniform or DELLA), trim, sign election,
    disjoint mask, geometric median (or mean), add back."""

    def __init__(self, spec: MergeMethodSpec):
        self.spec = spec

    def merge_readers(
        self,
        inputs: ReaderInputs,
        parameters: BoundParameters,
        compute_dtype: torch.dtype,
        rows: int,
        out_dtype: Optional[torch.dtype],
        reuse_bytes: int = 0,
    ) -> torch.Tensor:
        per_model, shared = parameters.per_model, parameters.shared
        params = TGMDParams(
            drop_rate=tuple(per_model["drop_rate"]),
            density=tuple(per_model["density"]),
            weight=tuple(per_model["weight"]),
            drop_method=shared["drop_method"],
            epsilon=tuple(per_model["epsilon"]),
            rescale=shared["rescale"],
            sign_election=shared["sign_election"],
            aggregate=shared["aggregate"],
            eps=shared["eps"],
            maxiter=shared["maxiter"],
            ftol=shared["ftol"],
            lambda_=shared["lambda"],
            seed=shared["seed"],
        )
        base = inputs.base
        if base is None:  # BasePolicy.REQUIRED: mergekit and DirectGather refuse a group without one
            raise ValueError(f"{inputs.tensor_name}: {self.spec.name} needs a base model")
        with _input_values_are_user_errors():
            return merge_task_vectors(
                inputs.tensor_name,
                torch.Size(inputs.shape),
                base,
                inputs.models,
                inputs.model_keys,
                params,
                compute_dtype,
                rows,
                out_dtype=out_dtype,
                on_bad_input=_bad_input_handler(inputs, shared["on_nonfinite"]),
                reuse_bytes=reuse_bytes,
                on_median=inputs.on_median,
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

    def merge_readers(
        self,
        inputs: ReaderInputs,
        parameters: BoundParameters,
        compute_dtype: torch.dtype,
        rows: int,
        out_dtype: Optional[torch.dtype],
        reuse_bytes: int = 0,
    ) -> torch.Tensor:
        per_model, shared = parameters.per_model, parameters.shared
        with _input_values_are_user_errors():
            return merge_geometric_median(
                inputs.tensor_name,
                torch.Size(inputs.shape),
                inputs.models,
                weights=tuple(per_model["weight"]),
                eps=shared["eps"],
                maxiter=shared["maxiter"],
                ftol=shared["ftol"],
                compute_dtype=compute_dtype,
                rows_per_chunk=rows,
                out_dtype=out_dtype,
                on_bad_input=_bad_input_handler(inputs, shared["on_nonfinite"]),
                reuse_bytes=reuse_bytes,
                on_median=inputs.on_median,
            )


def build_methods() -> Tuple[ChunkedMergeMethod, ...]:
    """Construct (not register) the plugin's methods."""
    return (
        TaskVectorMedianMethod(_task_vector_spec("tgmd", "TIES-GeoMedian with DROP (TGMD)", 0.1, "median")),
        TaskVectorMedianMethod(_task_vector_spec("ties_soup", "TIES-SOUP", 0.0, "mean")),
        # AstolfoMix-XL's DGMLA: TGMD with DELLA's rank-dependent drop (p 0.1, epsilon -0.1), no rescale.
        TaskVectorMedianMethod(
            _task_vector_spec(
                "dgmla",
                "DELLA-GeoMedian (DGMLA)",
                0.1,
                "median",
                drop_method="della",
                epsilon=-0.1,
                reference_url="https://github.com/6DammK9/nai-anime-pure-negative-prompt/blob/main/ch05/README_XL.MD",
            )
        ),
        GeometricMedianMethod(),
    )
