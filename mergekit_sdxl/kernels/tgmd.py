"""Per-tensor TGMD driver: the one code path for in-memory and out-of-core merges.

A tensor is read through reader callables in row chunks (any ``rows_per_chunk``), so memory
is O(N x chunk): never N whole upcast copies. Everything per element is computed chunk-wise;
the only whole-tensor quantities are the DELLA rank sketches and the trim thresholds (pre-passes,
one model at a time, kept as O(sqrt n) and O(1) numbers per model) and the Gram matrix of the
median (canonically blocked). The result is therefore bit-identical for any chunk size and thread
count on a given device.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from .aggregate import disjoint_mean, ordered_sum
from .consensus import elect_sign
from .della import DellaSketch, della_keep, della_sketch
from .geomedian import GramAccumulator, weiszfeld_gram
from .rng import keep_masks
from .sparsify import trim_threshold
from .tgmd_fused import NotOnCPU, resolve_kernel, tgmd_fused_once

__all__ = [
    "TGMDParams",
    "DROP_METHODS",
    "RowReader",
    "MaskFn",
    "rows_cols",
    "tensor_reader",
    "warn_bad_input",
    "merge_task_vectors",
    "merge_geometric_median",
    "tgmd_merge",
]

RowReader = Callable[[int, int], Optional[torch.Tensor]]
"""(row_start, row_end) -> rows of one tensor viewed as [rows, cols], stored dtype; None if absent."""

MaskFn = Callable[[int, int, int], torch.Tensor]
"""(model_index, element_start, count) -> keep mask Bool[count]; overrides the DROP generator."""

_SIGN_ELECTIONS = ("count", "sum", "none")
_AGGREGATES = ("median", "mean")
DROP_METHODS = ("uniform", "della")


@dataclass(frozen=True)
class TGMDParams:
    """Parameters of one TGMD-family merge. Per-model sequences index the non-base models."""

    drop_rate: Sequence[float]
    density: Sequence[float]
    weight: Sequence[float]
    rescale: float = 0.0
    sign_election: str = "count"
    aggregate: str = "median"
    eps: float = 1e-6
    maxiter: int = 100
    ftol: float = 1e-20
    lambda_: float = 1.0
    seed: int = 0
    # DROP's keep probability: ``uniform`` 1 - p for every entry; ``della`` by magnitude rank
    # within the model's task vector, shifted by the per-model ``epsilon`` (kernels/della.py).
    drop_method: str = "uniform"
    epsilon: Sequence[float] = ()  # per model; empty: 0 for every model

    def __post_init__(self) -> None:
        n = len(self.drop_rate)
        if len(self.density) != n or len(self.weight) != n:
            raise ValueError("drop_rate, density and weight need one entry per model")
        if self.drop_method not in DROP_METHODS:
            raise ValueError(f"drop_method must be one of {DROP_METHODS}, got {self.drop_method!r}")
        if not self.epsilon:
            object.__setattr__(self, "epsilon", (0.0,) * n)
        if len(self.epsilon) != n:
            raise ValueError("epsilon needs one entry per model")
        for e in self.epsilon:
            if not math.isfinite(e):
                raise ValueError(f"epsilon must be finite, got {e}")
        for p in self.drop_rate:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"drop_rate must be in [0, 1], got {p}")
        for k in self.density:
            if not 0.0 <= k <= 1.0:
                raise ValueError(f"density must be in [0, 1], got {k}")
        for w in self.weight:
            if not (math.isfinite(w) and w >= 0.0):
                raise ValueError(f"weight must be finite and >= 0, got {w}")
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"rescale must be in [0, 1], got {self.rescale}")
        if self.sign_election not in _SIGN_ELECTIONS:
            raise ValueError(f"sign_election must be one of {_SIGN_ELECTIONS}, got {self.sign_election!r}")
        if self.aggregate not in _AGGREGATES:
            raise ValueError(f"aggregate must be one of {_AGGREGATES}, got {self.aggregate!r}")
        if not self.eps > 0.0 or self.maxiter < 1 or not self.ftol >= 0.0:
            raise ValueError("need eps > 0, maxiter >= 1, ftol >= 0")
        if not math.isfinite(self.lambda_):
            raise ValueError("lambda must be finite")

    def della(self, i: int) -> bool:
        """Whether model ``i``'s masks depend on magnitude ranks (DELLA with epsilon != 0 and
        something kept); otherwise they are uniform DROP's (DELLA with epsilon 0 is the same)."""
        return self.drop_method == "della" and self.epsilon[i] != 0.0 and self.drop_rate[i] < 1.0

    def uses_della(self) -> bool:
        return any(self.della(i) for i in range(len(self.drop_rate)))


