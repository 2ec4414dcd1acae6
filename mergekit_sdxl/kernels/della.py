"""DELLA drop masks: keep probabilities by magnitude rank, drawn from the counter-based stream.

The rule is sd-mecha 1.1.8's ``find_della_dropout`` (``ties_sum_with_dropout``), for one model's
task vector ``delta`` of one tensor::

    rank   = scipy.stats.rankdata(|delta|, method="ordinal")       # 1..n over the whole flattened
                                                                   # tensor; ties ranked by index
    p_keep = clamp(1 - p + (rank / n - (n + 1) / (2 n)) * epsilon, 0, 1)

and element ``g`` is kept iff ``u(seed, tensor, model, g) < p_keep(rank(g))``, with ``u`` the very
draw that uniform DROP compares with ``1 - p`` (:func:`~mergekit_sdxl.kernels.rng.uniform_bits`),
so ``epsilon = 0`` gives uniform DROP's masks bit for bit.

A rank is a whole-tensor quantity, but a chunk of N models must not hold N whole tensors. So a
pre-pass, one model at a time, sorts that model's magnitudes once and keeps a :class:`DellaSketch`
of O(sqrt n) numbers: ``S - 1`` boundary elements that cut the ranks into ``S`` buckets of about
``n / S``, the range of ``p_keep`` over each bucket, and the exact decision for the few elements
whose draw falls inside their bucket's range (about ``|epsilon| n / S`` of them). Any chunk's mask
then follows exactly from its own magnitudes: a draw below its bucket's range keeps, one at or
above it drops, one inside is looked up. Every step is per element, so the mask does not depend on
the chunk size, the thread count or the number of buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from .rng import U_BITS, uniform_bits, uniform_bits_at

__all__ = ["DellaSketch", "keep_probability", "della_sketch", "della_keep", "della_keep_exact", "default_buckets"]

_SCALE = 2.0**-U_BITS  # bits -> u in [0, 1), exact in float64
_BLOCK = 1 << 20  # elements per step of the pre-pass classification


def keep_probability(rank: torch.Tensor, n: int, drop_rate: float, epsilon: float) -> torch.Tensor:
    """float64 ``p_keep`` of 1-based ordinal ranks among ``n`` (the formula above, sd-mecha's
    operation order; exact ranks up to 2^53). Non-decreasing in the rank for ``epsilon >= 0``,
    non-increasing for ``epsilon <= 0``, also in floating point (every step is monotone)."""
    r = rank.to(torch.float64)
    return ((r / n - (n + 1) / (n * 2)) * epsilon + (1.0 - drop_rate)).clamp_(0.0, 1.0)


def default_buckets(n: int) -> int:
    """Buckets of a sketch over ``n`` elements: about sqrt(n) / 4, which balances the bucket table
    against the expected exceptions (|epsilon| n / S) for epsilon near 0.1."""
    return max(1, min(n, math.isqrt(n) // 4))


@dataclass(frozen=True)
class DellaSketch:
    """What the masks of one (tensor, model) need from the whole tensor; see the module docstring."""

    n: int
    seed: int
    tensor_name: str
    model_key: str
    bound_mag: torch.Tensor  # [S-1] magnitudes of the boundary elements (ranks E_1 < ... < E_{S-1})
    bound_code: torch.Tensor  # [S-1] int64 tie-break codes of the boundaries (see _bucket_of)
    lo: torch.Tensor  # [S] float64 smallest p_keep in each bucket
    hi: torch.Tensor  # [S] float64 largest p_keep in each bucket
    exc_index: torch.Tensor  # [A] int64 sorted element indices whose draw lies in [lo, hi) of their bucket
    exc_keep: torch.Tensor  # [A] bool their exact decisions

    @property
    def buckets(self) -> int:
        return int(self.lo.numel())


def _draws(seed: int, tensor_name: str, model_key: str, start: int, count: int, device: torch.device) -> torch.Tensor:
    return uniform_bits(seed, tensor_name, model_key, start, count, device=device).to(torch.float64).mul_(_SCALE)


def della_sketch(
    magnitude: torch.Tensor,
    drop_rate: float,
    epsilon: float,
    *,
    seed: int,
    tensor_name: str,
    model_key: str,
    buckets: Optional[int] = None,
) -> DellaSketch:
    """The sketch of one model's whole task vector, given as its magnitudes ``|delta|`` (flattened,
    in the compute dtype; no NaN). ``buckets`` only changes speed and size, never a mask bit."""
    mag = magnitude.reshape(-1)
    n = mag.numel()
    if n == 0:
        raise ValueError("a DELLA sketch needs at least one element")
    device = mag.device
    s = max(1, min(int(buckets or default_buckets(n)), n))
    if s * n >= 1 << 62:
        raise ValueError(f"tensor of {n} elements is too large for {s} DELLA buckets")
    # Stable: equal magnitudes keep index order, which is rankdata's "ordinal" tie rule.
    order = torch.argsort(mag, stable=True)
    edges = torch.arange(s + 1, dtype=torch.int64, device=device).mul_(n).div_(s, rounding_mode="floor")
    inner = edges[1:-1]  # bucket k holds the ranks E_k < r <= E_{k+1}
    bound_index = order[inner - 1]
    bound_mag = mag[bound_index]
    # Boundaries sort by (magnitude, index); within a run of equal magnitudes the code
    # (first position of the run) * n + index orders them, and nothing else shares the run's codes.
    run_start = torch.searchsorted(bound_mag, bound_mag, side="left")
    bound_code = run_start * n + bound_index
    first = keep_probability(edges[:-1] + 1, n, drop_rate, epsilon)
    last = keep_probability(edges[1:], n, drop_rate, epsilon)
    lo, hi = torch.minimum(first, last), torch.maximum(first, last)
    exc_index: List[torch.Tensor] = []
    exc_keep: List[torch.Tensor] = []
    if bool((lo < hi).any()):
        for q0 in range(0, n, _BLOCK):
            q1 = min(n, q0 + _BLOCK)
            index = order[q0:q1]
            rank = torch.arange(q0 + 1, q1 + 1, dtype=torch.int64, device=device)
            bucket = torch.searchsorted(inner, rank, side="left")
            u = uniform_bits_at(seed, tensor_name, model_key, index).to(torch.float64).mul_(_SCALE)
            inside = (u >= lo[bucket]) & (u < hi[bucket])
            if bool(inside.any()):
                exc_index.append(index[inside])
                exc_keep.append(u[inside] < keep_probability(rank[inside], n, drop_rate, epsilon))
    if exc_index:
        index_all, perm = torch.sort(torch.cat(exc_index))
        keep_all = torch.cat(exc_keep)[perm]
    else:
        index_all = torch.empty(0, dtype=torch.int64, device=device)
        keep_all = torch.empty(0, dtype=torch.bool, device=device)
    return DellaSketch(n, seed, tensor_name, model_key, bound_mag, bound_code, lo, hi, index_all, keep_all)


def _bucket_of(sketch: DellaSketch, mag: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Bucket of each element = how many boundaries precede it in (magnitude, index) order, which
    is #{j : E_j < rank}: the element's bucket whatever the chunk it is seen in."""
    below = torch.searchsorted(sketch.bound_mag, mag, side="left")
    upto = torch.searchsorted(sketch.bound_mag, mag, side="right")
    tied = upto > below  # equal to some boundaries' magnitude: their indices decide
    if bool(tied.any()):
        below[tied] = torch.searchsorted(sketch.bound_code, below[tied] * sketch.n + index[tied], side="left")
    return below


