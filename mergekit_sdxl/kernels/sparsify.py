"""DROP (random sparsification with optional rescale) and TIES trim (magnitude top-k)."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["apply_drop", "trim_threshold", "trim_count", "apply_trim"]


def apply_drop(delta: torch.Tensor, keep: torch.Tensor, drop_rate: float, rescale: float) -> torch.Tensor:
    """Zero the entries where ``keep`` is False; multiply survivors by ``(1-p)^(-rescale)``.

    ``rescale`` 0 is DROP (no rescale), 1 is DARE. ``drop_rate`` 1 returns zeros whatever the
    mask (no division by zero).
    """
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
    if drop_rate >= 1.0:
        return torch.zeros_like(delta)
    # where(), not multiply: a dropped entry must become exactly 0, never 0 * x = -0 or NaN.
    out = torch.where(keep, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    if rescale != 0.0 and drop_rate > 0.0:
        out = out * ((1.0 - drop_rate) ** (-rescale))
    return out


def trim_count(numel: int, density: float) -> int:
    """How many entries a trim to ``density`` keeps: floor(density * numel), guarded against
    float noise (0.29 * 100 = 28.999999999999996 keeps 29)."""
    return max(0, min(numel, int(density * numel + 1e-9)))


def trim_threshold(delta: torch.Tensor, density: float) -> Optional[torch.Tensor]:
    """Magnitude threshold keeping the top ``density`` fraction of ``delta`` (whole tensor).

    Returns None for density >= 1 (keep everything, exactly), and +inf when nothing is kept.
    Computed in ``delta``'s own dtype, so no entry is lost to a rounded threshold. Entries tied
    with the threshold are all kept by :func:`apply_trim`.
    """
    if density >= 1.0:
        return None
    mag = delta.reshape(-1).abs()
    k = trim_count(mag.numel(), density)
    if k == 0:
        return torch.tensor(float("inf"), dtype=delta.dtype, device=delta.device)
    # The k-th largest magnitude, i.e. the (n-k+1)-th smallest: an exact order statistic.
    return torch.kthvalue(mag, mag.numel() - k + 1).values


def apply_trim(delta: torch.Tensor, threshold: Optional[torch.Tensor]) -> torch.Tensor:
    """Keep entries with ``|delta| >= threshold``; None keeps everything unchanged."""
    if threshold is None:
        return delta
    threshold = threshold.to(device=delta.device, dtype=delta.dtype)
    return torch.where(delta.abs() >= threshold, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
