"""Family detection and key differences of a checkpoint, from its safetensors header alone.

Pure: takes a :class:`~mergekit_sdxl.sdxl.header.SafetensorsHeader` (names, shapes, dtypes,
metadata), reads no tensor data, imports no mergekit.

The family is decided on key *names* and structural facts, not on absolute widths, so a
width-scaled test model (``sdxl/tiny.py``) is recognised like a full-size one:

========================  ==============================================================
family                    rule (first match wins)
========================  ==============================================================
``sd3``                   a ``joint_blocks.`` key
``flux``                  a ``double_blocks.`` or ``single_blocks.`` key (or ``img_in.weight``)
``sdxl-refiner``          ``conditioner.embedders.0.model.`` (OpenCLIP bigG in slot 0)
``sd2``                   ``cond_stage_model.model.``
``sd1``                   ``cond_stage_model.transformer.``
``sdxl-*``                ``conditioner.embedders.1.model.`` or ``model.diffusion_model.label_emb.``
                          then ``input_blocks.0.0.weight`` in-channels: 4 base, 9 inpaint
                          (8 = instruct-pix2pix: reported ``unknown`` with a note)
fallback                  UNet-only files: ``attn2.to_k.weight`` last dim 768 -> sd1,
                          1024 -> sd2, 2048 -> sdxl-base, 1280 -> sdxl-refiner
========================  ==============================================================

Key differences (``missing`` / ``extra`` / ``wrong_shape``) are computed against the SDXL manifest
for the ``sdxl-base`` and ``sdxl-inpaint`` families only (for other families every SDXL key would be
"missing", which says nothing). Shapes are compared exactly when the file is full size; a
width-scaled file (``scaled=True``: ``label_emb.0.0.weight`` or the CLIP-G token embedding is
narrower than SDXL's) is checked for tensor rank only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .dtypes import DTYPES, is_float, torch_dtype_name
from .families import FAMILIES, KEY_CHECKED_FAMILIES, SDXL_BASE_FAMILY, SDXL_INPAINT_FAMILY, Family
from .header import SafetensorsHeader
from .keys import FLAG_KEYS, canonical_name, canonical_shapes, classify_extra_key
from .manifest import COMPONENT_PREFIXES, OPTIONAL_KEYS, SDXL_KEYS
from .merge_metadata import MODELSPEC_PREDICTION_TYPE, normalise_prediction_type, read_provenance

__all__ = [
    "Family",
    "FAMILIES",
    "SDXL_BASE_FAMILY",
    "Detection",
    "detect",
    "FLOAT_DTYPES",
    "torch_dtype_name",
    "merged_recipe_of",
]

# Family, FAMILIES and SDXL_BASE_FAMILY are re-exported from .families (the family facts).

_UNET = COMPONENT_PREFIXES["unet"]
_CLIP_G = COMPONENT_PREFIXES["clip_g"]
LABEL_EMB_KEY = _UNET + "label_emb.0.0.weight"
IN0_KEY = _UNET + "input_blocks.0.0.weight"
CLIP_G_TOKEN_KEY = _CLIP_G + "token_embedding.weight"

# Full-size reference shapes used to tell a full-size file from a width-scaled one.
_FULL_LABEL_EMB = (1280, 2816)
_FULL_CLIP_G_TOKEN = (49408, 1280)

# Presence-only marker tensors: never "extra".
_FLAG_NAMES = frozenset(FLAG_KEYS)
_VPRED_KEYS = ("v_pred", "edm_vpred.sigma_max")

# safetensors dtype -> torch dtype name, for float dtypes (derived from .dtypes; kept importable).
FLOAT_DTYPES: Dict[str, str] = {n: torch_dtype_name(n) for n in DTYPES if is_float(n)}


@dataclass
class Detection:
    """What a header says about a checkpoint. ``to_dict()`` gives a JSON-ready dict."""

    family: Family
    v_pred: bool = False
    ztsnr: bool = False
    dtype: str = "unknown"  # majority float dtype by element count, torch name ("float16")
    missing: List[str] = field(default_factory=list)  # non-optional manifest keys absent
    extra: List[str] = field(default_factory=list)  # keys outside the manifest (flags excluded)
    wrong_shape: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    merged_recipe: Optional[Dict[str, Any]] = None  # our provenance, or A1111's sd_merge_recipe
    scaled: bool = False  # width-scaled (test/benchmark) model: shapes checked for rank only
    missing_optional: List[str] = field(default_factory=list)  # OPTIONAL_KEYS absent (harmless)
    extra_kinds: Dict[str, int] = field(default_factory=dict)  # ema / lora / schedule / other -> count
    in_channels: Optional[int] = None  # input_blocks.0.0.weight dim 1
    n_tensors: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def is_sdxl(self) -> bool:
        return self.family.startswith("sdxl-")

    @property
    def prediction_type(self) -> str:
        """``"v"`` or ``"epsilon"`` (modelspec wording)."""
        return "v" if self.v_pred else "epsilon"

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["wrong_shape"] = [
            {"key": k, "expected": list(e), "got": list(g)} for k, e, g in self.wrong_shape
        ]
        d["prediction_type"] = self.prediction_type
        return d


def _has_prefix(names: List[str], *prefixes: str) -> bool:
    return any(n.startswith(prefixes) for n in names)


def _has_part(names: List[str], *parts: str) -> bool:
    return any(p in n for n in names for p in parts)


def _context_dim(header: SafetensorsHeader) -> Optional[int]:
    for name, info in header.tensors.items():
        if name.endswith("attn2.to_k.weight") and len(info.shape) == 2:
            return int(info.shape[1])
    return None


def _family(header: SafetensorsHeader, notes: List[str]) -> Tuple[str, Optional[int]]:
    names = list(header.tensors)
    in0 = header.tensors.get(IN0_KEY)
    in_ch = int(in0.shape[1]) if in0 is not None and len(in0.shape) == 4 else None

    # Non-UNet transformer families first: their key names are unmistakable.
    if _has_part(names, "joint_blocks."):
        return "sd3", in_ch
    if _has_part(names, "double_blocks.", "single_blocks.") or "img_in.weight" in header.tensors:
        return "flux", in_ch
    if _has_prefix(names, "conditioner.embedders.0.model."):
        return "sdxl-refiner", in_ch
    if _has_prefix(names, "cond_stage_model.model."):
        return "sd2", in_ch
    if _has_prefix(names, "cond_stage_model.transformer."):
        return "sd1", in_ch
    if _has_prefix(names, _CLIP_G, _UNET + "label_emb."):
        if in_ch is None or in_ch == 4:
            return "sdxl-base", in_ch
        if in_ch == 9:
            return "sdxl-inpaint", in_ch
        if in_ch == 8:
            notes.append("instruct-pix2pix SDXL (8 UNet input channels)")
        else:
            notes.append(f"SDXL-like with {in_ch} UNet input channels")
        return "unknown", in_ch
    # UNet-only files: fall back on the cross-attention context width (full-size files only).
    ctx = _context_dim(header)
    if ctx is not None and _has_prefix(names, _UNET):
        fam = {768: "sd1", 1024: "sd2", 2048: "sdxl-base", 1280: "sdxl-refiner"}.get(ctx)
        if fam is not None:
            notes.append(f"UNet-only file; family from cross-attention width {ctx}")
            if fam == "sdxl-base" and in_ch == 9:
                fam = "sdxl-inpaint"
            return fam, in_ch
    if _has_prefix(names, "unet.", "text_encoder.", "down_blocks.", "text_model.", "encoder.down_blocks."):
        notes.append("diffusers/transformers component layout, not a single-file sgm checkpoint")
    elif not names:
        notes.append("no tensors")
    return "unknown", in_ch


def _majority_dtype(header: SafetensorsHeader, notes: List[str]) -> str:
    counts: Dict[str, int] = {}
    for name, info in header.tensors.items():
        if is_float(info.dtype) and info.numel > 0 and name not in _FLAG_NAMES:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    if not counts:
        return "unknown"
    best = max(sorted(counts), key=lambda d: counts[d])
    total = sum(counts.values())
    if any(d != best and n * 100 >= total for d, n in counts.items()):  # a minority of >= 1 %
        mix = ", ".join(f"{torch_dtype_name(d)} {100.0 * n / total:.1f}%" for d, n in sorted(counts.items()))
        notes.append(f"mixed float dtypes by elements: {mix}")
    return torch_dtype_name(best)


def _is_scaled(header: SafetensorsHeader) -> bool:
    le = header.tensors.get(LABEL_EMB_KEY)
    if le is not None:
        return tuple(le.shape) != _FULL_LABEL_EMB
    tok = header.tensors.get(CLIP_G_TOKEN_KEY)
    if tok is not None:
        return tuple(tok.shape) != _FULL_CLIP_G_TOKEN
    return False


def _shape_ok(expected: Tuple[int, ...], got: Tuple[int, ...], scaled: bool) -> bool:
    """``got`` is the canonical shape (VAE attention 2-D -> 4-D, text_projection.weight -> [in, out])."""
    if scaled:
        return len(got) == len(expected)
    return got == expected


def _key_diff(header: SafetensorsHeader, family: str, scaled: bool, det: Detection) -> None:
    present = canonical_shapes(header.tensors)
    extra: List[str] = []
    kinds: Dict[str, int] = {}
    for name in header.tensors:
        if canonical_name(name) is not None:
            continue
        kind = classify_extra_key(name)
        if kind.startswith("flag:"):
            continue
        extra.append(name)
        kinds[kind] = kinds.get(kind, 0) + 1
    missing: List[str] = []
    missing_opt: List[str] = []
    wrong: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = []
    for key, spec in SDXL_KEYS.items():
        got = present.get(key)
        if got is None:
            (missing_opt if key in OPTIONAL_KEYS else missing).append(key)
            continue
        if family == SDXL_INPAINT_FAMILY and key == IN0_KEY:
            continue  # 9 input channels by definition
        if not _shape_ok(tuple(spec.shape), got, scaled):
            wrong.append((key, tuple(spec.shape), got))
    det.missing = missing
    det.missing_optional = missing_opt
    det.extra = sorted(extra)
    det.extra_kinds = dict(sorted(kinds.items()))
    det.wrong_shape = wrong


def merged_recipe_of(metadata: Mapping[str, str]) -> Optional[Dict[str, Any]]:
    """The merge recipe a file's ``__metadata__`` records (ours or A1111's), or None.

    See :func:`mergekit_sdxl.sdxl.merge_metadata.read_provenance` (pure parsing, no file access).
    """
    return read_provenance(metadata)


def detect(header: SafetensorsHeader) -> Detection:
    """Classify a checkpoint from its header. Never raises for a well-formed header."""
    notes: List[str] = []
    family, in_ch = _family(header, notes)
    names = header.tensors
    v_pred = any(k in names for k in _VPRED_KEYS)
    if not v_pred and normalise_prediction_type(header.metadata.get(MODELSPEC_PREDICTION_TYPE, "")) == "v":
        v_pred = True
        notes.append(f"v-prediction from {MODELSPEC_PREDICTION_TYPE} metadata (no v_pred key)")
    if "edm_mean" in names:
        notes.append("Playground v2.5-style EDM model (edm_mean/edm_std)")
    det = Detection(
        family=family,  # type: ignore[arg-type]
        v_pred=v_pred,
        ztsnr="ztsnr" in names,
        dtype=_majority_dtype(header, notes),
        in_channels=in_ch,
        n_tensors=len(names),
        notes=notes,
        merged_recipe=merged_recipe_of(header.metadata),
    )
    if family in KEY_CHECKED_FAMILIES:
        det.scaled = _is_scaled(header)
        _key_diff(header, family, det.scaled, det)
    return det
