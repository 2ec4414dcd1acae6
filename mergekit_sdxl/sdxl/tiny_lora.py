"""Small LoRA / LyCORIS files for a given SDXL key layout, for tests and benchmarks.

Files are written the way kohya's sd-scripts and LyCORIS write them (``safetensors`` with
``<module>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, ``hada_*``, ``lokr_*``,
``dora_scale``), over the module names kohya's SDXL trainer uses (:func:`kohya_modules`), or in
the diffusers / PEFT layout (``unet.<diffusers path>.lora_A.weight``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .lora_keys import LoraTarget, diffusers_unet_path, module_targets
from .manifest import COMPONENT_PREFIXES

__all__ = ["kohya_modules", "module_shape", "lora_factors", "write_lora", "peft_name", "kohya_diffusers_name"]

PathLike = Union[str, "os.PathLike[str]"]

# What kohya's LoRANetwork adapts in SDXL: every Linear (and 1x1 conv) of the transformers, and
# with conv_dim (LoCon) the ResNet/down/up-sampler convs; in the text encoders, attention and MLP.
_UNET_ATTENTION = re.compile(r"\.(proj_in|proj_out|attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))$")
_UNET_CONV = re.compile(r"\.(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1|op|conv)$")
_TEXT = re.compile(r"_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")


def module_shape(target: LoraTarget, shapes: Mapping[str, Sequence[int]]) -> Tuple[int, ...]:
    """The adapted module's own weight shape in a base with these key shapes."""
    shape = tuple(int(d) for d in shapes[target.weight])
    if target.block is not None:
        return (shape[0] // 3,) + shape[1:]
    if target.transpose:
        return tuple(reversed(shape))
    return shape


def kohya_modules(
    shapes: Mapping[str, Sequence[int]], *, unet: bool = True, conv: bool = False, te1: bool = True, te2: bool = True
) -> List[Tuple[str, LoraTarget]]:
    """kohya-style module names (sgm UNet layout, ``lora_te1_`` / ``lora_te2_`` HF names) of a base."""
    out: List[Tuple[str, LoraTarget]] = []
    for name, target in sorted(module_targets().items()):
        if target.weight not in shapes:
            continue
        if name.startswith("lora_unet_") and unet:
            sgm = target.weight[len(COMPONENT_PREFIXES["unet"]) : -len(".weight")]
            if name != "lora_unet_" + sgm.replace(".", "_"):
                continue  # the diffusers-layout spelling of the same module
            if _UNET_ATTENTION.search("." + sgm) or (conv and _UNET_CONV.search("." + sgm)):
                out.append((name, target))
        elif (name.startswith("lora_te1_text_model_") and te1) or (name.startswith("lora_te2_text_model_") and te2):
            if _TEXT.search(name):
                out.append((name, target))
    return out


def kohya_diffusers_name(name: str) -> Optional[str]:
    """kohya's name of the same module over the diffusers UNet (``lora_unet_down_blocks_...``)."""
    if not name.startswith("lora_unet_"):
        return None
    target = module_targets()[name]
    sgm = target.weight[len(COMPONENT_PREFIXES["unet"]) : -len(".weight")]
    diffusers = diffusers_unet_path(sgm)
    return None if diffusers is None else "lora_unet_" + diffusers.replace(".", "_")


def peft_name(name: str) -> Optional[str]:
    """The diffusers / PEFT name (``unet.down_blocks...``, ``text_encoder.``, ``text_encoder_2.``)."""
    target = module_targets()[name]
    for other, t in module_targets().items():
        if t == target and other.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.")):
            return other
    return None


def _randn(shape: Sequence[int], g: torch.Generator, std: float) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=g) * std