def della_keep(sketch: DellaSketch, magnitude: torch.Tensor, start: int) -> torch.Tensor:
    """Bool keep mask of elements ``start .. start+k-1`` given their magnitudes ``|delta|``
    (the compute dtype of the sketch)."""
    mag = magnitude.reshape(-1).to(sketch.bound_mag.dtype)
    k = mag.numel()
    if start < 0 or start + k > sketch.n:
        raise ValueError(f"elements {start}:{start + k} outside a tensor of {sketch.n}")
    device = mag.device
    index = torch.arange(start, start + k, dtype=torch.int64, device=device)
    bucket = _bucket_of(sketch, mag, index)
    u = _draws(sketch.seed, sketch.tensor_name, sketch.model_key, start, k, device)
    keep = u < sketch.lo[bucket]
    inside = keep.logical_not() & (u < sketch.hi[bucket])
    if bool(inside.any()):
        wanted = index[inside]
        pos = torch.searchsorted(sketch.exc_index, wanted).clamp_(max=max(0, sketch.exc_index.numel() - 1))
        if sketch.exc_index.numel() == 0 or not bool((sketch.exc_index[pos] == wanted).all()):
            raise RuntimeError(f"{sketch.tensor_name}: DELLA sketch of {sketch.model_key} does not match these magnitudes")
        keep[inside] = sketch.exc_keep[pos]
    return keep


def della_keep_exact(
    magnitude: torch.Tensor, drop_rate: float, epsilon: float, *, seed: int, tensor_name: str, model_key: str
) -> torch.Tensor:
    """The whole tensor's mask straight from the definition (every rank materialised): the
    reference :func:`della_keep` must equal bit for bit."""
    mag = magnitude.reshape(-1)
    n = mag.numel()
    order = torch.argsort(mag, stable=True)
    rank = torch.empty(n, dtype=torch.int64, device=mag.device)
    rank[order] = torch.arange(1, n + 1, dtype=torch.int64, device=mag.device)
    u = _draws(seed, tensor_name, model_key, 0, n, mag.device)
    return u < keep_probability(rank, n, drop_rate, epsilon)
