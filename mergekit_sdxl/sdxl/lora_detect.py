"""What a LoRA / LyCORIS file is, from its header alone: network kinds, ranks, components touched,
and the base family it was trained for. Pure: names, shapes and metadata; no tensor reads.

The family comes from, in order: kohya's ``ss_base_model_version`` (``sdxl_base_v1-0``, ``sd_v1``,
``sd_v2``, ``flux1``, ...), ``modelspec.architecture`` (``stable-diffusion-xl-v1-base/lora``, ...),
key names only another family has (Flux's ``double_blocks``, SD3's ``joint_blocks``, SD 1.x/2.x's
single ``lora_te_`` text encoder or attention in the first UNet level), the cross-attention width
of an ``attn2.to_k`` module (768 SD 1.x, 1024 SD 2.x, 2048 SDXL, 1280 SDXL refiner) and finally
names only SDXL has (two text encoders, the sgm UNet layout of kohya's SDXL trainer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .families import family_label
from .header import SafetensorsHeader
from .lora_keys import LoraLayout, delta_shape, looks_like_lora, parse_lora, rank_of

__all__ = ["LoraDetection", "detect_lora", "is_lora_header", "family_from_metadata"]

SS_BASE_MODEL_VERSION = "ss_base_model_version"
MODELSPEC_ARCHITECTURE = "modelspec.architecture"

# kohya's ss_base_model_version / modelspec.architecture prefixes -> family (first match wins).
_VERSION_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("sdxl_refiner", "sdxl-refiner"),
    ("sdxl", "sdxl-base"),
    ("sd_v1", "sd1"),
    ("sd_v2", "sd2"),
    ("sd3", "sd3"),
    ("flux", "flux"),
    ("chroma", "flux"),
)
_ARCH_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("stable-diffusion-xl-v1-refiner", "sdxl-refiner"),
    ("stable-diffusion-xl", "sdxl-base"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-3", "sd3"),
    ("flux", "flux"),
    ("chroma", "flux"),
)
_CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl-base", 1280: "sdxl-refiner"}

_FLUX = re.compile(r"double_blocks|single_blocks|single_transformer_blocks")
_SD3 = re.compile(r"joint_blocks|context_embedder")
# SD 1.x/2.x UNet layout: attention at the first level, a fourth level, input blocks 9-11.
_SD12_UNET = re.compile(
    r"(down_blocks[._]0[._]attentions|up_blocks[._]3[._]attentions|down_blocks[._]3[._]|"
    r"input_blocks[._](9|1[01])[._]|output_blocks[._](9|1[01])[._])"
)
_SDXL_NAMES = re.compile(r"^(lora_te1_|lora_te2_|text_encoder_2\.|(lora_unet|lycoris)_(input_blocks|middle_block|output_blocks|label_emb)_)")


@dataclass
class LoraDetection:
    """A LoRA file as ``inspect`` and preflight see it.

    ``family``: what it was trained for (a :data:`~mergekit_sdxl.sdxl.families.Family`), with
    ``family_source`` saying how that was found; ``kinds``: network kinds of its modules
    (``lora`` ``loha`` ``lokr`` ``full`` ``norm``), ``dora`` whether any module is DoRA; ``ranks``:
    the ranks found (these three over every module, those of another family's layout included);
    ``components``: modules per SDXL component (unet, clip_l, clip_g); ``n_modules``: modules
    that map to an SDXL key, ``unmapped``: the others.
    """

    family: str
    family_source: str = ""
    kinds: Tuple[str, ...] = ()
    dora: bool = False
    conv: bool = False  # any module over a conv kernel larger than 1x1 (LoCon)
    ranks: Tuple[int, ...] = ()
    components: Dict[str, int] = field(default_factory=dict)
    n_modules: int = 0
    unmapped: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def network(self) -> str:
        """``LoRA``, ``LoCon``, ``LoHa``, ``LoKr``, ... (``+DoRA``), several joined by ``/``."""
        names = {"lora": "LoCon" if self.conv else "LoRA", "loha": "LoHa", "lokr": "LoKr", "full": "full", "norm": "norm"}
        text = "/".join(names[k] for k in self.kinds) or "none"
        return text + ("+DoRA" if self.dora else "")

    @property
    def rank_text(self) -> str:
        if not self.ranks:
            return "-"
        return str(self.ranks[0]) if len(self.ranks) == 1 else f"{min(self.ranks)}-{max(self.ranks)}"

    def to_dict(self) -> Dict[str, object]:
        return {
            "family": self.family,
            "family_source": self.family_source,
            "network": self.network,
            "kinds": list(self.kinds),
            "dora": self.dora,
            "ranks": list(self.ranks),
            "components": dict(self.components),
            "n_modules": self.n_modules,
            "unmapped": list(self.unmapped),
            "problems": list(self.problems),
            "notes": list(self.notes),
        }

    def describe(self) -> str:
        comps = ", ".join(f"{c} {n}" for c, n in self.components.items())
        if self.unmapped:
            comps += (", " if comps else "") + f"{len(self.unmapped)} on no SDXL key"
        total = self.n_modules + len(self.unmapped)
        return (
            f"{self.network} rank {self.rank_text}, {total} modules ({comps or 'none'}); "
            f"trained for {family_label(self.family)} ({self.family_source or 'not recorded'})"
        )


def is_lora_header(header: SafetensorsHeader) -> bool:
    """True for a LoRA / LyCORIS file (most tensors are LoRA components)."""
    return looks_like_lora(header.tensors)


def _from_prefixes(value: str, table: Sequence[Tuple[str, str]]) -> Optional[str]:
    value = value.strip().lower()
    for prefix, family in table:
        if value.startswith(prefix):
            return family
    return None


def family_from_metadata(metadata: Mapping[str, str]) -> Optional[Tuple[str, str]]:
    """``(family, source)`` from kohya's or modelspec's metadata, None when neither says."""
    version = metadata.get(SS_BASE_MODEL_VERSION)
    if version:
        family = _from_prefixes(version, _VERSION_PREFIXES)
        if family:
            return family, f"{SS_BASE_MODEL_VERSION} {version!r}"
    arch = metadata.get(MODELSPEC_ARCHITECTURE)
    if arch:
        family = _from_prefixes(arch, _ARCH_PREFIXES)
        if family:
            return family, f"{MODELSPEC_ARCHITECTURE} {arch!r}"
    return None


def _context_width(header: SafetensorsHeader) -> Optional[int]:
    """Input width of a cross-attention key projection (``attn2.to_k`` / ``attn2_to_k``)."""
    for name, info in header.tensors.items():
        if re.search(r"attn2[._]to_k[._](lora_down|lora\.down|lora_A)\.weight$", name) and len(info.shape) >= 2:
            return int(info.shape[1])
    return None


def _text_width(header: SafetensorsHeader) -> Optional[int]:
    for name, info in header.tensors.items():
        if name.startswith("lora_te_") and re.search(r"q_proj[._](lora_down|lora_A)\.weight$", name) and len(info.shape) >= 2:
            return int(info.shape[1])
    return None


def _family_from_names(header: SafetensorsHeader) -> Optional[Tuple[str, str]]:
    names = list(header.tensors)
    if any(_FLUX.search(n) for n in names):
        return "flux", "Flux key names (double_blocks/single_blocks)"
    if any(_SD3.search(n) for n in names):
        return "sd3", "SD3 key names (joint_blocks)"
    single_te = any(n.startswith("lora_te_") for n in names) and not any(n.startswith(("lora_te1_", "lora_te2_")) for n in names)
    sd12_unet = next((n for n in names if _SD12_UNET.search(n)), None)
    if single_te or sd12_unet:
        width = _text_width(header) or _context_width(header)
        family = "sd2" if width == 1024 else "sd1"
        why = "a single text encoder (lora_te_)" if single_te else f"the SD 1.x/2.x UNet layout ({sd12_unet})"
        return family, why
    return None


def detect_lora(header: SafetensorsHeader, layout: Optional[LoraLayout] = None) -> LoraDetection:
    """Classify a LoRA file from its header. Never raises for a well-formed header."""
    layout = layout if layout is not None else parse_lora(header.tensors)
    found = family_from_metadata(header.metadata) or _family_from_names(header)
    if found is None:
        width = _context_width(header)
        if width in _CONTEXT_WIDTHS:
            found = (_CONTEXT_WIDTHS[width], f"cross-attention width {width}")
        elif any(_SDXL_NAMES.search(n) for n in header.tensors):
            found = ("sdxl-base", "SDXL key names (two text encoders / the sgm UNet)")
    det = LoraDetection(family=found[0] if found else "unknown", family_source=found[1] if found else "")
    shapes = {name: info.shape for name, info in header.tensors.items()}
    ranks = set()
    components: Dict[str, int] = {}
    for module in list(layout.modules.values()) + list(layout.foreign.values()):
        if module.target.weight:
            components[module.target.component] = components.get(module.target.component, 0) + 1
        try:
            rank = rank_of(module, shapes)
            delta_shape(module, shapes)
        except ValueError as error:
            det.problems.append(str(error))
            continue
        if rank is not None:
            ranks.add(rank)
        det.dora = det.dora or module.dora
        kernel = module.components.get("down") or module.components.get("hada_t1") or module.components.get("lokr_t2")
        if kernel is not None and any(int(d) > 1 for d in shapes[kernel][2:]):
            det.conv = True
        elif module.kind == "lora" and "mid" in module.components:
            det.conv = True
    det.kinds = layout.kinds
    det.ranks = tuple(sorted(ranks))
    det.components = {c: components[c] for c in ("unet", "clip_l", "clip_g") if c in components}
    det.n_modules = len(layout.modules)
    det.unmapped = list(layout.unmapped)
    det.problems += [f"{name}: {why}" for name, why in layout.problems]
    if layout.ignored:
        det.notes.append(f"{len(layout.ignored)} bundled embedding tensors (bundle_emb.*) are not model weights: ignored")
    return det