def lora_factors(
    kind: str,
    shape: Sequence[int],
    rank: int,
    *,
    seed: int = 0,
    alpha: Optional[float] = None,
    tucker: bool = False,
    dora: Optional[str] = None,
    std: float = 0.05,
    lokr_factor: Tuple[int, int] = (2, 2),
    full_w1: bool = True,
    full_w2: bool = False,
) -> Dict[str, torch.Tensor]:
    """Random factors of one module of weight ``shape`` (``[out, in, *kernel]``), float32.

    ``kind``: ``lora`` (conv kernels go into ``lora_down`` as kohya's LoCon; ``tucker`` adds
    LyCORIS's ``lora_mid``), ``loha``, ``lokr`` (``w1`` is ``lokr_factor`` = (out, in) factors
    of the small Kronecker factor; ``full_w1`` / ``full_w2`` choose full or factorised factors).
    ``dora``: ``"rows"`` (one magnitude per output row) or ``"columns"`` (LyCORIS's
    ``[1, in, 1, 1]`` per input channel).
    """
    g = torch.Generator().manual_seed(seed)
    out_dim, in_dim, kernel = int(shape[0]), int(shape[1]) if len(shape) > 1 else 1, tuple(int(d) for d in shape[2:])
    ones = (1,) * len(kernel)
    f: Dict[str, torch.Tensor] = {}
    if kind == "lora":
        if tucker and kernel:
            f["lora_down.weight"] = _randn((rank, in_dim) + ones, g, std)
            f["lora_mid.weight"] = _randn((rank, rank) + kernel, g, std)
        else:
            f["lora_down.weight"] = _randn((rank, in_dim) + kernel, g, std)
        f["lora_up.weight"] = _randn((out_dim, rank) + ones, g, std)
    elif kind == "loha":
        cols = in_dim * (int(torch.tensor(kernel).prod()) if kernel else 1)
        if tucker and kernel:
            for n in ("1", "2"):
                f[f"hada_t{n}"] = _randn((rank, rank) + kernel, g, std)
                f[f"hada_w{n}_a"] = _randn((rank, out_dim), g, std)
                f[f"hada_w{n}_b"] = _randn((rank, in_dim), g, std)
        else:
            for n in ("1", "2"):
                f[f"hada_w{n}_a"] = _randn((out_dim, rank), g, std)
                f[f"hada_w{n}_b"] = _randn((rank, cols), g, std)
    elif kind == "lokr":
        a, b = lokr_factor
        c, d = out_dim // a, in_dim // b
        if full_w1:
            f["lokr_w1"] = _randn((a, b), g, std)
        else:
            f["lokr_w1_a"] = _randn((a, rank), g, std)
            f["lokr_w1_b"] = _randn((rank, b), g, std)
        if full_w2:
            f["lokr_w2"] = _randn((c, d) + kernel, g, std)
        elif tucker and kernel:
            f["lokr_t2"] = _randn((rank, rank) + kernel, g, std)
            f["lokr_w2_a"] = _randn((rank, c), g, std)
            f["lokr_w2_b"] = _randn((rank, d), g, std)
        else:
            cols = d * (int(torch.tensor(kernel).prod()) if kernel else 1)
            f["lokr_w2_a"] = _randn((c, rank), g, std)
            f["lokr_w2_b"] = _randn((rank, cols), g, std)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    if alpha is not None:
        f["alpha"] = torch.tensor(float(alpha))
    if dora == "rows":
        f["dora_scale"] = 1.0 + _randn((out_dim, 1) + ones, g, 0.1)
    elif dora == "columns":
        f["dora_scale"] = 1.0 + _randn((1, in_dim) + ones, g, 0.1)
    return f


def write_lora(
    path: PathLike,
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    dtype: torch.dtype = torch.float16,
    metadata: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write ``{module name: {component: tensor}}`` as ``<module>.<component>`` tensors (alpha
    and dora_scale kept in float32, as kohya and LyCORIS save them)."""
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    for name, parts in modules.items():
        for component, value in parts.items():
            keep = component in ("alpha", "dora_scale") or component.endswith("lora_magnitude_vector")
            tensors[f"{name}.{component}"] = (value if keep else value.to(dtype)).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, os.fspath(path), metadata=dict(metadata or {}))
    return path
