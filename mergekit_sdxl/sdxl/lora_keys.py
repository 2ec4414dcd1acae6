"""LoRA / LyCORIS tensor names -> the SDXL (sgm) keys they change. Pure: names and shapes only.

A LoRA file stores, per adapted *module*, a few factor tensors (``<module>.lora_down.weight``,
``<module>.hada_w1_a``, ``<module>.alpha``, ...). This module

* maps every module name spelling seen in SDXL LoRAs to the sgm key of the weight it changes
  (:func:`module_targets`): kohya's names over the sgm UNet (``lora_unet_input_blocks_4_1_proj_in``)
  and over the diffusers UNet (``lora_unet_down_blocks_1_attentions_0_proj_in``), ``lora_te1_*``
  (CLIP-L, HF names), ``lora_te2_*`` (CLIP-G under its HF names: ``self_attn.q_proj`` is a row
  block of the sgm ``attn.in_proj_weight``, ``text_projection`` is the transpose of the sgm one),
  LyCORIS's ``lycoris_*`` (its ``create_lycoris`` wrapper over either UNet layout), and the
  diffusers / PEFT layout (``unet.``, ``text_encoder.``, ``text_encoder_2.``);
* groups a file's tensor names into modules with their components and network kind
  (:func:`parse_lora`), and gives the shape of each module's weight change from the factor shapes
  alone (:func:`delta_shape`), so a file is checked against a base before any tensor is read.

Kinds: ``lora`` (kohya LoRA, LoCon incl. 3x3 convs and the Tucker ``lora_mid``, PEFT ``lora_A/B``),
``loha`` (``hada_*``), ``lokr`` (``lokr_*``), ``full`` (LyCORIS ``diff``/``diff_b``), ``norm``
(LyCORIS ``w_norm``/``b_norm``); any of the first three may carry DoRA's ``dora_scale`` (PEFT:
``lora_magnitude_vector``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .manifest import COMPONENT_PREFIXES, SDXL_KEYS

__all__ = [
    "LoraTarget",
    "LoraModule",
    "LoraLayout",
    "LORA_KINDS",
    "NO_TARGET",
    "COMPONENT_SUFFIXES",
    "module_targets",
    "target_of",
    "normalised_module",
    "diffusers_unet_path",
    "parse_lora",
    "looks_like_lora",
    "delta_shape",
    "rank_of",
]

_UNET = COMPONENT_PREFIXES["unet"]
_CLIP_L = COMPONENT_PREFIXES["clip_l"]
_CLIP_G = COMPONENT_PREFIXES["clip_g"]

LORA_KINDS: Tuple[str, ...] = ("lora", "loha", "lokr", "full", "norm")

# Tensor-name suffix -> component (longest suffixes first where one ends another).
COMPONENT_SUFFIXES: Tuple[Tuple[str, str], ...] = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_magnitude_vector.weight", "dora_scale"),
    (".lora_magnitude_vector", "dora_scale"),
    (".dora_scale", "dora_scale"),
    (".alpha", "alpha"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"),
    (".hada_t2", "hada_t2"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_t1", "lokr_t1"),  # LyCORIS lists it but never builds it; ignored as LyCORIS does
    (".lokr_t2", "lokr_t2"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
    (".w_norm", "w_norm"),
    (".b_norm", "b_norm"),
)

# The old diffusers attention-processor spelling: "<attn>.processor.to_q_lora.down.weight".
_PROCESSOR = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
# Textual-inversion embeddings kohya bundles into LoRA files: not weights of the model.
BUNDLED_EMBEDDING_PREFIX = "bundle_emb."

_KIND_OF = {
    "down": "lora",
    "up": "lora",
    "mid": "lora",
    "diff": "full",
    "diff_b": "full",
    "w_norm": "norm",
    "b_norm": "norm",
}
_SHARED = frozenset({"alpha", "dora_scale", "lokr_t1"})


@dataclass(frozen=True)
class LoraTarget:
    """Where one module's change lands in an SDXL checkpoint.

    ``weight`` / ``bias``: the sgm keys its weight and bias changes go to (``bias`` None when the
    layer has none); ``block``: for CLIP-G's q/k/v, which third of the stacked ``in_proj`` rows
    (0, 1, 2) is this module's weight; ``transpose``: the sgm key stores the module's weight
    transposed (CLIP-G ``text_projection``).
    """

    weight: str
    bias: Optional[str] = None
    block: Optional[int] = None
    transpose: bool = False

    @property
    def component(self) -> str:
        for name, prefix in COMPONENT_PREFIXES.items():
            if self.weight.startswith(prefix):
                return name
        return "other"


NO_TARGET = LoraTarget(weight="")
"""The target of a module that changes no SDXL key (:attr:`LoraLayout.foreign`)."""

# --------------------------------------------------------------------------- the UNet


_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# SDXL's UNet: 2 res-blocks per level, 3 levels, attention in up blocks 0 and 1 only.
_PER_LEVEL = 3
_UP_HAS_ATTENTION = (True, True, False)


def _resnet(rest: str) -> Optional[str]:
    for sgm, diffusers in _RESNET.items():
        if rest == sgm or rest.startswith(sgm + "."):
            return diffusers + rest[len(sgm):]
    return None


def diffusers_unet_path(sgm_path: str) -> Optional[str]:
    """The diffusers ``UNet2DConditionModel`` name of an SDXL sgm UNet module path
    (``input_blocks.4.1.proj_in`` -> ``down_blocks.1.attentions.0.proj_in``), None if it has none."""
    if sgm_path in _UNET_TOP:
        return _UNET_TOP[sgm_path]
    if sgm_path.startswith("middle_block."):
        return _diffusers_middle(sgm_path)
    parts = sgm_path.split(".")
    if len(parts) < 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    n, j, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
    if parts[0] == "input_blocks" and n >= 1:
        level, slot = (n - 1) // _PER_LEVEL, (n - 1) % _PER_LEVEL
        if slot < 2 and j == 0:
            res = _resnet(rest)
            return f"down_blocks.{level}.resnets.{slot}.{res}" if res else None
        if slot < 2 and j == 1:
            return f"down_blocks.{level}.attentions.{slot}.{rest}" if rest else None
        if slot == 2 and j == 0 and rest.startswith("op"):
            return f"down_blocks.{level}.downsamplers.0.conv{rest[2:]}"
        return None
    if parts[0] == "output_blocks":
        level, slot = n // _PER_LEVEL, n % _PER_LEVEL
        if level >= len(_UP_HAS_ATTENTION):
            return None
        if j == 0:
            res = _resnet(rest)
            return f"up_blocks.{level}.resnets.{slot}.{res}" if res else None
        upsampler = 2 if _UP_HAS_ATTENTION[level] else 1
        if j == upsampler and rest.startswith("conv"):
            return f"up_blocks.{level}.upsamplers.0.conv{rest[4:]}"
        if j == 1 and _UP_HAS_ATTENTION[level]:
            return f"up_blocks.{level}.attentions.{slot}.{rest}" if rest else None
    return None


def _diffusers_middle(sgm_path: str) -> Optional[str]:
    parts = sgm_path.split(".")
    if parts[0] != "middle_block" or len(parts) < 3 or not parts[1].isdigit():
        return None
    n, rest = int(parts[1]), ".".join(parts[2:])
    if n == 1:
        return f"mid_block.attentions.0.{rest}"
    if n in (0, 2):
        res = _resnet(rest)
        return f"mid_block.resnets.{n // 2}.{res}" if res else None
    return None


# --------------------------------------------------------------------------- CLIP-G under HF names

_CLIP_G_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
}
_QKV = ("q", "k", "v")


def _clip_g_modules(layers: int) -> Dict[str, LoraTarget]:
    """HF ``CLIPTextModelWithProjection`` module paths of CLIP-G -> their sgm targets."""
    out: Dict[str, LoraTarget] = {}
    for n in range(layers):
        sgm = f"{_CLIP_G}transformer.resblocks.{n}."
        hf = f"text_model.encoder.layers.{n}."
        for i, x in enumerate(_QKV):
            out[f"{hf}self_attn.{x}_proj"] = LoraTarget(sgm + "attn.in_proj_weight", sgm + "attn.in_proj_bias", block=i)
        for name, sgm_name in _CLIP_G_LAYER.items():
            out[hf + name] = LoraTarget(sgm + sgm_name + ".weight", sgm + sgm_name + ".bias")
    out["text_model.final_layer_norm"] = LoraTarget(_CLIP_G + "ln_final.weight", _CLIP_G + "ln_final.bias")
    out["text_model.embeddings.token_embedding"] = LoraTarget(_CLIP_G + "token_embedding.weight")
    out["text_model.embeddings.position_embedding"] = LoraTarget(_CLIP_G + "positional_embedding")
    out["text_projection"] = LoraTarget(_CLIP_G + "text_projection", transpose=True)
    return out


# --------------------------------------------------------------------------- the table


def _weight_modules(prefix: str) -> Dict[str, LoraTarget]:
    """sgm module path (relative to ``prefix``) -> target, for every ``.weight`` key there."""
    out: Dict[str, LoraTarget] = {}
    for key in SDXL_KEYS:
        if key.startswith(prefix) and key.endswith(".weight"):
            module = key[len(prefix) : -len(".weight")]
            bias = key[: -len("weight")] + "bias"
            out[module] = LoraTarget(key, bias if bias in SDXL_KEYS else None)
    return out


def _add(table: Dict[str, LoraTarget], name: str, target: LoraTarget) -> None:
    known = table.get(name)
    if known is not None and known != target:
        raise AssertionError(f"LoRA module name {name!r} would map to both {known.weight} and {target.weight}")
    table[name] = target


def _kohya(prefix: str, path: str) -> str:
    return prefix + "_" + path.replace(".", "_")


@lru_cache(maxsize=1)
def module_targets() -> Mapping[str, LoraTarget]:
    """Every module name spelling -> its :class:`LoraTarget` (built once from the manifest)."""
    table: Dict[str, LoraTarget] = {}
    for path, target in _weight_modules(_UNET).items():
        _add(table, _kohya("lora_unet", path), target)  # kohya over the sgm UNet (SDXL)
        _add(table, _kohya("lycoris", path), target)  # LyCORIS's own wrapper (create_lycoris) over it
        diffusers = diffusers_unet_path(path)
        if diffusers is not None:
            _add(table, _kohya("lora_unet", diffusers), target)  # kohya over the diffusers UNet
            _add(table, _kohya("lycoris", diffusers), target)
            _add(table, "unet." + diffusers, target)  # diffusers / PEFT
            _add(table, diffusers, target)  # a PEFT adapter saved from the UNet itself
    for path, target in _weight_modules(_CLIP_L).items():
        for prefix in ("lora_te1", "lora_te"):
            _add(table, _kohya(prefix, path), target)
        _add(table, "text_encoder." + path, target)
        if path.startswith("text_model."):  # transformers 5's CLIPTextModel has no text_model level
            _add(table, "text_encoder." + path[len("text_model."):], target)
    layers = sum(1 for k in SDXL_KEYS if k.startswith(_CLIP_G + "transformer.resblocks.") and k.endswith(".attn.in_proj_weight"))
    for path, target in _clip_g_modules(layers).items():
        _add(table, _kohya("lora_te2", path), target)
        _add(table, "text_encoder_2." + path, target)
        if path.startswith("text_model."):
            _add(table, "text_encoder_2." + path[len("text_model."):], target)
    for path, target in _weight_modules(_CLIP_G).items():  # sgm (OpenCLIP) names of CLIP-G
        _add(table, _kohya("lora_te2", path), target)
    return table


def normalised_module(module: str) -> str:
    """The module name as :func:`module_targets` spells it (PEFT wrappers removed)."""
    for wrapper in ("base_model.model.",):
        if module.startswith(wrapper):
            module = module[len(wrapper):]
    for component in ("unet.", "text_encoder.", "text_encoder_2."):
        inner = component + "base_model.model."
        if module.startswith(inner):
            module = component + module[len(inner):]
    return module


def target_of(module: str) -> Optional[LoraTarget]:
    """The target of a module name as a LoRA file spells it, None when it changes no SDXL key."""
    return module_targets().get(normalised_module(module))


# --------------------------------------------------------------------------- one file's modules


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of a file: its kind, components (-> stored tensor names) and target."""

    name: str
    kind: str
    components: Mapping[str, str]
    target: LoraTarget

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.components


