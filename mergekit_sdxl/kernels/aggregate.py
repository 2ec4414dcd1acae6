"""Disjoint mean aggregation (TIES / TIES-SOUP / TSD)."""

from __future__ import annotations

import torch

__all__ = ["disjoint_mean", "ordered_sum"]


def ordered_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in fixed left-to-right order: bitwise independent of the width of
    ``x`` and of the thread count (reduction kernels guarantee neither)."""
    if x.shape[0] == 0:
        return torch.zeros(x.shape[1:], dtype=x.dtype, device=x.device)
    acc = x[0].clone()
    for i in range(1, x.shape[0]):
        acc += x[i]
    return acc


def disjoint_mean(masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_i u_i / sum_i a_i over dim 0 of ``masked`` [N, k] (u_i) and ``mask`` [N, k] (a_i);
    0/0 gives 0 (no model agreed there, so the base survives)."""
    total = ordered_sum(masked)
    count = mask.sum(dim=0, dtype=torch.int64).to(masked.dtype)
    return torch.where(count > 0, total / torch.clamp(count, min=1), torch.zeros_like(total))
