"""A LoRA / LyCORIS module's weight change for a range of rows, from its factor tensors.

Pure torch, no I/O. A module's weight is viewed as ``[rows, cols]`` (``[out, in * kh * kw]`` for a
conv), and :func:`delta_rows` computes rows ``r0:r1`` of its change without building the others,
so a merge reads and computes one row chunk at a time. Semantics are kohya's and LyCORIS's (and
A1111's ``network_*.py``, which agree with them):

* ``lora`` (kohya LoRA and LoCon, PEFT ``lora_A``/``lora_B``): ``up @ down`` (a conv's kernel is in
  ``down``; kohya's 3x3 merge ``conv2d(down^T, up)^T`` is this product); with LyCORIS's Tucker
  ``mid``: ``einsum('i j ..., p i, j r -> p r ...', mid, up, down)``;
* ``loha``: ``(w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product); with Tucker ``t1``/``t2`` each
  factor is ``einsum('i j ..., j r, i p -> p r ...', t, w_b, w_a)``;
* ``lokr``: ``kron(w1, w2)`` with ``w1 = w1_a @ w1_b`` and ``w2 = w2_a @ w2_b`` where factorised
  (``w2`` with Tucker ``t2``: ``einsum('i j ..., i p, j r -> p r ...', t2, w2_a, w2_b)``);
* ``full``: ``diff``; ``norm``: ``w_norm`` (1-D weights).

Each is multiplied by the module's scale (:func:`module_scale`): ``alpha / rank``, where an
absent or zero alpha means ``alpha = rank`` (kohya, LyCORIS), and 1 for LoKr with both factors
full, ``full`` and ``norm`` modules.

DoRA (:func:`dora_rows`, :func:`dora_column_sumsq`): the merged weight is
``(W + s * dW) * dora_scale / (||W + s * dW|| + eps)``, the norm taken per output row when
``dora_scale`` has one value per row (LyCORIS ``wd_on_out``, PEFT's magnitude vector) and per
input channel otherwise (over every output row: a pre-pass over all rows), as LyCORIS's
``apply_weight_decompose`` does (eps = float32's machine epsilon).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

__all__ = ["module_scale", "delta_rows", "dora_rows", "dora_column_sumsq", "dora_columns", "DORA_EPS", "LoraMathError"]

DORA_EPS = float(torch.finfo(torch.float32).eps)


class LoraMathError(ValueError):
    """Factor tensors that do not make the module's weight change (shapes that do not fit)."""