@dataclass
class LoraLayout:
    """A LoRA file's tensors grouped into modules.

    ``unmapped``: module names that change no SDXL key (``foreign``: those modules, with the
    target :data:`NO_TARGET`, so that a LoRA of another family is still described); ``problems``:
    ``(tensor or module name, reason)`` for what cannot be read as a LoRA (unknown components,
    incomplete or mixed modules); ``ignored``: tensors deliberately left out (kohya's bundled
    embeddings).
    """

    modules: Dict[str, LoraModule] = field(default_factory=dict)
    unmapped: List[str] = field(default_factory=list)
    foreign: Dict[str, LoraModule] = field(default_factory=dict)
    problems: List[Tuple[str, str]] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)

    @property
    def kinds(self) -> Tuple[str, ...]:
        """Network kinds of its modules, mapped or not."""
        found = {m.kind for m in self.modules.values()} | {m.kind for m in self.foreign.values()}
        return tuple(k for k in LORA_KINDS if k in found)


def split_name(tensor: str) -> Optional[Tuple[str, str]]:
    """``(module, component)`` of a LoRA tensor name, None for a name with no known component."""
    match = _PROCESSOR.match(tensor)
    if match:
        proj = match["proj"] + (".0" if match["proj"] == "to_out" else "")
        return f"{match['attn']}.{proj}", match["part"]
    for suffix, component in COMPONENT_SUFFIXES:
        if tensor.endswith(suffix) and len(tensor) > len(suffix):
            return tensor[: -len(suffix)], component
    return None


