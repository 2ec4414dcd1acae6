"""mergekit's built-in merge methods under a memory budget: row chunks, plus a pre-pass for the
per-tensor statistics a method needs.

mergekit runs its methods on whole tensors: a key's N inputs are loaded and upcast together. Under
``mergekit-sdxl merge --memory-budget`` (host/planner.py ``_key_task``) a key merged by one of the
methods below runs here instead (host/tasks.py ``MergeKeyTask``), from row readers, in memory or
straight from the files, in row chunks of the plan's size. Per method an adapter says which
statistics of the whole tensor it needs, computes them first, then runs mergekit's own code on each
chunk with those statistics fixed:

======================================  =========================================  ==========================
method                                  pre-pass (whole tensor)                    per chunk
======================================  =========================================  ==========================
linear, task_arithmetic, passthrough,   none                                       mergekit's method
nearswap; model_stock with filter_wise
ties, breadcrumbs, breadcrumbs_ties     per model, one at a time: mergekit's       kept set as a mask, then
                                        ``sparsify`` on its whole task vector ->   mergekit's task-arithmetic
                                        the kept set; the L1 rescale factor        combination
dare_ties, dare_linear, della,          L1 rescale sums (when ``rescale``)         counter-based mask, then
della_linear                                                                       the same combination
sce                                     variance top-k; per-model mean squares     SCE's combination
model_stock                             Gram matrix of the offsets (cosines)       the interpolation
======================================  =========================================  ==========================

Bytes. Elementwise methods and the magnitude-sparsified ones give stock mergekit's bytes: the
statistics are computed by mergekit's own code on the same whole tensors, and every chunk holds a
multiple of 128 elements, so torch's reductions over the models (vectorised in blocks of 32 or 64
elements) add each element's terms in the same order as on the whole tensor. One exception: the
combination runs on a zero base and the base is added after, so a merged value that is exactly
zero where the base holds -0.0 comes out +0.0. ``sce`` and ``model_stock`` sum their statistics in
float64 in a chunk-independent order, so they agree with mergekit's float32 sums to about 1e-7
relative. The random methods draw this plugin's counter-based masks (``kernels/rng.py``: a pure
function of ``--random-seed``, the tensor name, the model and the element), never torch's global
generator; their results do not depend on the chunk size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_sdxl.errors import InputDataError, UsageError
from mergekit_sdxl.host.mergekit_api import (
    GeneralizedTaskArithmeticMerge,
    MergeMethod,
    ParameterScope,
    SparsificationMethod,
    TensorEntry,
    TensorGroup,
    TensorMetadata,
    sign_consensus_mask,
    sparsify,
)
from mergekit_sdxl.host.methods import RowReader, bind_parameters, mask_identity
from mergekit_sdxl.kernels.geomedian import GramAccumulator
from mergekit_sdxl.kernels.memory_plan import MemoryPlan, compute_dtype_for
from mergekit_sdxl.kernels.rng import U_BITS, keep_masks, uniform_bits
from mergekit_sdxl.kernels.tgmd import rows_cols

__all__ = ["ELEMENTWISE", "WITH_STATISTICS", "BuiltinKey", "budgeted", "statistics_bytes_per_element", "merge_builtin"]

# mergekit methods that give the same result row chunk by row chunk: mergekit's own code runs on each chunk.
ELEMENTWISE = frozenset({"linear", "task_arithmetic", "passthrough", "nearswap"})
# mergekit methods that need statistics of the whole tensor first (the adapters below).
WITH_STATISTICS = frozenset(
    {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce"}
)

# Every chunk but the last holds a multiple of this many elements: torch sums over the models in
# vector blocks of 32 (AVX2) or 64 (AVX-512) float32 lanes, handling a block's tail in another
# order, so chunk lengths that are multiples of the block keep each element's order of addition.
_ALIGN = 128
_EPS = 1e-7  # mergekit's rescaled_masked_tensor: norms below this are not rescaled
_U_SCALE = 2.0**-U_BITS


def budgeted(method: MergeMethod) -> bool:
    """Whether ``method`` is one of mergekit's built-ins this module merges within a budget with a
    pre-pass (:data:`WITH_STATISTICS`; the elementwise ones need none)."""
    name = method.spec.name
    if name not in WITH_STATISTICS:
        return False
    if name in ("sce", "model_stock"):
        return True
    return isinstance(method, GeneralizedTaskArithmeticMerge) and method.sparsification_method is not None


def statistics_bytes_per_element(method: MergeMethod) -> int:
    """Bytes per element of the key the pre-pass holds beyond the chunks (for the planner): the
    magnitude sort holds the base and one model's task vector whole, with mergekit's mask, sort
    values and int64 indices; ``sce`` its variance, selection and top-k."""
    if method.spec.name == "sce":
        return 24
    if isinstance(method, GeneralizedTaskArithmeticMerge) and method.sparsification_method in (
        SparsificationMethod.magnitude,
        SparsificationMethod.magnitude_outliers,
    ):
        return 48
    return 0


@dataclass(frozen=True)
class BuiltinKey:
    """One key merged by a built-in method: readers in the config's model order (None: that input
    lacks the key), the dtypes mergekit would use and the memory plan."""

    name: str
    shape: Tuple[int, ...]
    readers: Tuple[Tuple[Hashable, Optional[RowReader]], ...]
    base: Optional[Hashable]
    dtype: Optional[torch.dtype]  # the config's dtype; None: mergekit promotes the stored dtypes
    out_dtype: Optional[torch.dtype]
    plan: MemoryPlan
    seed: int = 0  # of the counter-based masks (mergekit's --random-seed)


PerInput = Callable[[Hashable, str], Any]


def merge_builtin(method: MergeMethod, key: BuiltinKey, shared: Mapping[str, Any], per_input: PerInput) -> torch.Tensor:
    """Merge one key with mergekit's ``method`` within the key's plan. ``shared``: the resolved
    shared parameters; ``per_input(model, name)``: a resolved per-model value."""
    name = method.spec.name
    if math.prod(key.shape) == 0:  # nothing to chunk: mergekit's method as it is
        return _mergekit_rows(method, key, shared, per_input)
    if name == "model_stock":
        if bool(shared.get("filter_wise", False)):  # cosines per row: mergekit's code on whole rows
            return _mergekit_rows(method, key, shared, per_input, whole_rows=True)
        return _ModelStock().merge(method, key, shared, per_input)
    if name == "sce":
        return _SCE().merge(method, key, shared, per_input)
    if isinstance(method, GeneralizedTaskArithmeticMerge) and method.sparsification_method is not None:
        return _TaskArithmetic(method).merge(method, key, shared, per_input)
    return _mergekit_rows(method, key, shared, per_input)


# ----------------------------------------------------------------------------- reading a key


class _View:
    """One key's readers as chunks of whole rows, in the original trailing shape."""

    def __init__(self, key: BuiltinKey, copies: int, whole_rows: bool = False, upcast: bool = True) -> None:
        self.key = key
        self.rows, self.cols = rows_cols(torch.Size(key.shape))
        self.numel = self.rows * self.cols
        self.present = [(m, r) for m, r in key.readers if r is not None]
        readers = dict(self.present)
        self.base = readers.get(key.base) if key.base is not None else None
        self.models = [(m, r) for m, r in self.present if m != key.base]
        # ``copies`` compute-dtype copies per input in one chunk; the plan sizes chunks for four.
        inputs = -(-max(1, len(self.present)) * copies // 4)
        step = key.plan.rows_per_chunk(key.shape, inputs, compute_dtype_for(key.dtype))
        if whole_rows and len(key.shape) < 2:
            step = self.rows  # a vector's statistics span all of it
        self.step = _aligned(step, self.rows, self.cols)
        self.dtype = (key.dtype or self._stored_dtype()) if upcast else None
        self._base_whole: Optional[torch.Tensor] = None

    def _stored_dtype(self) -> torch.dtype:
        """mergekit's compute dtype when the config names none: the promoted stored dtypes."""
        dtype: Optional[torch.dtype] = None
        for _model, reader in self.present:
            probe = reader(0, min(1, self.rows))
            if probe is None:
                continue
            dtype = probe.dtype if dtype is None else torch.promote_types(dtype, probe.dtype)
        return dtype or torch.float32

    def chunks(self) -> Iterator[Tuple[int, int]]:
        if self.rows == 0:
            yield 0, 0
        for r0 in range(0, self.rows, self.step):
            yield r0, min(self.rows, r0 + self.step)

    def row_shape(self, r0: int, r1: int) -> Tuple[int, ...]:
        return (r1 - r0, *self.key.shape[1:]) if self.key.shape else ()

    def stored(self, reader: RowReader, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 as stored, in the original trailing shape."""
        x = reader(r0, r1)
        if x is None:
            raise InputDataError(f"key {self.key.name}: an input lost this key while it was merged")
        if not x.is_floating_point():
            raise InputDataError(f"key {self.key.name} is not floating point; it cannot be merged")
        if x.numel() != (r1 - r0) * self.cols:
            raise ValueError(f"{self.key.name}: rows {r0}:{r1} gave {x.numel()} elements, expected {(r1 - r0) * self.cols}")
        return x.reshape(self.row_shape(r0, r1))

    def read(self, reader: RowReader, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 in mergekit's compute dtype (its ``align_dtype``, per chunk)."""
        assert self.dtype is not None
        return self.stored(reader, r0, r1).to(self.dtype)

    def base_rows(self, r0: int, r1: int) -> torch.Tensor:
        if self.base is None:
            raise InputDataError(f"key {self.key.name}: the base model lacks this key")
        if self._base_whole is not None:
            return self._base_whole[r0:r1] if self.key.shape else self._base_whole
        return self.read(self.base, r0, r1)

    def deltas(self, b: torch.Tensor, r0: int, r1: int) -> List[torch.Tensor]:
        """Each model's task vector on rows r0:r1 (``entry.tensor - base``, as mergekit)."""
        return [self.read(reader, r0, r1) - b for _model, reader in self.models]

    def whole_delta(self, index: int) -> torch.Tensor:
        """Model ``index``'s whole task vector; the base is kept whole while the pre-pass runs."""
        if self._base_whole is None:
            self._base_whole = self.base_rows(0, self.rows)
        return self.read(self.models[index][1], 0, self.rows) - self._base_whole

    def release(self) -> None:
        self._base_whole = None

    def element_range(self, r0: int, r1: int) -> Tuple[int, int]:
        return r0 * self.cols, (r1 - r0) * self.cols


def _aligned(step: int, rows: int, cols: int) -> int:
    """Rows per chunk: at most ``step`` (or the alignment unit), a multiple of the rows that make
    :data:`_ALIGN` elements, unless one chunk holds the whole tensor."""
    if step >= rows or cols == 0:
        return max(1, rows)
    unit = _ALIGN // math.gcd(cols, _ALIGN)
    return min(rows, max(unit, step - step % unit))


class _Output:
    """The merged key, filled chunk by chunk."""

    def __init__(self, view: _View) -> None:
        self.view = view
        self.flat: Optional[torch.Tensor] = None

    def put(self, r0: int, r1: int, chunk: torch.Tensor) -> None:
        if self.flat is None:
            self.flat = torch.empty(self.view.numel, dtype=chunk.dtype, device=chunk.device)
        start, count = self.view.element_range(r0, r1)
        self.flat[start : start + count] = chunk.reshape(-1)

    def result(self) -> torch.Tensor:
        assert self.flat is not None
        return self.flat.reshape(self.view.key.shape)


def _cast(x: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    # mergekit's GroupMergeMethod._execute: the result is cast to out_dtype when one is given.
    return x.to(out_dtype) if out_dtype is not None else x


class _RowSums:
    """Per-model sums of per-row float64 partials fed in row order, independent of the chunking:
    each row's partial is taken within one chunk, partials are added in fixed groups of rows, and
    the groups in one final reduction."""

    GROUP = 1024

    def __init__(self) -> None:
        self._pending: List[torch.Tensor] = []
        self._count = 0
        self._groups: List[torch.Tensor] = []

    def add(self, partials: torch.Tensor) -> None:
        """``partials``: [n, rows] float64, the next rows."""
        self._pending.append(partials)
        self._count += partials.shape[1]
        if self._count < self.GROUP:
            return
        data = torch.cat(self._pending, dim=1)
        full = self._count - self._count % self.GROUP
        self._groups.append(data[:, :full].reshape(data.shape[0], -1, self.GROUP).sum(dim=2))
        rest = data[:, full:]
        self._pending = [rest.clone()] if rest.shape[1] else []
        self._count = rest.shape[1]

    def total(self, n: int) -> torch.Tensor:
        parts = list(self._groups)
        if self._count:
            parts.append(torch.cat(self._pending, dim=1).sum(dim=1, keepdim=True))
        if not parts:
            return torch.zeros(n, dtype=torch.float64)
        return torch.cat(parts, dim=1).sum(dim=1)


def _row_partials(x: torch.Tensor, rows: int) -> torch.Tensor:
    """float64 sum of each of the ``rows`` rows of one model's chunk."""
    return x.reshape(rows, -1).sum(dim=1, dtype=torch.float64)


def _stack_partials(xs: Sequence[torch.Tensor], rows: int) -> torch.Tensor:
    return torch.stack([_row_partials(x, rows) for x in xs]) if xs else torch.zeros(0, rows, dtype=torch.float64)


# ----------------------------------------------------------------------------- elementwise


def _mergekit_rows(
    method: MergeMethod, key: BuiltinKey, shared: Mapping[str, Any], per_input: PerInput, whole_rows: bool = False
) -> torch.Tensor:
    """mergekit's ``method`` called on each row chunk through its public interface (which binds,
    validates and casts itself): for methods whose result per row depends on that row alone."""
    view = _View(key, copies=4, whole_rows=whole_rows, upcast=False)
    out = _Output(view)
    for r0, r1 in view.chunks():
        entries = tuple(
            TensorEntry(id=m, tensor=view.stored(reader, r0, r1), is_base=m == key.base) for m, reader in view.present
        )
        group = TensorGroup(entries=entries, metadata=TensorMetadata(name=key.name))
        parameters: Dict[str, Any] = dict(shared)
        for parameter in method.spec.input_parameters:
            ids = [e.id for e in (entries if parameter.scope == ParameterScope.INPUT else group.non_base)]
            parameters[parameter.name] = {m: per_input(m, parameter.name) for m in ids}
        (chunk,) = method((group,), parameters=parameters, dtype=key.dtype, out_dtype=key.out_dtype)
        out.put(r0, r1, chunk)
    return out.result()


# ----------------------------------------------------------------------------- task arithmetic family


class _Sparsifier(ABC):
    """What mergekit's ``sparsify`` does to one model's task vector, a chunk at a time (chunks in
    row order, each once)."""

    @abstractmethod
    def apply(self, d: torch.Tensor, start: int) -> torch.Tensor:
        """The sparsified task vector of the chunk ``d`` whose first element is ``start``."""


class _Identity(_Sparsifier):
    def apply(self, d: torch.Tensor, start: int) -> torch.Tensor:
        return d


class _Zeros(_Sparsifier):
    def apply(self, d: torch.Tensor, start: int) -> torch.Tensor:
        return torch.zeros_like(d)


def _magnitudes(d: torch.Tensor) -> torch.Tensor:
    # mergekit's magnitude / magnitude_outliers sort these: |delta|, as float32 on the CPU.
    w = d.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


class _KeptSet(_Sparsifier):
    """The elements mergekit's magnitude sort kept, from the whole task vector: all with magnitude
    strictly between the smallest and the largest kept magnitude ``lo`` and ``hi``, and, of those
    tied with ``lo`` or ``hi``, the ones the sort happened to keep (their flags in element order;
    torch's sort is not stable, so ties cannot be told by their index)."""

    def __init__(self, delta: torch.Tensor, kept_result: torch.Tensor, ratio: Optional[torch.Tensor]) -> None:
        w = _magnitudes(delta)
        # A zero task-vector entry is zero whether kept or not; only nonzero kept ones count.
        kept = kept_result.reshape(-1) != 0
        self.empty = not bool(kept.any())
        self.ratio = ratio
        self.bounds: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._cursor: List[int] = []
        if self.empty:
            return
        wk = w[kept]
        self.lo, self.hi = wk.min(), wk.max()
        for value in (self.lo, self.hi) if bool(self.hi != self.lo) else (self.lo,):
            self.bounds.append((value, kept[w == value].clone()))
            self._cursor.append(0)

    def apply(self, d: torch.Tensor, start: int) -> torch.Tensor:
        if self.empty:
            mask = torch.zeros_like(d)
        else:
            w = _magnitudes(d)
            keep = (w > self.lo) & (w < self.hi)
            for j, (value, flags) in enumerate(self.bounds):
                at = w == value
                count = int(at.sum())
                if count:
                    keep[at] = flags[self._cursor[j] : self._cursor[j] + count]
                    self._cursor[j] += count
            mask = keep.reshape(d.shape).to(d.dtype)
        masked = d * mask  # mergekit's rescaled_masked_tensor: tensor * mask
        return masked * self.ratio if self.ratio is not None else masked


def _l1_ratio(tensor: torch.Tensor, masked: torch.Tensor) -> Optional[torch.Tensor]:
    """mergekit's L1 rescale factor (``rescaled_masked_tensor``), from the whole tensors."""
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < _EPS or after < _EPS:
        return None
    return before / after


@functools.lru_cache(maxsize=1)
def _libc_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``). The magnitude pre-pass frees a
    whole tensor's sort per model but keeps a few small tensors of that model, allocated after
    it: without a trim they pin the freed pages, and memory grew by a tensor's size per model
    (2.9 GB at N = 117, 1/16 width, budget 1GB)."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)


def _work_dtype(d: torch.Tensor) -> torch.dtype:
    # mergekit's bernoulli / della_magprune: float32 on the CPU unless bfloat16.
    return d.dtype if d.device.type != "cpu" or d.dtype == torch.bfloat16 else torch.float32


class _RandomDrop(_Sparsifier):
    """DARE (``random``) or DELLA (``della_magprune``) with this plugin's counter-based draws in
    place of torch's generator; ``ratio`` the L1 rescale factor from the pre-pass (None: none)."""

    def __init__(self, view: _View, model: Hashable, kind: Any, density: float, epsilon: float) -> None:
        self.name = view.key.name
        self.seed = view.key.seed
        self.model_key = mask_identity(model)
        self.kind = kind
        self.density = density
        self.epsilon = epsilon
        self.ratio: Optional[float] = None

    def keep(self, d: torch.Tensor, start: int) -> torch.Tensor:
        """Keep flags of the chunk's elements, shaped like ``d``."""
        count = d.numel()
        if self.kind == SparsificationMethod.random:
            p = min(1.0, max(0.0, self.density))
            return keep_masks(self.seed, self.name, [self.model_key], start, count, [p], device=d.device)[0].reshape(d.shape)
        # della_magprune: keep probability from the magnitude's rank along dim 1 (per row), as mergekit.
        t = d.unsqueeze(0) if d.dim() < 2 else d
        work = _work_dtype(d)
        order = torch.argsort(t.abs(), dim=1, stable=True)  # stable: ties ranked by index, on any device
        ranks = order.argsort(dim=1).to(work) + 1
        low = ranks.min(dim=1, keepdim=True).values
        high = ranks.max(dim=1, keepdim=True).values
        rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
        probs = (self.density - self.epsilon) + rank_norm * 2 * self.epsilon
        u = uniform_bits(self.seed, self.name, self.model_key, start, count, device=d.device).to(torch.float64)
        # u * 2^-53 < p: the comparison keep_mask makes, so epsilon 0 gives DARE's masks exactly.
        return (u.mul_(_U_SCALE) < probs.reshape(-1).to(torch.float64)).reshape(d.shape)

    def masked(self, d: torch.Tensor, start: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x = d.to(_work_dtype(d))
        return x, x * self.keep(d, start).to(x.dtype)

    def apply(self, d: torch.Tensor, start: int) -> torch.Tensor:
        _x, masked = self.masked(d, start)
        if self.ratio is not None:
            masked = masked * torch.tensor(self.ratio, dtype=masked.dtype, device=masked.device)
        return masked.to(d.dtype)


class _TaskArithmetic:
    """ties, dare_*, breadcrumbs*, della*: mergekit's sparsification reproduced chunk by chunk,
    then mergekit's own task-arithmetic combination (the same method without sparsification) on
    each chunk, with a zero base so the sparsified task vectors reach it exactly."""

    def __init__(self, method: GeneralizedTaskArithmeticMerge) -> None:
        self.method = method
        self.combine = dataclasses.replace(method, sparsification_method=None)

    def merge(self, method: MergeMethod, key: BuiltinKey, shared: Mapping[str, Any], per_input: PerInput) -> torch.Tensor:
        kind = self.method.sparsification_method
        view = _View(key, copies=8, whole_rows=kind == SparsificationMethod.della_magprune)
        ids = [m for m, _ in view.models]
        bound = bind_parameters(self.method.spec, shared, per_input, ids)
        if not ids:  # mergekit: no task vectors, the base itself
            return _cast(view.base_rows(0, view.rows).reshape(key.shape), key.out_dtype)
        sparsifiers = self._sparsifiers(view, ids, bound.shared, bound.per_model)
        parameters: Dict[str, Any] = dict(bound.shared)
        for name, values in bound.per_model.items():
            parameters[name] = dict(zip(ids, values, strict=True))
        out = _Output(view)
        zero_id = key.base if key.base is not None else "base"
        for r0, r1 in view.chunks():
            b = view.base_rows(r0, r1)
            start, _count = view.element_range(r0, r1)
            entries = [TensorEntry(id=zero_id, tensor=torch.zeros_like(b), is_base=True)]
            for m, s, d in zip(ids, sparsifiers, view.deltas(b, r0, r1), strict=True):
                entries.append(TensorEntry(id=m, tensor=s.apply(d, start)))
            group = TensorGroup(entries=tuple(entries), metadata=TensorMetadata(name=key.name))
            # (0 + mixed_delta).to(dtype): mergekit's own normalisation, lambda and consensus.
            mixed = self.combine.merge_group(group, **parameters)
            out.put(r0, r1, _cast(b + mixed, key.out_dtype))
        return out.result()

    def _sparsifiers(
        self, view: _View, ids: Sequence[Hashable], shared: Dict[str, Any], per_model: Dict[str, Tuple[Any, ...]]
    ) -> List[_Sparsifier]:
        kind = self.method.sparsification_method
        rescale = bool(shared["rescale"])
        result: List[_Sparsifier] = []
        random: List[_RandomDrop] = []
        for j, model in enumerate(ids):
            density = float(per_model["density"][j])
            if density >= 1.0:  # every sparsifier returns the tensor itself
                result.append(_Identity())
            elif kind == SparsificationMethod.random:
                drop = _RandomDrop(view, model, kind, density, 0.0)
                result.append(drop)
                random.append(drop)
            elif kind == SparsificationMethod.della_magprune:
                epsilon = float(per_model["epsilon"][j])
                if density <= 0.0:
                    result.append(_Zeros())
                    continue
                if density + epsilon >= 1 or density - epsilon <= 0:
                    raise UsageError(
                        f"{model}: {self.method.spec.name} needs density +/- epsilon inside (0, 1), "
                        f"got density {density}, epsilon {epsilon}"
                    )
                drop = _RandomDrop(view, model, kind, density, epsilon)
                result.append(drop)
                random.append(drop)
            elif kind == SparsificationMethod.magnitude and (density <= 0.0 or view.numel == 0):
                result.append(_Zeros())
            else:
                result.append(self._kept_set(view, j, kind, density, per_model, rescale))
                _trim_heap()
        view.release()
        if rescale and random:
            self._random_ratios(view, random, result)
        return result

    def _kept_set(
        self, view: _View, j: int, kind: Any, density: float, per_model: Dict[str, Tuple[Any, ...]], rescale: bool
    ) -> _KeptSet:
        """One model's kept set from mergekit's own ``sparsify`` on its whole task vector."""
        delta = view.whole_delta(j)
        extra = {"gamma": float(per_model["gamma"][j])} if "gamma" in per_model else {}
        kept = sparsify(delta, density=density, method=kind, **extra)
        ratio = _l1_ratio(delta, kept) if rescale else None
        return _KeptSet(delta, kept, ratio)

    @staticmethod
    def _random_ratios(view: _View, drops: List[_RandomDrop], result: List[_Sparsifier]) -> None:
        """L1 rescale factors of the randomly dropped models: one pass over the chunks."""
        index = [next(i for i, s in enumerate(result) if s is d) for d in drops]
        before, after = _RowSums(), _RowSums()
        for r0, r1 in view.chunks():
            b = view.base_rows(r0, r1)
            start, _count = view.element_range(r0, r1)
            xs, ms = [], []
            for i, drop in zip(index, drops, strict=True):
                d = view.read(view.models[i][1], r0, r1) - b
                x, masked = drop.masked(d, start)
                xs.append(x.abs())
                ms.append(masked.abs())
            before.add(_stack_partials(xs, r1 - r0))
            after.add(_stack_partials(ms, r1 - r0))
        for drop, b_sum, a_sum in zip(drops, before.total(len(drops)).tolist(), after.total(len(drops)).tolist(), strict=True):
            drop.ratio = None if b_sum < _EPS or a_sum < _EPS else b_sum / a_sum


# ----------------------------------------------------------------------------- sce


class _SCE:
    """SCE: select by variance (top-k over the whole tensor), calculate per-model weights (mean
    squares over the whole tensor), erase by sign consensus; the combination as mergekit writes it."""

    def merge(self, method: MergeMethod, key: BuiltinKey, shared: Mapping[str, Any], per_input: PerInput) -> torch.Tensor:
        view = _View(key, copies=8)
        bound = bind_parameters(method.spec, shared, per_input, [])
        select_topk = float(bound.shared["select_topk"])
        assert view.dtype is not None
        mask_dtype = torch.int8 if bound.shared["int8_mask"] else view.dtype
        n = len(view.models)
        if n == 0:
            return _cast(view.base_rows(0, view.rows).reshape(key.shape), key.out_dtype)
        selection = self._selection(view, select_topk) if select_topk < 1 else None

        def task_vectors(b: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
            tv = torch.stack(view.deltas(b, r0, r1), dim=0)
            if selection is not None:
                start, count = view.element_range(r0, r1)
                part = selection[start : start + count].reshape(view.row_shape(r0, r1))
                tv = tv * part.to(device=tv.device, dtype=mask_dtype).unsqueeze(0)
            return tv

        squares = _RowSums()
        for r0, r1 in view.chunks():
            tv = task_vectors(view.base_rows(r0, r1), r0, r1)
            squares.add(tv.square().reshape(n, r1 - r0, -1).sum(dim=2, dtype=torch.float64))
        weights = (squares.total(n) / max(1, view.numel)).to(view.dtype)
        # mergekit's sce_weight, from the means.
        weight_sum = torch.sum(weights).item()
        weights = torch.ones_like(weights) / n if abs(weight_sum) < 1e-6 else weights / weight_sum
        out = _Output(view)
        for r0, r1 in view.chunks():
            b = view.base_rows(r0, r1)
            tv = task_vectors(b, r0, r1)
            erase_mask = sign_consensus_mask(tv, method="sum", mask_dtype=mask_dtype)
            tv_weights = weights
            while tv_weights.dim() < tv.dim():
                tv_weights = tv_weights.unsqueeze(-1)
            erased_weights = tv_weights * erase_mask
            merged_tv = (tv * erased_weights).sum(dim=0)
            final_tv = merged_tv / torch.sum(erased_weights, dim=0).clamp(min=1e-6)
            out.put(r0, r1, _cast(b + final_tv, key.out_dtype))
        return out.result()

    @staticmethod
    def _selection(view: _View, density: float) -> torch.Tensor:
        """mergekit's sce_mask as a bool [numel]: the top ``density`` of the nonzero variances."""
        if density <= 0:
            return torch.zeros(view.numel, dtype=torch.bool)
        assert view.dtype is not None
        var: Optional[torch.Tensor] = None
        for r0, r1 in view.chunks():
            tv = torch.stack(view.deltas(view.base_rows(r0, r1), r0, r1), dim=0)
            if var is None:
                var = torch.empty(view.numel, dtype=tv.dtype, device=tv.device)
            start, count = view.element_range(r0, r1)
            var[start : start + count] = torch.var(tv, dim=0, unbiased=False).reshape(-1)
        assert var is not None
        nonzero = torch.count_nonzero(var)
        k = int(nonzero * density)
        mask = torch.zeros(view.numel, dtype=torch.bool, device=var.device)
        if k == 0:
            return mask
        _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
        mask[indices] = True
        return mask


# ----------------------------------------------------------------------------- model_stock


class _ModelStock:
    """Model Stock over the whole tensor: the pairwise cosines of the offsets from the Gram matrix
    (float64, chunk-independent), then mergekit's interpolation chunk by chunk."""

    def merge(self, method: MergeMethod, key: BuiltinKey, shared: Mapping[str, Any], per_input: PerInput) -> torch.Tensor:
        view = _View(key, copies=6)
        assert view.dtype is not None
        n = len(view.models)
        if n < 2:
            raise InputDataError(f"key {key.name}: model_stock needs at least two models besides the base")
        gram = GramAccumulator(n)
        for r0, r1 in view.chunks():
            offsets = view.deltas(view.base_rows(r0, r1), r0, r1)
            gram.update(torch.stack([o.reshape(-1) for o in offsets]))
        g = gram.result()
        norms = torch.diagonal(g).clamp(min=0).sqrt()
        cos_thetas = [
            (g[a, b] / (norms[a] * norms[b]).clamp(min=1e-6)).clamp(-1, 1) for a in range(n) for b in range(a + 1, n)
        ]
        cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
        count = n
        denominator = 1 + (count - 1) * cos_theta
        singular = denominator.abs() < 1e-6
        safe_denominator = torch.where(singular, torch.ones_like(denominator), denominator)
        t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe_denominator).to(view.dtype)
        out = _Output(view)
        for r0, r1 in view.chunks():
            w_0 = view.base_rows(r0, r1).reshape(-1)
            ws = [view.read(reader, r0, r1).reshape(-1) for _m, reader in view.models]
            average = sum(ws) / count
            out.put(r0, r1, _cast(t * average + (1 - t) * w_0, key.out_dtype))
        return out.result()
