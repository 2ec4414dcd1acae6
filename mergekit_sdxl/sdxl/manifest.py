"""The SDXL single-file ("sgm") key manifest: names, shapes, components, MBW blocks, layers.

Pure data and string rules; no mergekit, no torch. The JSON package data is read once, lazily,
on first access of :data:`SDXL_KEYS` (or any helper that needs it).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Dict, Iterator, Mapping, NamedTuple, Optional, Tuple

__all__ = [
    "KeySpec",
    "SDXL_KEYS",
    "COMPONENT_PREFIXES",
    "COMPONENTS",
    "NUM_LAYERS",
    "BLOCK_IDS",
    "OPTIONAL_KEYS",
    "POSITION_IDS_KEY",
    "POSITION_IDS_SHAPE",
    "POSITION_IDS_DTYPE",
    "LOGIT_SCALE_KEY",
    "component_of",
    "block_of",
    "layer_of",
    "keys_of",
    "load_variant_keys",
]


class KeySpec(NamedTuple):
    """Shape and safetensors dtype string ("F16", "I64") of one manifest key."""

    shape: Tuple[int, ...]
    dtype: str


COMPONENT_PREFIXES: Dict[str, str] = {
    "unet": "model.diffusion_model.",
    "clip_l": "conditioner.embedders.0.transformer.",
    "clip_g": "conditioner.embedders.1.model.",
    "vae": "first_stage_model.",
}
COMPONENTS: Tuple[str, ...] = tuple(COMPONENT_PREFIXES)

# mergekit layer counts per component (see layer_of).
NUM_LAYERS: Dict[str, int] = {"unet": 19, "clip_l": 12, "clip_g": 32, "vae": 0}

# MBW block ids in their canonical order (sd-mecha / supermerger naming).
BLOCK_IDS: Tuple[str, ...] = (
    ("BASE",)
    + tuple(f"IN{i:02d}" for i in range(9))
    + ("M00",)
    + tuple(f"OUT{i:02d}" for i in range(9))
    + ("VAE",)
)

_DATA_PACKAGE = "mergekit_sdxl.sdxl.data"


def _read_json(name: str):
    return json.loads(resources.files(_DATA_PACKAGE).joinpath(name).read_text(encoding="utf-8"))


class _LazyKeys(Mapping[str, KeySpec]):
    """Read-only mapping that loads ``sdxl_keys.json`` on first use (insertion order = file order)."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: Optional[Dict[str, KeySpec]] = None

    def _load(self) -> Dict[str, KeySpec]:
        if self._data is None:
            raw = _read_json("sdxl_keys.json")
            self._data = {k: KeySpec(tuple(int(d) for d in v["shape"]), str(v["dtype"])) for k, v in raw.items()}
        return self._data

    def __getitem__(self, key: str) -> KeySpec:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, key: object) -> bool:
        return key in self._load()

    def __repr__(self) -> str:
        return f"<SDXL_KEYS: {len(self)} keys>"


SDXL_KEYS: Mapping[str, KeySpec] = _LazyKeys()

_CL = COMPONENT_PREFIXES["clip_l"] + "text_model."
_CG = COMPONENT_PREFIXES["clip_g"]

# CLIP-L's position_ids buffer: a constant (int64 arange(77)[None]), never merged. Defined here, the
# bottom of the sdxl import graph, so that every module names it from one place.
POSITION_IDS_KEY = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
POSITION_IDS_SHAPE: Tuple[int, int] = (1, 77)
POSITION_IDS_DTYPE = "I64"  # safetensors name
# CLIP-G's scalar logit scale (SDXL never reads it for generation: optional below).
LOGIT_SCALE_KEY = _CG + "logit_scale"

# Keys of the 2515-key standard file that real files may lack (SDXL never reads them for
# generation, or they are buffers). Kept deliberately narrow: CLIP-G ln_final / text_projection /
# resblocks.31 feed the pooled embedding SDXL does use, so they are NOT optional here.
OPTIONAL_KEYS: frozenset = frozenset(
    [POSITION_IDS_KEY, LOGIT_SCALE_KEY, _CL + "final_layer_norm.weight", _CL + "final_layer_norm.bias"]
    + [
        _CL + f"encoder.layers.11.{m}.{p}"
        for m in (
            "layer_norm1",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
            "self_attn.k_proj",
            "self_attn.q_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
        )
        for p in ("weight", "bias")
    ]
)