def looks_like_lora(names: Iterable[str]) -> bool:
    """True when most tensor names are LoRA / LyCORIS components (a header check, no reads)."""
    names = list(names)
    if not names:
        return False
    hits = sum(1 for n in names if split_name(n) is not None or n.startswith(BUNDLED_EMBEDDING_PREFIX))
    return hits * 2 > len(names) and any(split_name(n) is not None and split_name(n)[1] != "alpha" for n in names)  # type: ignore[index]


def _kind(module: str, components: Mapping[str, str], problems: List[Tuple[str, str]]) -> Optional[str]:
    kinds = set()
    for component in components:
        if component in _SHARED:
            continue
        kinds.add(_KIND_OF.get(component) or component.split("_")[0].replace("hada", "loha"))
    if len(kinds) != 1:
        what = ", ".join(sorted(components))
        problems.append((module, f"mixes components of several network kinds ({what})" if kinds else "has only an alpha/dora_scale"))
        return None
    kind = kinds.pop()
    missing = _missing(kind, components)
    if missing:
        problems.append((module, f"{kind} module lacks {missing}"))
        return None
    return kind


def _missing(kind: str, c: Mapping[str, str]) -> str:
    if kind == "lora":
        return " and ".join(x for x in ("down", "up") if x not in c)
    if kind == "loha":
        need = [x for x in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if x not in c]
        if ("hada_t1" in c) != ("hada_t2" in c):
            need.append("hada_t2" if "hada_t1" in c else "hada_t1")
        return ", ".join(need)
    if kind == "lokr":
        need = []
        if "lokr_w1" not in c and not ("lokr_w1_a" in c and "lokr_w1_b" in c):
            need.append("lokr_w1 (or lokr_w1_a and lokr_w1_b)")
        if "lokr_w2" not in c and not ("lokr_w2_a" in c and "lokr_w2_b" in c):
            need.append("lokr_w2 (or lokr_w2_a and lokr_w2_b)")
        return ", ".join(need)
    return ""


