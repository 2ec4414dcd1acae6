"""TIES sign election and the disjoint (agreement) mask."""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["elect_sign", "disjoint_mask"]


def elect_sign(deltas: torch.Tensor, method: Literal["count", "sum"] = "count") -> torch.Tensor:
    """Elected sign g [k] of the N task vectors ``deltas`` [N, k], in {-1, 0, +1}.

    ``count`` (identity vote): sign of the head count sum_i sign(d_i), one vote per model.
    ``sum`` (TIES paper, signed movement): sign of sum_i d_i. A tie gives 0.
    Result has ``deltas``' dtype.
    """
    if deltas.dim() != 2:
        raise ValueError("deltas must be [N, k]")
    if method == "count":
        # Integer head count: exact whatever N and the data dtype.
        votes = (deltas > 0).sum(dim=0, dtype=torch.int64) - (deltas < 0).sum(dim=0, dtype=torch.int64)
        return torch.sign(votes).to(deltas.dtype)
    if method == "sum":
        # Fixed left-to-right order: a reduction kernel could split over N differently
        # for different chunk widths or thread counts and flip a near-zero sum's sign.
        acc = deltas[0].clone()
        for i in range(1, deltas.shape[0]):
            acc += deltas[i]
        return torch.sign(acc)
    raise ValueError(f"unknown sign election method {method!r} (expected 'count' or 'sum')")


def disjoint_mask(deltas: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Bool [N, k]: entries whose sign equals the elected one (zero entries never agree)."""
    return (torch.sign(deltas) == sign.to(deltas.dtype)) & (deltas != 0)
