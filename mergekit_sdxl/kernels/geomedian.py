"""Geometric median (Weiszfeld), directly on points and on their Gram matrix.

Every Weiszfeld iterate is a convex combination ``y = sum_k c_k u_k`` of the points, so
the distances ``||u_i - y||`` only need the N x N Gram matrix ``G``:
``||u_i - y||^2 = G_ii - 2 (G c)_i + c^T G c``. That lets an out-of-core merge run all the
iterations on a tiny matrix after one streaming pass over the data.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

__all__ = [
    "GeoMedianResult",
    "weiszfeld",
    "weiszfeld_gram",
    "GramAccumulator",
    "BlockedGram",
    "GRAM_BLOCK",
    "GRAM_SUBBLOCK",
    "PAIRWISE_GRAM_MIN_POINTS",
    "gram_state_bytes",
]

# Canonical re-blocking of the element stream. These two numbers define the rounding
# of every Gram matrix this package produces: changing them changes merged files.
GRAM_BLOCK = 65536
GRAM_SUBBLOCK = 256

# How a block's GRAM_BLOCK / GRAM_SUBBLOCK = 256 sub-block products are summed. Up to 128 points:
# by halves (``_tree_sum``), which needs all 256 N x N products at once (28 MB at N = 117, 2 GB at
# N = 1000). From 129 points on: by adjacent pairs, depth-first (``_PairSum``), which holds at most
# 9 of them (72 MB at N = 1000). The rule is part of the bytes (method version 2, docs/methods.md).
PAIRWISE_GRAM_MIN_POINTS = 129


class GeoMedianResult(NamedTuple):
    """Result of :func:`weiszfeld`."""

    median: torch.Tensor  # [M], dtype of the points
    coeffs: torch.Tensor  # [N] float64, median = sum_k coeffs[k] * points[k] (up to rounding)
    iterations: int


def _prior(weights: Optional[torch.Tensor], n: int, dtype: torch.dtype, device) -> torch.Tensor:
    if weights is None:
        return torch.ones(n, dtype=dtype, device=device)
    w = torch.as_tensor(weights, dtype=dtype, device=device).reshape(-1)
    if w.numel() != n:
        raise ValueError(f"expected {n} weights, got {w.numel()}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool((w > 0).any()):
        raise ValueError("median weights must be finite, >= 0 and not all zero")
    return w


def weiszfeld(
    points: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    maxiter: int = 100,
    ftol: float = 1e-20,
) -> GeoMedianResult:
    """Geometric median of the rows of ``points`` [N, M], the direct iteration of the spec.

    ``y0 = mean``; each step ``w_i = b_i / max(||u_i - y||, eps)``, ``y = sum w_i u_i / sum w_i``;
    stops when ``|f_prev - f| <= ftol * f`` with ``f = mean_i ||u_i - y||`` or after ``maxiter``.
    Computes in the points' dtype (use float32 or float64).
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError("points must be [N, M] with N >= 1")
    n = points.shape[0]
    b = _prior(weights, n, points.dtype, points.device)
    y = points.mean(dim=0)
    coeffs = torch.full((n,), 1.0 / n, dtype=torch.float64)
    dist = torch.linalg.vector_norm(points - y, dim=1)
    f = dist.mean()
    it = 0
    for it in range(1, maxiter + 1):  # noqa: B007 (the iteration count is returned after the loop)
        w = b / torch.clamp(dist, min=eps)
        y = (w[:, None] * points).sum(dim=0) / w.sum()
        coeffs = (w / w.sum()).to(device="cpu", dtype=torch.float64)
        dist = torch.linalg.vector_norm(points - y, dim=1)
        f_new = dist.mean()
        done = bool(torch.abs(f - f_new) <= ftol * f_new)
        f = f_new
        if done:
            break
    return GeoMedianResult(y, coeffs, it)