def parse_lora(names: Iterable[str]) -> LoraLayout:
    """Group a LoRA file's tensor names into modules and map each to its SDXL target."""
    layout = LoraLayout()
    grouped: Dict[str, Dict[str, str]] = {}
    for tensor in names:
        if tensor.startswith(BUNDLED_EMBEDDING_PREFIX):
            layout.ignored.append(tensor)
            continue
        split = split_name(tensor)
        if split is None:
            layout.problems.append((tensor, "is not a LoRA/LyCORIS component this plugin reads"))
            continue
        module, component = split
        components = grouped.setdefault(module, {})
        if component in components:
            layout.problems.append((tensor, f"gives {component} of module {module} a second time (also {components[component]})"))
            continue
        components[component] = tensor
    for module, components in grouped.items():
        kind = _kind(module, components, layout.problems)
        if kind is None:
            continue
        target = target_of(module)
        if target is None:
            layout.unmapped.append(module)
            layout.foreign[module] = LoraModule(name=module, kind=kind, components=dict(components), target=NO_TARGET)
            continue
        layout.modules[module] = LoraModule(name=module, kind=kind, components=dict(components), target=target)
    return layout


# --------------------------------------------------------------------------- shapes from the header


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def delta_shape(module: LoraModule, shapes: Mapping[str, Sequence[int]]) -> Tuple[int, int]:
    """``(rows, cols)`` of the module's weight change (its weight viewed as [out, in * kernel]),
    from the stored shapes of its components (tensor name -> shape). Raises ``ValueError`` naming
    the module when the factor shapes do not fit together."""
    c = {name: tuple(int(d) for d in shapes[tensor]) for name, tensor in module.components.items()}

    def fail(why: str) -> ValueError:
        return ValueError(f"module {module.name}: {why} ({', '.join(f'{k} {list(v)}' for k, v in sorted(c.items()))})")

    if module.kind == "lora":
        up, down = c["up"], c["down"]
        if len(up) < 2 or len(down) < 2 or up[1] != down[0]:
            raise fail("lora_up and lora_down do not multiply")
        if "mid" in c:
            mid = c["mid"]
            if len(mid) < 3 or mid[0] != up[1] or mid[1] != down[0]:
                raise fail("lora_mid does not fit lora_up and lora_down")
            return up[0], down[1] * _prod(mid[2:])
        return up[0], _prod(down[1:])
    if module.kind == "loha":
        w1a, w1b, w2a, w2b = c["hada_w1_a"], c["hada_w1_b"], c["hada_w2_a"], c["hada_w2_b"]
        if "hada_t1" in c:
            t1, t2 = c["hada_t1"], c["hada_t2"]
            if t1 != t2 or w1a[0] != t1[0] or w1b[0] != t1[1] or w1a != w2a or w1b != w2b:
                raise fail("Tucker LoHa factors do not fit together")
            return w1a[1], w1b[1] * _prod(t1[2:])
        if w1a[1] != w1b[0] or w2a[1] != w2b[0] or w1a[0] != w2a[0] or _prod(w1b[1:]) != _prod(w2b[1:]):
            raise fail("LoHa factors do not multiply")
        return w1a[0], _prod(w1b[1:])
    if module.kind == "lokr":
        w1 = _lokr_product(c, "1", fail)
        w2 = _lokr_product(c, "2", fail)
        return w1[0] * w2[0], w1[1] * w2[1]
    if module.kind == "full":
        if "diff" not in c:
            return 0, 0
        diff = c["diff"]
        return (diff[0] if diff else 1), _prod(diff[1:])
    if module.kind == "norm":
        w = c.get("w_norm")
        return (w[0] if w else 0), 1
    raise fail(f"unknown kind {module.kind}")


