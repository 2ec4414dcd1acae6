"""Key hygiene for SDXL single files: map stored key variants to manifest names, normalise their
tensors, and classify keys that are not model weights. Pure functions; no mergekit.

Typical use over a header::

    for stored in header.tensors:
        canon = canonical_name(stored)
        if canon is None:
            kind = classify_extra_key(stored)   # "flag:v_pred", "ema", "lora", ...
        else:
            t = canonicalize_tensor(canon, stored, read(stored))
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Dict, FrozenSet, Iterable, Mapping, Optional, Tuple

import torch

from .manifest import POSITION_IDS_KEY, POSITION_IDS_SHAPE, SDXL_KEYS, load_variant_keys

if TYPE_CHECKING:  # pragma: no cover
    from .header import TensorInfo

__all__ = [
    "FLAG_KEYS",
    "EXTRA_KINDS",
    "POSITION_IDS_KEY",
    "TEXT_PROJECTION_KEY",
    "TEXT_PROJECTION_ALT_KEY",
    "VAE_ATTENTION_WEIGHTS",
    "canonical_name",
    "canonical_keys",
    "canonical_shapes",
    "canonicalize_tensor",
    "canonical_shape",
    "position_ids",
    "classify_extra_key",
]

FLAG_KEYS: Tuple[str, ...] = ("v_pred", "ztsnr")
EXTRA_KINDS: Tuple[str, ...] = ("flag:v_pred", "flag:ztsnr", "ema", "lora", "schedule", "other")

# POSITION_IDS_KEY is defined in .manifest (re-exported here, where it always was importable).
TEXT_PROJECTION_KEY = "conditioner.embedders.1.model.text_projection"
TEXT_PROJECTION_ALT_KEY = "conditioner.embedders.1.model.text_projection.weight"

# The 8 VAE attention 1x1-conv weights that converted files sometimes store 2-D.
VAE_ATTENTION_WEIGHTS: FrozenSet[str] = frozenset(
    f"first_stage_model.{coder}.mid.attn_1.{p}.weight"
    for coder in ("encoder", "decoder")
    for p in ("q", "k", "v", "proj_out")
)

# Stored-name aliases -> manifest name.
_ALIASES = {TEXT_PROJECTION_ALT_KEY: TEXT_PROJECTION_KEY}


def canonical_name(stored_key: str) -> Optional[str]:
    """Manifest name for a stored key, or None when the key is not one of the 2515 model tensors.

    ``...model.text_projection.weight`` -> ``...model.text_projection``; manifest keys map to
    themselves; everything else (flags, EMA, LoRA, schedule buffers, stray buffers) -> None.
    """
    if stored_key in SDXL_KEYS:
        return stored_key
    return _ALIASES.get(stored_key)


def canonical_keys(stored_keys: Iterable[str]) -> Dict[str, str]:
    """Manifest name -> the stored key that provides it, for the model tensors among ``stored_keys``.

    The one rule for a file that carries both spellings (``text_projection`` and its ``.weight``
    variant): the manifest spelling wins. Order: first appearance of each manifest name.
    """
    out: Dict[str, str] = {}
    for stored in stored_keys:
        canon = canonical_name(stored)
        if canon is not None and (canon not in out or stored == canon):
            out[canon] = stored
    return out


def canonical_shapes(tensors: Mapping[str, TensorInfo]) -> Dict[str, Tuple[int, ...]]:
    """Manifest name -> shape after key hygiene (:func:`canonical_shape`) of a header's tensors:
    the shapes a merge sees. Stored keys outside the manifest are left out."""
    return {
        canon: canonical_shape(canon, stored, tuple(tensors[stored].shape))
        for canon, stored in canonical_keys(tensors).items()
    }


def position_ids() -> torch.Tensor:
    """The canonical CLIP-L ``position_ids``: int64 ``arange(77)[None]`` (shape [1, 77])."""
    return torch.arange(POSITION_IDS_SHAPE[1], dtype=torch.int64)[None]


def canonicalize_tensor(canonical_key: str, stored_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Bring a stored tensor into the manifest's layout for ``canonical_key``.

    * ``text_projection.weight`` (Linear [out, in]) -> transposed to the sgm [in, out] layout.
    * 2-D VAE attention weights [C, C] -> [C, C, 1, 1].
    * ``position_ids`` -> always the int64 ``arange(77)[None]`` (files that stored it as float or
      with drifted values are repaired; it is a buffer, never merged).
    Anything else is returned unchanged (same object).
    """
    if canonical_key == POSITION_IDS_KEY:
        return position_ids()
    if canonical_key == TEXT_PROJECTION_KEY and stored_key == TEXT_PROJECTION_ALT_KEY:
        if tensor.ndim != 2:
            raise ValueError(f"{stored_key}: expected a 2-D tensor, got shape {list(tensor.shape)}")
        return tensor.t().contiguous()
    if canonical_key in VAE_ATTENTION_WEIGHTS and tensor.ndim == 2:
        return tensor.reshape(tensor.shape[0], tensor.shape[1], 1, 1)
    return tensor


def canonical_shape(canonical_key: str, stored_key: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Shape :func:`canonicalize_tensor` would produce, from header information only."""
    shape = tuple(shape)
    if canonical_key == POSITION_IDS_KEY:
        return POSITION_IDS_SHAPE
    if canonical_key == TEXT_PROJECTION_KEY and stored_key == TEXT_PROJECTION_ALT_KEY and len(shape) == 2:
        return shape[::-1]
    if canonical_key in VAE_ATTENTION_WEIGHTS and len(shape) == 2:
        return shape + (1, 1)
    return shape


_SCHEDULE: Optional[FrozenSet[str]] = None
_LORA = re.compile(r"^lora_|\.lora_(down|up|A|B|mid)\.|\.lora\.|\.alpha$|\.hada_|\.lokr_")


def _schedule_names() -> FrozenSet[str]:
    global _SCHEDULE
    if _SCHEDULE is None:
        names = set()
        for pattern in load_variant_keys():
            if "alphas_cumprod" in pattern:
                names.update(pattern.split("|"))
            elif pattern in ("denoiser.sigmas", "edm_mean", "edm_std") or pattern.startswith("edm_vpred."):
                names.add(pattern)
        _SCHEDULE = frozenset(names)
    return _SCHEDULE


def classify_extra_key(key: str) -> str:
    """Kind of a key that is not a model tensor (``canonical_name(key) is None``).

    ``"flag:v_pred"`` / ``"flag:ztsnr"`` (presence-only markers), ``"ema"`` (``model_ema.*``),
    ``"lora"`` (embedded LoRA/LyCORIS keys), ``"schedule"`` (DDPM buffers, ``denoiser.sigmas``,
    ``edm_mean``/``edm_std``, ``edm_vpred.sigma_*``), else ``"other"`` (stray buffers such as the
    CLIP-G ``position_ids`` / ``attn_mask``, CLIP-L ``text_projection``, ``scaled_fp8`` markers).
    Raises ValueError for keys that are model tensors.
    """
    if canonical_name(key) is not None:
        raise ValueError(f"{key!r} is a model tensor, not an extra key")
    if key in FLAG_KEYS:
        return f"flag:{key}"
    if key.startswith("model_ema."):
        return "ema"
    if _LORA.search(key):
        return "lora"
    if key in _schedule_names():
        return "schedule"
    return "other"
