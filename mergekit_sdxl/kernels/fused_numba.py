"""numba kernels of the fused TGMD path: one pass per element for the whole elementwise chain.

They repeat, operation for operation and in the same IEEE order, what the torch reference
(:func:`mergekit_sdxl.kernels.tgmd._tgmd_once`) does with ~25 tensor passes: subtract the base,
finite check, the splitmix64 DROP hash of ``kernels/rng.py`` (exact uint64 math), rescale, trim,
sign election, agreement; then the ordered combination (multiply, then add, model by model) or
the disjoint mean. numba compiles without fast-math, so LLVM neither contracts a multiply and an
add into an FMA nor reassociates a sum: the bytes equal the reference's.

Layout: the masked task vectors are written as float64 ``[sub-blocks, M, 256]``, the canonical
Gram layout of ``kernels/geomedian.py``, at an element offset ``shift`` (the first ``shift``
slots of sub-block 0 belong to the previous chunk). Sub-blocks are independent, so ``prange``
over them gives the same bytes for any thread count.

Imported lazily (numba costs ~1 s to import and compiles on first use; compiled code is cached).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

SUB = 256  # = geomedian.GRAM_SUBBLOCK (checked by the driver)

ELECT_NONE = 0
ELECT_COUNT = 1
ELECT_SUM = 2

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


def _row(fn):
    """A serial per-row helper."""
    try:
        return njit(cache=True, nogil=True, error_model="numpy", inline="never")(fn)
    except RuntimeError:  # no writable cache location: compile per process
        return njit(cache=False, nogil=True, error_model="numpy", inline="never")(fn)


def _jit(parallel: bool):
    def wrap(fn):
        try:
            return njit(parallel=parallel, cache=True, nogil=True, error_model="numpy")(fn)
        except RuntimeError:  # no writable cache location: compile per process
            return njit(parallel=parallel, cache=False, nogil=True, error_model="numpy")(fn)

    return wrap


# Per-row helpers on 1-D contiguous slices: called (not inlined) from the prange loops, where
# LLVM vectorises them; the same loops written inline in a parallel body stay scalar (~5x slower).


@_row
def _delta(rr, bb, x):
    """x = rr - bb; returns 1 when an entry is not finite."""
    zero = x.dtype.type(0.0)
    nonfinite = 0
    for t in range(x.shape[0]):
        v = rr[t] - bb[t]
        nonfinite |= (v - v) != zero  # inf - inf and NaN - NaN are NaN
        x[t] = v
    return nonfinite


@_row
def _zero_nonfinite(x):
    zero = x.dtype.type(0.0)
    for t in range(x.shape[0]):
        if (x[t] - x[t]) != zero:
            x[t] = zero


@_row
def _drop(x, first, key, limit):
    """Zero the entries whose splitmix64 counter hash is >= limit (kernels/rng.py keep_masks)."""
    zero = x.dtype.type(0.0)
    for t in range(x.shape[0]):
        z = np.uint64(first + t) * _GAMMA + key
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        z = z ^ (z >> _S31)
        if z >= limit:
            x[t] = zero


@_row
def _scale(x, f):
    for t in range(x.shape[0]):
        x[t] = x[t] * f


@_row
def _trim(x, thr):
    zero = x.dtype.type(0.0)
    for t in range(x.shape[0]):
        if abs(x[t]) < thr:
            x[t] = zero


@_row
def _count_votes(x, votes):
    zero = x.dtype.type(0.0)
    for t in range(x.shape[0]):
        votes[t] += np.int64(x[t] > zero) - np.int64(x[t] < zero)


@_row
def _add(acc, x):
    for t in range(x.shape[0]):
        acc[t] += x[t]


@_row
def _store(row, x):
    for t in range(x.shape[0]):
        row[t] = x[t]


@_row
def _fill_zero(row):
    for t in range(row.shape[0]):
        row[t] = 0.0


@_row
def _sign_of_votes(votes, g):
    for t in range(g.shape[0]):
        g[t] = np.float64(votes[t] > 0) - np.float64(votes[t] < 0)


@_row
def _sign_of_total(total, g):
    zero = total.dtype.type(0.0)
    for t in range(g.shape[0]):
        g[t] = np.float64(total[t] > zero) - np.float64(total[t] < zero)


@_row
def _agree(row, g):
    """Keep the entries whose sign is the elected one (x * g > 0: |g| = 1, no underflow)."""
    for t in range(row.shape[0]):
        if not (row[t] * g[t] > 0.0):
            row[t] = 0.0


@_row
def _accumulate(acc, row, c):
    """acc += dtype(row) * c, multiply then add (the reference's torch.mul + add_)."""
    for t in range(acc.shape[0]):
        acc[t] = acc[t] + acc.dtype.type(row[t]) * c


@_row
def _to_dtype(acc, row):
    for t in range(acc.shape[0]):
        acc[t] = acc.dtype.type(row[t])


@_row
def _add_as_dtype(acc, row):
    for t in range(acc.shape[0]):
        acc[t] = acc[t] + acc.dtype.type(row[t])


@_row
def _count_nonzero(count, row):
    for t in range(count.shape[0]):
        count[t] += np.int64(row[t] != 0.0)


@_row
def _add_back(out, bb, acc, lam, scale):
    for t in range(out.shape[0]):
        v = acc[t]
        if scale != 0:
            v = v * lam
        out[t] = bb[t] + v


@_row
def _mean_add_back(out, bb, total, count, lam, scale):
    zero = total.dtype.type(0.0)
    for t in range(out.shape[0]):
        v = zero
        if count[t] > 0:
            v = total[t] / total.dtype.type(count[t])
        if scale != 0:
            v = v * lam
        out[t] = bb[t] + v


@_jit(parallel=True)
def task_vectors(
    raw,  # [M, k] compute dtype: the models' rows, upcast
    base,  # [k] compute dtype
    present,  # [M] uint8: 0 = the model lacks the tensor (zero task vector, no vote)
    keys,  # [M] uint64: DROP stream key per model
    limits,  # [M] uint64: keep iff hash < limit; 0 = drop all
    hashed,  # [M] uint8: 1 = apply the DROP hash to this model
    factors,  # [M] compute dtype: rescale factor (applied where scaled[j])
    scaled,  # [M] uint8
    thresholds,  # [M] compute dtype: trim threshold (-inf keeps all)
    elect,  # ELECT_*
    start,  # global index of raw[:, 0]
    shift,  # slots of sub-block 0 before raw[:, 0]
    out,  # [nsub, M, 256] float64: masked task vectors (only slots of this chunk are written)
    bad,  # [M] uint8 out: 1 = a non-finite task vector entry
):
    m, k = raw.shape
    nsub = (shift + k + SUB - 1) // SUB
    zero = raw.dtype.type(0.0)
    for s in prange(nsub):
        lo = shift if s == 0 else 0
        a = s * SUB - shift + lo  # first element of this sub-block in raw
        n = min(SUB - lo, k - a)
        bb = base[a : a + n]
        x = np.empty(n, dtype=raw.dtype)
        votes = np.zeros(n, dtype=np.int64)
        total = np.zeros(n, dtype=raw.dtype)
        for j in range(m):
            row = out[s, j, lo : lo + n]
            if present[j] == 0:
                _fill_zero(row)
                continue
            if _delta(raw[j, a : a + n], bb, x):
                bad[j] = 1
                _zero_nonfinite(x)
            if hashed[j] != 0:
                _drop(x, start + a, keys[j], limits[j])
            if scaled[j] != 0:
                _scale(x, factors[j])
            if thresholds[j] > zero:
                _trim(x, thresholds[j])
            if elect == ELECT_COUNT:
                _count_votes(x, votes)
            elif elect == ELECT_SUM:
                _add(total, x)
            _store(row, x)
        if elect == ELECT_NONE:
            continue
        g = np.empty(n, dtype=np.float64)
        if elect == ELECT_COUNT:
            _sign_of_votes(votes, g)
        else:
            _sign_of_total(total, g)
        for j in range(m):
            _agree(out[s, j, lo : lo + n], g)


@_jit(parallel=True)
def ordered_combination(
    u,  # [nsub, M, 256] float64 masked task vectors
    coeffs,  # [M] compute dtype
    base,  # [k] compute dtype
    lam,  # [1] compute dtype: lambda
    scale,  # 1 = multiply the combination by lam
    shift,
    out,  # [k] compute dtype: base + sum_j coeffs[j] * u[j] (times lam)
):
    k = base.shape[0]
    m = coeffs.shape[0]
    nsub = (shift + k + SUB - 1) // SUB
    for s in prange(nsub):
        lo = shift if s == 0 else 0
        a = s * SUB - shift + lo
        n = min(SUB - lo, k - a)
        acc = np.zeros(n, dtype=base.dtype)  # +0, as the reference's torch.zeros
        for j in range(m):
            _accumulate(acc, u[s, j, lo : lo + n], coeffs[j])
        _add_back(out[a : a + n], base[a : a + n], acc, lam[0], scale)


@_jit(parallel=True)
def disjoint_mean(
    u,  # [nsub, M, 256] float64 masked task vectors
    present,  # [M] uint8
    elect,
    base,  # [k] compute dtype
    lam,  # [1] compute dtype: lambda
    scale,
    shift,
    out,  # [k] compute dtype: base + mean of the agreeing entries (times lam)
):
    k = base.shape[0]
    m = present.shape[0]
    n_present = 0
    for j in range(m):
        n_present += np.int64(present[j] != 0)
    nsub = (shift + k + SUB - 1) // SUB
    for s in prange(nsub):
        lo = shift if s == 0 else 0
        a = s * SUB - shift + lo
        n = min(SUB - lo, k - a)
        total = np.empty(n, dtype=base.dtype)
        _to_dtype(total, u[s, 0, lo : lo + n])  # ordered_sum starts from row 0 itself
        for j in range(1, m):
            _add_as_dtype(total, u[s, j, lo : lo + n])
        count = np.zeros(n, dtype=np.int64)
        if elect == ELECT_NONE:
            count[:] = n_present
        else:
            for j in range(m):
                _count_nonzero(count, u[s, j, lo : lo + n])
        _mean_add_back(out[a : a + n], base[a : a + n], total, count, lam[0], scale)