def _lokr_product(c: Mapping[str, Tuple[int, ...]], n: str, fail) -> Tuple[int, int]:  # type: ignore[no-untyped-def]
    """(rows, cols) of LoKr's w1 or w2 (cols: everything after the first dim, kernel included)."""
    full = c.get(f"lokr_w{n}")
    if full is not None:
        return full[0], _prod(full[1:])
    a, b = c[f"lokr_w{n}_a"], c[f"lokr_w{n}_b"]
    if n == "2" and "lokr_t2" in c:
        t2 = c["lokr_t2"]
        if len(t2) < 2 or t2[0] != a[0] or t2[1] != b[0]:
            raise fail("lokr_t2 does not fit lokr_w2_a and lokr_w2_b")
        return a[1], b[1] * _prod(t2[2:])
    if a[1] != b[0]:
        raise fail(f"lokr_w{n}_a and lokr_w{n}_b do not multiply")
    return a[0], _prod(b[1:])


def rank_of(module: LoraModule, shapes: Mapping[str, Sequence[int]]) -> Optional[int]:
    """The rank its ``alpha`` is divided by (kohya / LyCORIS / A1111), None when the module's
    scale is 1 whatever its alpha (LoKr with both factors full, full and norm modules)."""
    c = {name: tuple(int(d) for d in shapes[tensor]) for name, tensor in module.components.items()}
    if module.kind == "lora":
        return c["down"][0]
    if module.kind == "loha":
        return c["hada_w1_b"][0]
    if module.kind == "lokr":
        # A1111's network_lokr: the rank of the factorised w2, else of the factorised w1.
        if "lokr_w2_b" in c:
            return c["lokr_w2_b"][0]
        if "lokr_w1_b" in c:
            return c["lokr_w1_b"][0]
        return None
    return None
