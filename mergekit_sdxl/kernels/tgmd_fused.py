"""The fused CPU path of :func:`mergekit_sdxl.kernels.tgmd.merge_task_vectors`.

Same chunks, same parameters, same bytes as the torch reference (``_tgmd_once``); the
elementwise chain runs in the numba kernels of ``fused_numba`` (one pass per element instead of
~25 tensor passes), the task vectors go straight into the Gram layout, and every buffer is a
reused workspace (huge pages where the platform offers them). Trim thresholds (a pre-pass over
whole task vectors, only when ``density < 1``) and the Weiszfeld iteration are the reference's
own code.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import threading
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .geomedian import GRAM_SUBBLOCK, BlockedGram, weiszfeld_gram
from .rng import U_BITS, mask_key

if TYPE_CHECKING:
    from .tgmd import RowReader, TGMDParams, _Context

__all__ = ["KERNELS", "NotOnCPU", "fused_available", "resolve_kernel", "tgmd_fused_once"]

LOG = logging.getLogger(__name__)

KERNELS = ("auto", "fused", "torch")
"""``auto``: fused on CPU when numba imports, else torch; ``fused``: require it; ``torch``: reference."""

KERNEL_ENV = "MERGEKIT_SDXL_KERNEL"

_NUMBA: Dict[str, Any] = {}
_LOCK = threading.Lock()  # numba's workqueue threading layer allows one parallel launch at a time


def _kernels() -> Any:
    """The numba kernel module (imported on first use), or None when numba is unavailable."""
    if "module" not in _NUMBA:
        try:
            from . import fused_numba
        except ImportError as error:  # numba missing or broken: the torch reference still works
            LOG.info("numba unavailable (%s): using the torch kernels", error)
            _NUMBA["module"] = None
        else:
            _NUMBA["module"] = fused_numba
    return _NUMBA["module"]


def fused_available() -> bool:
    """Whether the fused numba kernels can run here."""
    return _kernels() is not None


def resolve_kernel(kernel: Optional[str], device: Optional[torch.device], reference_only: bool) -> str:
    """``fused`` or ``torch`` for one tensor. ``kernel`` None reads ``MERGEKIT_SDXL_KERNEL`` (default auto);
    ``reference_only``: the merge uses what only the torch reference implements (explicit or DELLA masks)."""
    choice = (kernel or os.environ.get(KERNEL_ENV) or "auto").strip().lower()
    if choice not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {choice!r} (from {KERNEL_ENV} or the kernel argument)")
    on_cpu = device is None or device.type == "cpu"
    if choice == "torch" or reference_only or not on_cpu:
        return "torch"
    if choice == "fused" and not fused_available():
        raise ValueError("kernel 'fused' needs numba, which cannot be imported here (pip install numba)")
    return "fused" if fused_available() else "torch"


class NotOnCPU(Exception):
    """The readers returned tensors on another device: run the torch reference instead."""


class _Workspace:
    """Flat per-thread scratch buffers, grown on demand and reused by every chunk and key."""

    def __init__(self) -> None:
        self._maps: Dict[str, mmap.mmap] = {}

    def get(self, name: str, count: int, dtype: torch.dtype) -> torch.Tensor:
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = max(1, count) * itemsize
        mapping = self._maps.get(name)
        if mapping is None or len(mapping) < nbytes:
            # The old mapping is unmapped when the last view of it goes (closing it here would
            # fail while a caller still holds one).
            mapping = mmap.mmap(-1, nbytes)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    mapping.madvise(mmap.MADV_HUGEPAGE)
                except OSError:  # transparent huge pages disabled: normal pages
                    pass
            self._maps[name] = mapping
        return torch.frombuffer(mapping, dtype=dtype, count=count) if count else torch.empty(0, dtype=dtype)


_LOCAL = threading.local()


def _workspace() -> _Workspace:
    ws = getattr(_LOCAL, "ws", None)
    if ws is None:
        ws = _LOCAL.ws = _Workspace()
    return ws


def _np_dtype(dtype: torch.dtype) -> Any:
    return np.float64 if dtype == torch.float64 else np.float32


class _Plan:
    """Per-tensor constants of the fused kernels, computed once (hash keys, limits, factors)."""

    def __init__(
        self,
        ctx: _Context,
        model_keys: Sequence[str],
        params: TGMDParams,
        active: Sequence[int],
        thresholds: Dict[int, Optional[torch.Tensor]],
    ) -> None:
        from .tgmd import rescale_factors

        fn = _kernels()
        m = len(active)
        dt = _np_dtype(ctx.dtype)
        self.keys = np.zeros(m, dtype=np.uint64)
        self.limits = np.zeros(m, dtype=np.uint64)
        self.hashed = np.zeros(m, dtype=np.uint8)
        for j, i in enumerate(active):
            p = params.drop_rate[i]
            if p <= 0.0:
                continue
            self.hashed[j] = 1
            keep = 1.0 - p
            # keep iff z < ceil(keep * 2^53) * 2^11 as uint64: kernels/rng.py keep_masks exactly.
            self.limits[j] = 0 if keep <= 0.0 else math.ceil(keep * (1 << U_BITS)) << (64 - U_BITS)
            self.keys[j] = mask_key(params.seed, ctx.name, model_keys[i])
        factors = rescale_factors(params, active)
        self.factors = np.array(factors, dtype=dt)
        self.scaled = np.array([f != 1.0 for f in factors], dtype=np.uint8)
        thr = []
        for i in active:
            t = thresholds.get(i)
            thr.append(float("-inf") if t is None else float(t))
        self.thresholds = np.array(thr, dtype=dt)
        self.elect = {"none": fn.ELECT_NONE, "count": fn.ELECT_COUNT, "sum": fn.ELECT_SUM}[params.sign_election]
        self.lam = np.array([params.lambda_], dtype=dt)
        self.scale = 0 if params.lambda_ == 1.0 else 1


def _threads() -> None:
    import numba

    limit = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), limit)))


class _Chunk:
    """One row chunk's task vectors in the canonical Gram layout (views into the workspace)."""

    def __init__(self, base: torch.Tensor, u: torch.Tensor, present: np.ndarray, start: int, shift: int) -> None:
        self.base = base
        self.u = u  # [nsub, M, 256] float64
        self.present = present
        self.start = start
        self.shift = shift

    @property
    def k(self) -> int:
        return int(self.base.shape[0])