def weiszfeld_gram(
    gram: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    maxiter: int = 100,
    ftol: float = 1e-20,
) -> Tuple[torch.Tensor, int]:
    """The :func:`weiszfeld` iteration run on the Gram matrix ``G`` [N, N] of the points.

    Returns ``(coeffs float64 [N], iterations)`` with median ``= sum_k coeffs[k] u_k``.
    Always runs on CPU in float64: the matrix is tiny, and a fixed device keeps the
    coefficients a pure function of ``G``.
    """
    g = gram.to(device="cpu", dtype=torch.float64)
    if g.dim() != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise ValueError("gram must be [N, N] with N >= 1")
    n = g.shape[0]
    b = _prior(weights, n, torch.float64, "cpu")
    diag = torch.diagonal(g).clone()
    # The same operations, in the same order and dtype, as the plain formulation
    #   gc = (g * c[None, :]).sum(dim=1); sq = diag - 2.0 * gc + (c * gc).sum(); sqrt(clamp(sq, 0))
    #   w = b / clamp(dist, eps); c = w / w.sum(); stop on |f - f_new| <= ftol * f_new
    # but into preallocated buffers, and the stop test on Python floats (the same IEEE double
    # operations as on 0-d float64 tensors): per-op overhead dominates on an N x N matrix.
    prod = torch.empty_like(g)
    gc = torch.empty(n, dtype=torch.float64)
    tmp = torch.empty(n, dtype=torch.float64)
    dist = torch.empty(n, dtype=torch.float64)
    w = torch.empty(n, dtype=torch.float64)

    def distances(c: torch.Tensor) -> torch.Tensor:
        # Row sums instead of BLAS gemv/dot: small native reductions are serial and fixed-order.
        torch.mul(g, c, out=prod)
        torch.sum(prod, dim=1, out=gc)
        torch.mul(c, gc, out=tmp)
        quad = tmp.sum()
        torch.mul(gc, 2.0, out=tmp)
        torch.sub(diag, tmp, out=dist)
        dist.add_(quad)
        # Cancellation can make a tiny squared distance negative; it is a zero distance.
        return dist.clamp_(min=0.0).sqrt_()

    c = torch.full((n,), 1.0 / n, dtype=torch.float64)
    f = float(distances(c).mean())
    it = 0
    for it in range(1, maxiter + 1):  # noqa: B007 (the iteration count is returned after the loop)
        torch.clamp(dist, min=eps, out=w)
        torch.div(b, w, out=w)
        c = w / w.sum()
        f_new = float(distances(c).mean())
        done = abs(f - f_new) <= ftol * f_new
        f = f_new
        if done:
            break
    return c, it


def _tree_sum(parts: torch.Tensor) -> torch.Tensor:
    """Pairwise sum over dim 0 with a tree fixed by ``parts.shape[0]`` alone."""
    while parts.shape[0] > 1:
        half = parts.shape[0] // 2
        paired = parts[:half] + parts[half : 2 * half]
        if parts.shape[0] % 2:
            paired = torch.cat([paired, parts[2 * half :]], dim=0)
        parts = paired
    return parts[0]


class _PairSum:
    """Sum of products fed in order, by adjacent pairs: a binary counter of partial sums.

    A product pairs with the partial on top when both cover the same number of products; what
    is left at the end is added from the smallest partial up. The tree depends on the count alone.
    """

    def __init__(self) -> None:
        self._stack: List[Tuple[int, torch.Tensor]] = []  # (products covered, their sum)

    def push(self, product: torch.Tensor) -> None:
        covered, value = 1, product
        while self._stack and self._stack[-1][0] == covered:
            _, top = self._stack.pop()
            value = top.add_(value)
            covered *= 2
        self._stack.append((covered, value))

    def peek_total(self) -> Optional[torch.Tensor]:
        """The same sum as :meth:`pop_total`, leaving the partials as they are."""
        total: Optional[torch.Tensor] = None
        for _, part in reversed(self._stack):
            total = part.clone() if total is None else part + total
        return total

    def pop_total(self) -> Optional[torch.Tensor]:
        """The sum of everything pushed (None if nothing was); the sum starts over."""
        total: Optional[torch.Tensor] = None
        while self._stack:
            _, part = self._stack.pop()
            total = part if total is None else part.add_(total)
        return total