def module_scale(kind: str, alpha: Optional[float], rank: Optional[int], *, rslora: bool = False) -> float:
    """``alpha / rank`` (kohya / LyCORIS; ``alpha / sqrt(rank)`` for PEFT's ``use_rslora``); 1 when
    the module has no rank (LoKr with both factors full, ``full``, ``norm``) and ``alpha = rank``
    when alpha is absent or zero."""
    if kind in ("full", "norm") or rank is None:
        return 1.0
    if alpha is None or alpha == 0.0:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if rslora else float(rank))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _rows_of_kron(w1: torch.Tensor, w2: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of ``kron(w1, w2)`` (2-D), computing only the w1 rows they come from."""
    c = w2.shape[0]
    lo, hi = r0 // c, (r1 - 1) // c + 1
    block = torch.kron(w1[lo:hi].contiguous(), w2.contiguous())  # kron needs contiguous inputs
    return block[r0 - lo * c : r1 - lo * c]


def _lokr_factor(f: Mapping[str, torch.Tensor], n: str) -> torch.Tensor:
    full = f.get(f"lokr_w{n}")
    if full is not None:
        return _flat(full)
    a, b = f[f"lokr_w{n}_a"], f[f"lokr_w{n}_b"]
    t2 = f.get("lokr_t2") if n == "2" else None
    if t2 is not None:
        w = torch.einsum("i j ..., i p, j r -> p r ...", t2, a, b)
        return _flat(w)
    return a @ _flat(b)


def delta_rows(kind: str, factors: Mapping[str, torch.Tensor], scale: float, r0: int, r1: int, cols: int) -> torch.Tensor:
    """Rows ``r0:r1`` of the module's weight change times ``scale``, as ``[r1 - r0, cols]``.

    ``factors``: component name -> tensor (``up``/``down``/``mid``, ``hada_*``, ``lokr_*``,
    ``diff``, ``w_norm``), in the dtype to compute in. Raises :class:`LoraMathError` when the
    result does not have ``cols`` columns (factors that do not fit the target).
    """
    if kind == "lora":
        up, down = factors["up"], factors["down"]
        mid = factors.get("mid")
        u = _flat(up)[r0:r1]
        if mid is None:
            d = u @ _flat(down)
        else:
            d = torch.einsum("i j ..., p i, j r -> p r ...", mid, u, _flat(down))
    elif kind == "loha":
        t1, t2 = factors.get("hada_t1"), factors.get("hada_t2")
        if t1 is not None and t2 is not None:
            w1 = torch.einsum("i j ..., j r, i p -> p r ...", t1, _flat(factors["hada_w1_b"]), factors["hada_w1_a"][:, r0:r1])
            w2 = torch.einsum("i j ..., j r, i p -> p r ...", t2, _flat(factors["hada_w2_b"]), factors["hada_w2_a"][:, r0:r1])
        else:
            w1 = _flat(factors["hada_w1_a"])[r0:r1] @ _flat(factors["hada_w1_b"])
            w2 = _flat(factors["hada_w2_a"])[r0:r1] @ _flat(factors["hada_w2_b"])
        d = w1 * w2
    elif kind == "lokr":
        d = _rows_of_kron(_lokr_factor(factors, "1"), _lokr_factor(factors, "2"), r0, r1)
    elif kind == "full":
        d = _flat(factors["diff"])[r0:r1]
    elif kind == "norm":
        d = factors["w_norm"].reshape(-1, 1)[r0:r1]
    else:
        raise LoraMathError(f"unknown LoRA module kind {kind!r}")
    d = d.reshape(r1 - r0, -1)
    if d.shape[1] != cols:
        raise LoraMathError(f"the weight change has {d.shape[1]} columns per row, the target {cols}")
    return d * scale if scale != 1.0 else d


def _dora_vector(dora_scale: torch.Tensor) -> torch.Tensor:
    return dora_scale.reshape(-1)


def dora_rows(merged_rows: torch.Tensor, dora_scale: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """DoRA with one magnitude per output row: ``merged_rows`` (``W + s * dW``, rows r0:r1) rescaled
    to the magnitudes ``dora_scale[r0:r1]``."""
    magnitude = _dora_vector(dora_scale)[r0:r1].to(merged_rows.dtype)
    norm = torch.linalg.vector_norm(merged_rows, dim=1) + DORA_EPS
    return merged_rows * (magnitude / norm)[:, None]


def dora_column_sumsq(merged_rows: torch.Tensor, channels: int) -> torch.Tensor:
    """Per input channel, the sum of squares of ``merged_rows`` (``[n, channels * kernel]``): add
    these over all rows, then :func:`dora_columns` rescales each chunk of rows."""
    n = merged_rows.shape[0]
    return merged_rows.reshape(n, channels, -1).square().sum(dim=(0, 2))


def dora_columns(merged_rows: torch.Tensor, dora_scale: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """DoRA with one magnitude per input channel (norms over every output row: ``sumsq`` from
    :func:`dora_column_sumsq` over the whole weight)."""
    channels = sumsq.shape[0]
    factor = _dora_vector(dora_scale).to(merged_rows.dtype) / (sumsq.sqrt() + DORA_EPS)
    n = merged_rows.shape[0]
    return (merged_rows.reshape(n, channels, -1) * factor[None, :, None]).reshape(n, -1)