def _task_vectors(
    ctx: _Context,
    base: RowReader,
    models: Sequence[RowReader],
    model_keys: Sequence[str],
    active: Sequence[int],
    plan: _Plan,
    r0: int,
    r1: int,
    carry: Optional[torch.Tensor],
) -> _Chunk:
    """Pass 1 on rows r0:r1: read, upcast, and the fused elementwise chain into the workspace."""
    from .tgmd import _BadInput

    fn = _kernels()
    ws = _workspace()
    m = len(active)
    b = ctx.base(base, r0, r1)
    if b.device.type != "cpu":
        raise NotOnCPU(str(b.device))
    k = b.shape[0]
    start = r0 * ctx.cols
    shift = start % GRAM_SUBBLOCK
    nsub = (shift + k + GRAM_SUBBLOCK - 1) // GRAM_SUBBLOCK
    raw = ws.get("raw", m * k, ctx.dtype).view(m, k) if k else torch.empty(m, 0, dtype=ctx.dtype)
    present = np.ones(m, dtype=np.uint8)
    for j, i in enumerate(active):
        x = ctx.read_raw(models[i], r0, r1, f"model {model_keys[i]}")
        if x is None:
            present[j] = 0
        else:
            raw[j].copy_(x)  # upcast, exact
    u = ws.get("u", nsub * m * GRAM_SUBBLOCK, torch.float64).view(nsub, m, GRAM_SUBBLOCK)
    if carry is not None and shift:
        u[0].copy_(carry)
    bad = np.zeros(m, dtype=np.uint8)
    if k:
        with _LOCK:
            _threads()
            fn.task_vectors(
                raw.numpy(),
                b.numpy(),
                present,
                plan.keys,
                plan.limits,
                plan.hashed,
                plan.factors,
                plan.scaled,
                plan.thresholds,
                plan.elect,
                start,
                shift,
                u.numpy(),
                bad,
            )
    if bad.any():
        i = active[int(np.flatnonzero(bad)[0])]
        raise _BadInput(i, f"{ctx.name}: model {model_keys[i]} has non-finite values (rows {r0}:{r1})")
    return _Chunk(b, u, present, start, shift)