def _subblock_product(sub: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` products of contiguous sub-blocks ``[B, N, S]``."""
    # One fixed memory layout: bmm picks its kernel (and so its rounding) from the strides. Short
    # fixed contractions (S = 256): BLAS has no reason to split them across threads, and the
    # products do not depend on how many are batched.
    return torch.bmm(sub, sub.transpose(1, 2))


def gram_state_bytes(n: int) -> int:
    """Bytes a block Gram of ``n`` points holds besides its data (the products awaiting their sum)."""
    live = GRAM_BLOCK // GRAM_SUBBLOCK if n < PAIRWISE_GRAM_MIN_POINTS else 10
    return (live + 1) * n * n * 8


def _block_gram(block: torch.Tensor) -> torch.Tensor:
    """Gram [N, N] float64 of one canonical block [N, L] (L a multiple of GRAM_SUBBLOCK)."""
    n, length = block.shape
    sub = block.reshape(n, length // GRAM_SUBBLOCK, GRAM_SUBBLOCK).transpose(0, 1).contiguous()  # [B, N, S]
    if n < PAIRWISE_GRAM_MIN_POINTS:
        return _tree_sum(_subblock_product(sub))
    pairs = _PairSum()
    for j in range(sub.shape[0]):
        pairs.push(_subblock_product(sub[j : j + 1])[0])
    total = pairs.pop_total()
    assert total is not None
    return total


class GramAccumulator:
    """Streams the Gram matrix of N points fed as consecutive element chunks.

    ``update(chunk [N, k])`` may be called with any chunk sizes; the stream is re-blocked into
    canonical blocks of GRAM_BLOCK elements, so ``result()`` is bit-identical whatever the
    chunking and thread count (on one device). Accumulates in float64.
    """

    def __init__(self, n: int, device=None) -> None:
        self.n = n
        self.device = torch.device(device) if device is not None else None
        self._total: Optional[torch.Tensor] = None
        self._carry: List[torch.Tensor] = []
        self._carry_len = 0
        self._count = 0

    @property
    def elements(self) -> int:
        """Number of elements per point seen so far."""
        return self._count

    def _add_block(self, block: torch.Tensor) -> None:
        g = _block_gram(block)
        if self._total is None:
            self._total = g
        else:
            self._total += g

    def update(self, chunk: torch.Tensor) -> None:
        """Feed the next ``k`` elements of every point: ``chunk`` is [N, k] (any dtype)."""
        if chunk.dim() != 2 or chunk.shape[0] != self.n:
            raise ValueError(f"chunk must be [{self.n}, k], got {tuple(chunk.shape)}")
        if self.device is None:
            self.device = chunk.device
        chunk = chunk.to(device=self.device, dtype=torch.float64)
        self._count += chunk.shape[1]
        if chunk.shape[1] == 0:
            return
        self._carry.append(chunk)
        self._carry_len += chunk.shape[1]
        if self._carry_len < GRAM_BLOCK:
            return
        data = torch.cat(self._carry, dim=1) if len(self._carry) > 1 else self._carry[0]
        nfull = self._carry_len // GRAM_BLOCK
        for j in range(nfull):
            self._add_block(data[:, j * GRAM_BLOCK : (j + 1) * GRAM_BLOCK])
        rest = data[:, nfull * GRAM_BLOCK :]
        self._carry = [rest.clone()] if rest.shape[1] else []
        self._carry_len = rest.shape[1]

    def result(self) -> torch.Tensor:
        """The Gram matrix [N, N] float64 of everything fed so far (the accumulator stays usable)."""
        device = self.device if self.device is not None else torch.device("cpu")
        total = (
            self._total.clone()
            if self._total is not None
            else torch.zeros(self.n, self.n, dtype=torch.float64, device=device)
        )
        if self._carry_len:
            data = torch.cat(self._carry, dim=1) if len(self._carry) > 1 else self._carry[0]
            # Zero-pad the tail to whole sub-blocks only: padding depends on the total length
            # alone, and exact zeros do not change any sum.
            pad = -self._carry_len % GRAM_SUBBLOCK
            if pad:
                data = torch.nn.functional.pad(data, (0, pad))
            total += _block_gram(data)
        # gemm rounds G_ij and G_ji differently; mirror the upper triangle so G is exactly symmetric.
        upper = torch.triu(total)
        return upper + torch.triu(total, diagonal=1).T


class BlockedGram:
    """The Gram matrix of :class:`GramAccumulator`, bit for bit, fed with canonical sub-blocks.

    The fused kernel writes the masked task vectors straight into the ``[sub-blocks, N, 256]``
    float64 layout that ``_block_gram`` builds by copying; this accumulator runs the same
    ``bmm`` on those sub-blocks (per-sub-block products do not depend on how many are batched),
    keeps each 65536-element block's partials in one reused buffer and sums them with the same
    tree, so no chunk allocates and the result equals ``GramAccumulator``'s exactly.
    """

    _PER_BLOCK = GRAM_BLOCK // GRAM_SUBBLOCK

    def __init__(self, n: int) -> None:
        self.n = n
        self._pairwise = n >= PAIRWISE_GRAM_MIN_POINTS
        # By halves the block's products wait in one reused buffer; by pairs, in a _PairSum.
        self._pending = torch.empty(0 if self._pairwise else self._PER_BLOCK, n, n, dtype=torch.float64)
        self._pairs = _PairSum()
        self._filled = 0  # partials of the current block in _pending
        self._next = 0  # global index of the next sub-block expected
        self._total: Optional[torch.Tensor] = None
        self._tail = False

    def add(self, subblocks: torch.Tensor, first: int) -> None:
        """Feed complete sub-blocks [B, N, 256] (float64, contiguous) starting at global
        sub-block index ``first`` (sub-blocks must arrive in order, each once)."""
        if self._tail:
            raise ValueError("no sub-blocks may follow the zero-padded tail")
        if first != self._next or subblocks.shape[1:] != (self.n, GRAM_SUBBLOCK):
            raise ValueError(f"expected sub-blocks [B, {self.n}, {GRAM_SUBBLOCK}] from {self._next}, got {first}")
        done = 0
        count = subblocks.shape[0]
        while done < count:
            take = min(count - done, self._PER_BLOCK - self._filled)
            part = subblocks[done : done + take]
            if self._pairwise:
                for j in range(take):
                    self._pairs.push(_subblock_product(part[j : j + 1])[0])
            else:
                torch.bmm(part, part.transpose(1, 2), out=self._pending[self._filled : self._filled + take])
            self._filled += take
            done += take
            if self._filled == self._PER_BLOCK:
                self._close_block()
        self._next += count

    def add_tail(self, subblock: torch.Tensor) -> None:
        """Feed the last, partial sub-block [N, 256], zero beyond the tensor's end."""
        self.add(subblock[None], self._next)
        self._tail = True

    def _block_sum(self, finish: bool) -> torch.Tensor:
        if self._pairwise:
            total = self._pairs.pop_total() if finish else self._pairs.peek_total()
            assert total is not None
            return total
        return _tree_sum(self._pending[: self._filled])

    def _close_block(self) -> None:
        g = self._block_sum(finish=True)
        if self._total is None:
            self._total = g.clone()
        else:
            self._total += g
        self._filled = 0

    def result(self) -> torch.Tensor:
        """The Gram matrix [N, N] float64, exactly as ``GramAccumulator.result`` gives it."""
        total = self._total.clone() if self._total is not None else torch.zeros(self.n, self.n, dtype=torch.float64)
        if self._filled:
            total += self._block_sum(finish=False)
        upper = torch.triu(total)
        return upper + torch.triu(total, diagonal=1).T