def component_of(key: str) -> Optional[str]:
    """``"unet" | "clip_l" | "clip_g" | "vae"`` for a key under one of the component prefixes, else None."""
    for comp, prefix in COMPONENT_PREFIXES.items():
        if key.startswith(prefix):
            return comp
    return None


def keys_of(component: str) -> Tuple[str, ...]:
    """Manifest keys of one component, in manifest order."""
    prefix = COMPONENT_PREFIXES[component]
    return tuple(k for k in SDXL_KEYS if k.startswith(prefix))


_UNET = re.escape(COMPONENT_PREFIXES["unet"])
_RE_IN = re.compile(_UNET + r"input_blocks\.([0-8])\.")
_RE_MID = re.compile(_UNET + r"middle_block\.")
_RE_OUT = re.compile(_UNET + r"output_blocks\.([0-8])\.")
_RE_UNET_OUT = re.compile(_UNET + r"out\.")
_RE_CLIP_L_LAYER = re.compile(re.escape(_CL) + r"encoder\.layers\.(\d|1[01])\.")
_RE_CLIP_G_LAYER = re.compile(re.escape(_CG) + r"transformer\.resblocks\.(\d|[12]\d|3[01])\.")


def block_of(key: str) -> str:
    """MBW block id of a key (sd-mecha convention).

    UNet ``input_blocks.N.`` -> ``IN0N``, ``middle_block.`` -> ``M00``, ``output_blocks.N.`` -> ``OUT0N``,
    ``out.`` -> ``OUT08``; ``time_embed``/``label_emb`` and both text encoders -> ``BASE``;
    ``first_stage_model.`` -> ``VAE``. Keys outside every component (extra keys) and block indices
    SDXL does not have (``input_blocks.10``) -> ``BASE``.
    Patterns are anchored at the prefix and end on a dot, so ``input_blocks.1.`` never matches
    ``input_blocks.10.``.
    """
    if key.startswith(COMPONENT_PREFIXES["vae"]):
        return "VAE"
    m = _RE_IN.match(key)
    if m:
        return f"IN{int(m.group(1)):02d}"
    if _RE_MID.match(key):
        return "M00"
    m = _RE_OUT.match(key)
    if m:
        return f"OUT{int(m.group(1)):02d}"
    if _RE_UNET_OUT.match(key):
        return "OUT08"
    return "BASE"


def layer_of(key: str) -> Optional[Tuple[str, int]]:
    """``(component, layer index)`` in mergekit's layer numbering, or None for non-layer weights.

    unet: ``input_blocks.N`` -> N (0..8), ``middle_block`` -> 9, ``output_blocks.N`` -> 10+N (10..18),
    ``out.`` -> 18 (shares OUT08's gradient value); ``time_embed``/``label_emb`` -> None.
    clip_l: ``text_model.encoder.layers.N.`` -> N (0..11). clip_g: ``transformer.resblocks.N.`` -> N
    (0..31). vae: always None. Indices outside those ranges (non-SDXL keys) -> None.
    """
    m = _RE_IN.match(key)
    if m:
        return ("unet", int(m.group(1)))
    if _RE_MID.match(key):
        return ("unet", 9)
    m = _RE_OUT.match(key)
    if m:
        return ("unet", 10 + int(m.group(1)))
    if _RE_UNET_OUT.match(key):
        return ("unet", 18)
    m = _RE_CLIP_L_LAYER.match(key)
    if m:
        return ("clip_l", int(m.group(1)))
    m = _RE_CLIP_G_LAYER.match(key)
    if m:
        return ("clip_g", int(m.group(1)))
    return None


_VARIANTS: Optional[dict] = None


def load_variant_keys() -> dict:
    """The ``variant_keys`` table of ``sdxl_variant_keys.json`` (name pattern -> info dict), cached."""
    global _VARIANTS
    if _VARIANTS is None:
        _VARIANTS = _read_json("sdxl_variant_keys.json")["variant_keys"]
    return _VARIANTS