def _combine(chunk: _Chunk, coeffs: np.ndarray, plan: _Plan, dtype: torch.dtype) -> torch.Tensor:
    fn = _kernels()
    out = _workspace().get("out", chunk.k, dtype)
    if chunk.k:
        with _LOCK:
            _threads()
            fn.ordered_combination(chunk.u.numpy(), coeffs, chunk.base.numpy(), plan.lam, plan.scale, chunk.shift, out.numpy())
    return out


def _mean(chunk: _Chunk, plan: _Plan, dtype: torch.dtype) -> torch.Tensor:
    fn = _kernels()
    out = _workspace().get("out", chunk.k, dtype)
    if chunk.k:
        with _LOCK:
            _threads()
            fn.disjoint_mean(
                chunk.u.numpy(), chunk.present, plan.elect, chunk.base.numpy(), plan.lam, plan.scale, chunk.shift, out.numpy()
            )
    return out


def _feed_gram(gram: BlockedGram, chunk: _Chunk, last: bool) -> Optional[torch.Tensor]:
    """Give the chunk's complete sub-blocks to the Gram; return the partial last one (the
    next chunk's carry), or feed it zero-padded when this is the tensor's last chunk."""
    filled = chunk.shift + chunk.k
    complete = filled // GRAM_SUBBLOCK
    first = (chunk.start - chunk.shift) // GRAM_SUBBLOCK
    if complete:
        gram.add(chunk.u[:complete], first)
    rest = filled % GRAM_SUBBLOCK
    if not rest:
        return None
    tail = chunk.u[complete]
    if last:
        tail[:, rest:] = 0.0  # exact zeros change no sum (the reference pads the same way)
        gram.add_tail(tail)
        return None
    return tail.clone()


def tgmd_fused_once(
    ctx: _Context,
    base: RowReader,
    models: Sequence[RowReader],
    model_keys: Sequence[str],
    params: TGMDParams,
    active: List[int],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``_tgmd_once`` (masks None, CPU, at least one active model) on the fused kernels."""
    from .tgmd import trim_thresholds

    trimmed = [i for i in active if params.density[i] < 1.0]
    thresholds = trim_thresholds(ctx, base, models, model_keys, params, None, trimmed) if trimmed else {}
    plan = _Plan(ctx, model_keys, params, active, thresholds)
    chunks = list(ctx.chunks())
    out = ctx.writer(out_dtype)
    if params.aggregate == "mean":
        for r0, r1 in chunks:
            chunk = _task_vectors(ctx, base, models, model_keys, active, plan, r0, r1, None)
            out.put(chunk.start, _mean(chunk, plan, ctx.dtype))
        return out.result()
    gram = BlockedGram(len(active))
    carry: Optional[torch.Tensor] = None
    kept: Optional[_Chunk] = None
    for n, (r0, r1) in enumerate(chunks):
        chunk = _task_vectors(ctx, base, models, model_keys, active, plan, r0, r1, carry)
        carry = _feed_gram(gram, chunk, last=n == len(chunks) - 1)
        if len(chunks) == 1:
            kept = chunk  # one chunk: its task vectors serve the output pass too
    weights = torch.tensor([params.weight[i] for i in active], dtype=torch.float64)
    coeffs_t, _ = weiszfeld_gram(gram.result(), weights, params.eps, params.maxiter, params.ftol)
    ctx.median_found(active, coeffs_t)
    coeffs = coeffs_t.to(ctx.dtype).numpy()
    for r0, r1 in chunks:
        chunk = kept if kept is not None else _task_vectors(ctx, base, models, model_keys, active, plan, r0, r1, None)
        out.put(chunk.start, _combine(chunk, coeffs, plan, ctx.dtype))
    return out.result()