MedianObserver = Callable[[List[int], torch.Tensor], None]
"""``on_median(active, coeffs)``: the median's float64 coefficients, ``coeffs[j]`` of model ``active[j]``."""


def rows_cols(shape: Sequence[int]) -> Tuple[int, int]:
    """How a tensor is viewed for row chunking: rows = shape[0] (1 for 0-d), cols = numel // rows."""
    shape = tuple(shape)
    numel = math.prod(shape)
    rows = shape[0] if shape else 1
    return rows, (numel // rows if rows else 0)


def tensor_reader(t: Optional[torch.Tensor]) -> RowReader:
    """A :data:`RowReader` over an in-memory tensor (None: a model that lacks the tensor)."""
    if t is None:
        return lambda r0, r1: None
    rows, cols = rows_cols(t.shape)
    view = t.reshape(rows, cols)
    return lambda r0, r1: view[r0:r1]


def warn_bad_input(model_index: int, message: str) -> None:
    """Default ``on_bad_input``: warn and go on without that model for this tensor."""
    warnings.warn(f"{message}; left out of this tensor", RuntimeWarning, stacklevel=3)


class InputValuesError(ValueError):
    """The input values themselves cannot be merged (a missing or non-finite base, no usable
    model, a result outside the save dtype); not a programming error."""


class _BadInput(Exception):
    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.message = message


class _Absent(Exception):
    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _row_chunks(rows: int, rows_per_chunk: int) -> Iterator[Tuple[int, int]]:
    step = max(1, int(rows_per_chunk))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _finite(x: torch.Tensor) -> bool:
    # One streaming reduction instead of isfinite + all: any NaN/inf makes the sum non-finite;
    # a finite-but-overflowing sum is a false alarm settled by the exact check.
    if x.numel() == 0:
        return True
    total = x.sum(dtype=torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.sum()
    if bool(torch.isfinite(total)):
        return True
    return bool(torch.isfinite(x).all())


def _first_bad_row(x: torch.Tensor) -> Optional[int]:
    """Index of the first row of ``x`` [N, k] with a non-finite value, None if all are finite."""
    if _finite(x):
        return None
    bad = torch.nonzero(~torch.isfinite(x).all(dim=1))
    return int(bad[0, 0]) if bad.numel() else None


class _Context:
    """Reads and prepares chunks of one tensor (shared by all passes)."""

    def __init__(
        self,
        tensor_name: str,
        shape: Sequence[int],
        compute_dtype: torch.dtype,
        rows_per_chunk: int,
        device,
        reuse_bytes: int = 0,
        on_median: Optional[MedianObserver] = None,
    ) -> None:
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
        self.name = tensor_name
        self.shape = torch.Size(shape)
        self.rows, self.cols = rows_cols(self.shape)
        self.numel = self.shape.numel()
        self.dtype = compute_dtype
        self.rows_per_chunk = rows_per_chunk
        self.device = torch.device(device) if device is not None else None
        # Chunks read by one pass, kept (up to reuse_bytes) for the next: a key that does not fit
        # the budget whole is then read twice only beyond what the budget can hold.
        self.reuse_bytes = max(0, int(reuse_bytes))
        self._kept: Dict[Tuple[int, int, int], torch.Tensor] = {}
        self._kept_bytes = 0
        self._on_median = on_median

    def median_found(self, active: Sequence[int], coeffs: torch.Tensor) -> None:
        """Tell the observer the median's coefficients (``coeffs[j]`` of model ``active[j]``)."""
        if self._on_median is not None:
            self._on_median(list(active), coeffs)

    def chunks(self) -> Iterator[Tuple[int, int]]:
        return _row_chunks(self.rows, self.rows_per_chunk)

    def read_raw(self, reader: RowReader, r0: int, r1: int, what: str) -> Optional[torch.Tensor]:
        """Flattened chunk in its stored dtype (checked length), or None if absent."""
        key = (id(reader), r0, r1)  # readers live as long as this context
        kept = self._kept.get(key)
        if kept is not None:
            return kept
        x = reader(r0, r1)
        if x is None:
            return None
        expect = (r1 - r0) * self.cols
        if x.numel() != expect:
            raise ValueError(f"{self.name}: {what} returned {x.numel()} elements for rows {r0}:{r1}, expected {expect}")
        if self.device is None:
            self.device = x.device
        flat = x.reshape(-1)
        size = flat.numel() * flat.element_size()
        if self.reuse_bytes and self._kept_bytes + size <= self.reuse_bytes:
            self._kept[key] = flat
            self._kept_bytes += size
        return flat

    def read(self, reader: RowReader, r0: int, r1: int, what: str) -> Optional[torch.Tensor]:
        """Flattened chunk upcast to the compute dtype (per chunk only), or None if absent."""
        x = self.read_raw(reader, r0, r1, what)
        if x is None:
            return None
        return x.to(device=self.device, dtype=self.dtype)

    def stack(
        self, readers: Sequence[RowReader], indices: Sequence[int], r0: int, r1: int, what: Callable[[int], str]
    ) -> Tuple[torch.Tensor, List[bool]]:
        """[len(indices), k] compute-dtype rows of the given models (upcast straight into one
        buffer; exact), and which were present (absent rows are left unset)."""
        k = (r1 - r0) * self.cols
        xs = [self.read_raw(readers[i], r0, r1, what(i)) for i in indices]
        out = torch.empty(len(indices), k, dtype=self.dtype, device=self.device)
        for j, x in enumerate(xs):
            if x is not None:
                out[j].copy_(x)
        return out, [x is not None for x in xs]

    def base(self, reader: RowReader, r0: int, r1: int) -> torch.Tensor:
        b = self.read(reader, r0, r1, "base")
        if b is None:
            raise InputValuesError(f"{self.name}: the base model lacks this tensor")
        if not _finite(b):
            raise InputValuesError(f"{self.name}: the base model has non-finite values (rows {r0}:{r1})")
        return b

    def writer(self, out_dtype: torch.dtype) -> _Output:
        return _Output(self, out_dtype)


class _Output:
    def __init__(self, ctx: _Context, out_dtype: torch.dtype) -> None:
        self.ctx = ctx
        self.flat = torch.empty(ctx.numel, dtype=out_dtype, device=ctx.device)

    def put(self, start: int, values: torch.Tensor) -> None:
        cast = values.to(self.flat.dtype)
        # Checked after the cast too: overflow of the save dtype is an error, never a clamp.
        if not _finite(values) or not _finite(cast):
            raise InputValuesError(
                f"{self.ctx.name}: merged values are not finite in {self.flat.dtype} "
                f"(elements {start}:{start + values.numel()})"
            )
        self.flat[start : start + values.numel()] = cast.to(self.flat.device)

    def result(self) -> torch.Tensor:
        return self.flat.reshape(self.ctx.shape)


def _ordered_combination(coeffs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """sum_k coeffs[k] * rows[k] in fixed order, separate multiply and add (no FMA), so the
    result per element does not depend on the chunk width."""
    # Python floats round to the rows' dtype exactly as a cast of the coefficient tensor does.
    c = coeffs.to(device="cpu", dtype=rows.dtype).tolist()
    acc = torch.zeros(rows.shape[1:], dtype=rows.dtype, device=rows.device)
    tmp = torch.empty_like(acc)
    for k in range(rows.shape[0]):
        torch.mul(rows[k], c[k], out=tmp)
        acc += tmp
    return acc


def _add_back(b: torch.Tensor, result: torch.Tensor, lambda_: float) -> torch.Tensor:
    return b + (result if lambda_ == 1.0 else result * lambda_)


def merge_task_vectors(
    tensor_name: str,
    shape: Sequence[int],
    base: RowReader,
    models: Sequence[RowReader],
    model_keys: Sequence[str],
    params: TGMDParams,
    compute_dtype: torch.dtype,
    rows_per_chunk: int,
    out_dtype: Optional[torch.dtype] = None,
    on_bad_input: Callable[[int, str], None] = warn_bad_input,
    *,
    masks: Optional[MaskFn] = None,
    device=None,
    kernel: Optional[str] = None,
    reuse_bytes: int = 0,
    on_median: Optional[MedianObserver] = None,
) -> torch.Tensor:
    """TGMD and its relatives (TIES, TIES-SOUP, TSD, DARE-TIES) for one tensor.

    ``models[i]`` reads model i (not the base); ``model_keys[i]`` names it for the DROP masks.
    A model with non-finite values is left out of the whole tensor after calling
    ``on_bad_input(i, message)`` (which may raise instead). A reader returning None abstains
    (zero task vector, no vote). A non-finite result raises ValueError.
    ``masks`` replaces the random DROP masks (tests, reproducing published masks).
    ``kernel``: ``auto`` (default, or ``MERGEKIT_SDXL_KERNEL``): the fused numba kernels on CPU,
    the torch reference elsewhere; ``fused`` / ``torch`` force one. Both give the same bytes.
    DELLA masks (``params.uses_della()``) are drawn by the torch reference only, whatever ``kernel``.
    ``reuse_bytes``: how much of the rows read by the first pass may be kept for the second
    (readers over files; 0 for in-memory readers). ``on_median(active, coeffs)`` is called with
    the median's coefficients when the aggregate is the median (the merge report's weights).
    """
    n = len(models)
    if len(model_keys) != n or len(params.drop_rate) != n:
        raise ValueError(f"{tensor_name}: {n} models but {len(model_keys)} keys and {len(params.drop_rate)} parameter sets")
    ctx = _Context(tensor_name, shape, compute_dtype, rows_per_chunk, device, reuse_bytes, on_median)
    out_dtype = out_dtype or compute_dtype
    # Explicit masks and DELLA's rank-dependent ones exist in the torch reference only.
    chosen = resolve_kernel(kernel, ctx.device, masks is not None or params.uses_della())
    excluded: List[int] = []
    while True:
        active = [i for i in range(n) if i not in excluded]
        try:
            if chosen == "fused" and active and ctx.numel:
                try:
                    return tgmd_fused_once(ctx, base, models, model_keys, params, active, out_dtype)
                except NotOnCPU:  # the readers gave device tensors: the reference runs anywhere
                    chosen = "torch"
                    continue
            return _tgmd_once(ctx, base, models, model_keys, params, active, out_dtype, masks)
        except _BadInput as bad:
            excluded.append(bad.index)
            on_bad_input(bad.index, bad.message)


Sketches = Mapping[int, DellaSketch]
"""model index -> the DELLA sketch of its task vector in this tensor (models with DELLA masks)."""


def _raw_deltas(
    ctx: _Context,
    models: Sequence[RowReader],
    model_keys: Sequence[str],
    idx: Sequence[int],
    b: torch.Tensor,
    r0: int,
    r1: int,
) -> Tuple[torch.Tensor, List[bool]]:
    """Task vectors [len(idx), k] of models ``idx`` on rows r0:r1 (rows of absent models are
    zero) and which models are present; the first model with a non-finite value raises."""
    d, present = ctx.stack(models, idx, r0, r1, lambda i: f"model {model_keys[i]}")
    d.sub_(b)
    for j, ok in enumerate(present):
        if not ok:
            d[j].zero_()
    bad = _first_bad_row(d)
    if bad is not None:
        i = idx[bad]
        raise _BadInput(i, f"{ctx.name}: model {model_keys[i]} has non-finite values (rows {r0}:{r1})")
    return d, present


def _apply_drop(
    ctx: _Context,
    model_keys: Sequence[str],
    params: TGMDParams,
    masks: Optional[MaskFn],
    sketches: Sketches,
    idx: Sequence[int],
    d: torch.Tensor,
    start: int,
) -> torch.Tensor:
    """DROP in place on task vectors ``d`` [len(idx), k] of models ``idx`` starting at flat
    element ``start``: one mask call for the uniform models, the sketch for each DELLA one."""
    k = d.shape[1]
    rates = [params.drop_rate[i] for i in idx]
    della_rows = {j: sketches[i] for j, i in enumerate(idx) if i in sketches}
    if masks is not None:
        keep = torch.stack(
            [masks(i, start, k).to(device=d.device, dtype=torch.bool).reshape(-1) for i in idx]
        ) if idx else torch.empty(0, k, dtype=torch.bool, device=d.device)
        for j, p in enumerate(rates):
            if p >= 1.0:
                keep[j] = False  # apply_drop: p = 1 drops everything whatever the mask
    elif any(p > 0.0 for p in rates) or della_rows:
        probs = [1.0 if j in della_rows else 1.0 - p for j, p in enumerate(rates)]
        keep = keep_masks(params.seed, ctx.name, [model_keys[i] for i in idx], start, k, probs, device=d.device)
        for j, sketch in della_rows.items():
            # Ranked by the undropped magnitudes, as the sketch was built.
            keep[j] = della_keep(sketch, d[j].abs(), start)
    else:
        return d
    # where(keep, d, 0) in place: a dropped entry becomes exactly +0.
    d.masked_fill_(keep.logical_not_(), 0.0)
    factors = rescale_factors(params, idx)
    if any(f != 1.0 for f in factors):
        # Per-row scalar broadcast: the same IEEE product as multiplying each row by its scalar.
        d.mul_(torch.tensor(factors, dtype=d.dtype, device=d.device)[:, None])
    return d


def _dropped_deltas(
    ctx: _Context,
    models: Sequence[RowReader],
    model_keys: Sequence[str],
    params: TGMDParams,
    masks: Optional[MaskFn],
    idx: Sequence[int],
    b: torch.Tensor,
    r0: int,
    r1: int,
    sketches: Optional[Sketches] = None,
) -> Tuple[torch.Tensor, List[bool]]:
    """Dropped task vectors [len(idx), k] of models ``idx`` on rows r0:r1 (untrimmed; rows of
    absent models are zero) and which models are present. All models at once: one read
    buffer, one finiteness check, one DROP mask call."""
    d, present = _raw_deltas(ctx, models, model_keys, idx, b, r0, r1)
    return _apply_drop(ctx, model_keys, params, masks, sketches or {}, idx, d, r0 * ctx.cols), present


def rescale_factors(params: TGMDParams, idx: Sequence[int]) -> List[float]:
    """DROP's rescale factor (1 - p)^(-rescale) per model of ``idx`` (1 where nothing is dropped).

    DELLA rescales by the same factor (sd-mecha's ``ties_sum_with_dropout`` divides by 1 - p),
    not by each entry's own 1 / p_keep."""
    if params.rescale == 0.0:
        return [1.0] * len(idx)
    rates = [params.drop_rate[i] for i in idx]
    return [(1.0 - p) ** (-params.rescale) if 0.0 < p < 1.0 else 1.0 for p in rates]


def _sketch(ctx: _Context, params: TGMDParams, model_keys: Sequence[str], i: int, magnitude: torch.Tensor) -> DellaSketch:
    return della_sketch(
        magnitude, params.drop_rate[i], params.epsilon[i], seed=params.seed, tensor_name=ctx.name, model_key=model_keys[i]
    )


def della_sketches(
    ctx: _Context,
    base: RowReader,
    models: Sequence[RowReader],
    model_keys: Sequence[str],
    params: TGMDParams,
    idx: Sequence[int],
) -> Dict[int, DellaSketch]:
    """DELLA sketches of models ``idx``, each from its whole task vector's magnitudes, one model
    at a time (a bad model is reported in model order). Absent models get none."""
    sketches: Dict[int, DellaSketch] = {}
    if not ctx.numel:
        return sketches
    for i in idx:
        whole: Optional[torch.Tensor] = None
        for r0, r1 in ctx.chunks():
            b = ctx.base(base, r0, r1)
            d, present = _raw_deltas(ctx, models, model_keys, [i], b, r0, r1)
            if not present[0]:
                whole = None
                break
            if whole is None:
                whole = torch.empty(ctx.numel, dtype=ctx.dtype, device=d.device)
            torch.abs(d[0], out=whole[r0 * ctx.cols : r1 * ctx.cols])
        if whole is not None:
            sketches[i] = _sketch(ctx, params, model_keys, i, whole)
        del whole
    return sketches


def trim_thresholds(
    ctx: _Context,
    base: RowReader,
    models: Sequence[RowReader],
    model_keys: Sequence[str],
    params: TGMDParams,
    masks: Optional[MaskFn],
    trimmed: Sequence[int],
    sketches: Optional[Sketches] = None,
) -> Dict[int, Optional[torch.Tensor]]:
    """Trim thresholds of the ``trimmed`` models, each from its whole dropped task vector, one
    model at a time (a bad model is reported in model order). Absent models get none."""
    thresholds: Dict[int, Optional[torch.Tensor]] = {}
    for i in trimmed:
        whole = None
        for r0, r1 in ctx.chunks():
            b = ctx.base(base, r0, r1)
            d, present = _dropped_deltas(ctx, models, model_keys, params, masks, [i], b, r0, r1, sketches)
            if not present[0]:
                whole = None
                break
            if whole is None:
                whole = torch.empty(ctx.numel, dtype=ctx.dtype, device=d.device)
            whole[r0 * ctx.cols : r1 * ctx.cols] = d[0]
        if whole is not None:
            thresholds[i] = trim_threshold(whole, params.density[i])
        del whole
    return thresholds


def _tgmd_once(
    ctx: _Context,
    base: RowReader,
    models: Sequence[RowReader],
    model_keys: Sequence[str],
    params: TGMDParams,
    active: List[int],
    out_dtype: torch.dtype,
    masks: Optional[MaskFn],
) -> torch.Tensor:
    sketches: Dict[int, DellaSketch] = {}

    def deltas(idx: Sequence[int], b: torch.Tensor, r0: int, r1: int) -> Tuple[torch.Tensor, List[bool]]:
        return _dropped_deltas(ctx, models, model_keys, params, masks, idx, b, r0, r1, sketches)

    # Pre-passes, one model at a time over its whole task vector: DELLA sketches (the ranks of
    # the undropped magnitudes), then trim thresholds (of the dropped task vectors).
    thresholds: Dict[int, Optional[torch.Tensor]] = {}
    single = ctx.rows <= max(1, int(ctx.rows_per_chunk))
    cached: Optional[Tuple[torch.Tensor, torch.Tensor, List[bool]]] = None
    trimmed = [i for i in active if params.density[i] < 1.0]
    ranked = [i for i in active if params.della(i)] if masks is None else []
    if (trimmed or ranked) and single and ctx.numel:
        # One chunk: all task vectors at once, kept for the main pass. A bad ranked, then a bad
        # trimmed model is reported before any other, as the one-model-at-a-time pre-passes would.
        b = ctx.base(base, 0, ctx.rows)
        try:
            d_all, present = _raw_deltas(ctx, models, model_keys, active, b, 0, ctx.rows)
        except _BadInput:
            _raw_deltas(ctx, models, model_keys, ranked, b, 0, ctx.rows)
            _raw_deltas(ctx, models, model_keys, trimmed, b, 0, ctx.rows)
            raise
        for j, i in enumerate(active):
            if i in ranked and present[j]:
                sketches[i] = _sketch(ctx, params, model_keys, i, d_all[j].abs())
        _apply_drop(ctx, model_keys, params, masks, sketches, active, d_all, 0)
        for j, i in enumerate(active):
            if i in trimmed and present[j]:
                thresholds[i] = trim_threshold(d_all[j], params.density[i])
        cached = (b, d_all, present)
    else:
        if ranked:
            sketches = della_sketches(ctx, base, models, model_keys, params, ranked)
        if trimmed:
            thresholds = trim_thresholds(ctx, base, models, model_keys, params, masks, trimmed, sketches)

    def chunk_terms(r0: int, r1: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(base chunk, u [N, k] masked task vectors, a [N, k] agreement mask)."""
        nonlocal cached
        if cached is not None:
            b, d_all, present = cached
            cached = None
        else:
            b = ctx.base(base, r0, r1)
            d_all, present = deltas(active, b, r0, r1)
        if thresholds:
            # apply_trim per model as one broadcast: -inf keeps every entry of untrimmed models.
            thr = torch.stack(
                [
                    t.to(device=d_all.device, dtype=d_all.dtype)
                    if (t := thresholds.get(i)) is not None
                    else torch.tensor(float("-inf"), dtype=d_all.dtype, device=d_all.device)
                    for i in active
                ]
            )[:, None]
            d_all.masked_fill_(d_all.abs() < thr, 0.0)
        if params.sign_election == "none":
            agree = torch.tensor(present, dtype=torch.bool, device=d_all.device)[:, None].expand_as(d_all)
            return b, d_all, agree
        s = torch.sign(d_all)
        if params.sign_election == "count":
            # Head count of the signs: small integers, exact in any float dtype and summation order.
            sign = torch.sign(s.sum(dim=0))
        else:
            sign = elect_sign(d_all, params.sign_election)  # type: ignore[arg-type]
        # sign(d) == g and d != 0  <=>  sign(d) * g > 0 (no NaN here).
        agree = s.mul_(sign) > 0
        del s
        return b, d_all.masked_fill_(~agree, 0.0), agree

    out = None
    if not active:  # every model left out: the base survives
        for r0, r1 in ctx.chunks():
            b = ctx.base(base, r0, r1)
            if out is None:
                out = ctx.writer(out_dtype)
            out.put(r0 * ctx.cols, b)
    elif params.aggregate == "mean":
        for r0, r1 in ctx.chunks():
            b, u, agree = chunk_terms(r0, r1)
            if out is None:
                out = ctx.writer(out_dtype)
            out.put(r0 * ctx.cols, _add_back(b, disjoint_mean(u, agree), params.lambda_))
    else:
        gram = GramAccumulator(len(active))
        kept = None
        for r0, r1 in ctx.chunks():
            terms = chunk_terms(r0, r1)
            gram.update(terms[1])
            if single:
                kept = terms  # one chunk: reuse it for the output pass instead of recomputing
        weights = torch.tensor([params.weight[i] for i in active], dtype=torch.float64)
        coeffs, _ = weiszfeld_gram(gram.result(), weights, params.eps, params.maxiter, params.ftol)
        ctx.median_found(active, coeffs)
        for r0, r1 in ctx.chunks():
            if kept is not None:
                b, u, _ = kept
                kept = None
            else:
                b, u, _ = chunk_terms(r0, r1)
            if out is None:
                out = ctx.writer(out_dtype)
            out.put(r0 * ctx.cols, _add_back(b, _ordered_combination(coeffs, u), params.lambda_))
    if out is None:  # zero elements
        return torch.empty(ctx.shape, dtype=out_dtype, device=ctx.device)
    return out.result()


def merge_geometric_median(
    tensor_name: str,
    shape: Sequence[int],
    models: Sequence[RowReader],
    weights: Optional[Sequence[float]],
    eps: float,
    maxiter: int,
    ftol: float,
    compute_dtype: torch.dtype,
    rows_per_chunk: int,
    out_dtype: Optional[torch.dtype] = None,
    on_bad_input: Callable[[int, str], None] = warn_bad_input,
    *,
    device=None,
    reuse_bytes: int = 0,
    on_median: Optional[MedianObserver] = None,
) -> torch.Tensor:
    """Plain geometric median of the models themselves (no base, no masks), via the Gram form.

    Models that lack the tensor (reader None) or have non-finite values (``on_bad_input``
    called) are left out; if none remain, ValueError. ``on_median`` as for :func:`merge_task_vectors`.
    """
    n = len(models)
    w_all = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(w_all) != n:
        raise ValueError(f"{tensor_name}: {n} models but {len(w_all)} weights")
    ctx = _Context(tensor_name, shape, compute_dtype, rows_per_chunk, device, reuse_bytes, on_median)
    out_dtype = out_dtype or compute_dtype
    excluded: List[int] = []
    while True:
        active = [i for i in range(n) if i not in excluded]
        if not active:
            raise InputValuesError(f"{tensor_name}: no model has usable values for the geometric median")
        try:
            return _geomedian_once(ctx, models, w_all, active, eps, maxiter, ftol, out_dtype)
        except _Absent as absent:
            excluded.append(absent.index)
        except _BadInput as bad:
            excluded.append(bad.index)
            on_bad_input(bad.index, bad.message)


def _geomedian_once(
    ctx: _Context,
    models: Sequence[RowReader],
    weights: Sequence[float],
    active: List[int],
    eps: float,
    maxiter: int,
    ftol: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    def points(r0: int, r1: int) -> torch.Tensor:
        x, present = ctx.stack(models, active, r0, r1, lambda i: f"model {i}")
        for j, ok in enumerate(present):
            if not ok:
                x[j].zero_()
        bad = _first_bad_row(x)
        # The first model (in order) that is absent or non-finite is the one reported.
        for j, i in enumerate(active):
            if not present[j]:
                raise _Absent(i)
            if bad == j:
                raise _BadInput(i, f"{ctx.name}: model {i} has non-finite values (rows {r0}:{r1})")
        return x

    single = ctx.rows <= max(1, int(ctx.rows_per_chunk))
    kept = None
    gram = GramAccumulator(len(active))
    for r0, r1 in ctx.chunks():
        x = points(r0, r1)
        if single:
            kept = x
        # The median is translation-equivariant and its coefficients translation-invariant:
        # centring each element on the models' mean keeps the Gram form's
        # G_ii - 2(Gc)_i + c^T G c from cancelling catastrophically for near-identical models.
        gram.update(x - ordered_sum(x) / x.shape[0])
    if ctx.numel == 0:
        return torch.empty(ctx.shape, dtype=out_dtype, device=ctx.device)
    w = torch.tensor([weights[i] for i in active], dtype=torch.float64)
    coeffs, _ = weiszfeld_gram(gram.result(), w, eps, maxiter, ftol)
    ctx.median_found(active, coeffs)
    out = ctx.writer(out_dtype)
    for r0, r1 in ctx.chunks():
        x = kept if kept is not None else points(r0, r1)
        out.put(r0 * ctx.cols, _ordered_combination(coeffs, x))
    return out.result()


def tgmd_merge(
    base: torch.Tensor,
    models: Sequence[Optional[torch.Tensor]],
    params: TGMDParams,
    compute_dtype: torch.dtype = torch.float64,
    *,
    tensor_name: str = "tensor",
    model_keys: Optional[Sequence[str]] = None,
    rows_per_chunk: Optional[int] = None,
    out_dtype: Optional[torch.dtype] = None,
    on_bad_input: Callable[[int, str], None] = warn_bad_input,
    masks: Optional[MaskFn] = None,
    kernel: Optional[str] = None,
) -> torch.Tensor:
    """Whole-tensor convenience over :func:`merge_task_vectors` (None in ``models``: absent)."""
    keys = list(model_keys) if model_keys is not None else [f"model{i}" for i in range(len(models))]
    rows, _ = rows_cols(base.shape)
    return merge_task_vectors(
        tensor_name,
        base.shape,
        tensor_reader(base),
        [tensor_reader(m) for m in models],
        keys,
        params,
        compute_dtype,
        rows_per_chunk or max(rows, 1),
        out_dtype,
        on_bad_input,
        masks=masks,
        device=base.device,
        kernel=kernel,
    )
