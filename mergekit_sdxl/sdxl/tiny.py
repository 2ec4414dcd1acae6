"""Small SDXL checkpoints for tests and benchmarks.

* :func:`write_synthetic_sdxl` / :func:`synthetic_shapes`: the exact 2515 manifest keys with every
  width dimension scaled (not loadable by diffusers; for merge-engine tests and benchmarks).
* :func:`write_tiny_sdxl` / :func:`write_tiny_config_dir`: a diffusers-loadable tiny SDXL with the
  same 2515 key names, built from tiny diffusers/transformers models (those packages are test
  extras and are imported lazily, only here).
"""

from __future__ import annotations

import os
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch

from .keys import position_ids
from .manifest import LOGIT_SCALE_KEY, POSITION_IDS_KEY, POSITION_IDS_SHAPE, SDXL_KEYS

__all__ = [
    "synthetic_shapes",
    "write_synthetic_sdxl",
    "tiny_state_dict",
    "tiny_shapes",
    "sgm_name",
    "write_tiny_sdxl",
    "write_tiny_config_dir",
    "TINY_UNET_CONFIG",
    "TINY_VAE_CONFIG",
    "TINY_CLIP_L_CONFIG",
    "TINY_CLIP_G_CONFIG",
]

PathLike = Union[str, "os.PathLike[str]"]

_LOGIT_SCALE = 4.6052  # ln(100), what OpenCLIP ships

# Dimensions that never scale: vocab rows, token positions.
_FIXED_DIMS = frozenset({49408, 77})


def _scale_dim(d: int, width: float) -> int:
    if d <= 16 or d in _FIXED_DIMS or width == 1.0:
        return d
    return max(8, int(d * width / 8 + 0.5) * 8)


def synthetic_shapes(width: float = 1 / 16) -> Dict[str, Tuple[int, ...]]:
    """Manifest keys -> shapes scaled by ``width``.

    Rule: every dim > 16 is a channel/width dim and becomes ``max(8, round(d * width / 8) * 8)``,
    except vocab rows (49408) and token positions (77); kernel sizes (1, 3) and in/out channels
    (3, 4, 8) are <= 16 and stay. The stacked CLIP-G q/k/v (``in_proj_*``, 3 x 1280) stays exactly
    3 x scaled(1280). ``width=1`` gives the manifest shapes exactly.
    """
    if not (0 < width <= 1):
        raise ValueError(f"width must be in (0, 1], got {width}")
    out: Dict[str, Tuple[int, ...]] = {}
    for key, spec in SDXL_KEYS.items():
        if key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
            shape = (3 * _scale_dim(spec.shape[0] // 3, width),) + tuple(_scale_dim(d, width) for d in spec.shape[1:])
        else:
            shape = tuple(_scale_dim(d, width) for d in spec.shape)
        out[key] = shape
    return out


@contextmanager
def _one_thread():
    """Element-wise init of thousands of small tensors is faster on one intra-op thread (and much
    faster on a loaded machine, where OpenMP spin-waits dominate). Restores the previous setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _key_seed(seed: int, key: str) -> int:
    return (int(seed) * 0x9E3779B1 + zlib.crc32(key.encode("utf-8"))) & 0x7FFF_FFFF_FFFF_FFFF


def _randn(shape: Tuple[int, ...], seed: int, key: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(_key_seed(seed, key))
    return torch.randn(shape, generator=g, dtype=torch.float32)


def _init_value(key: str, shape: Tuple[int, ...], seed: int) -> torch.Tensor:
    """Plausible random init: weights ~ N(0, 1/fan_in), norm scales ~ 1, biases small."""
    r = _randn(shape, seed, key)
    if len(shape) >= 2:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        return r.mul_(fan_in ** -0.5)
    if len(shape) == 0:
        return r.mul_(0.01).add_(_LOGIT_SCALE)
    if key.endswith(".weight"):  # every 1-D ``.weight`` in SDXL is a norm scale
        return r.mul_(0.02).add_(1.0)
    return r.mul_(0.02)


def _load_base(base: PathLike) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.fspath(base))


def _finish(
    tensors: Dict[str, torch.Tensor],
    path: PathLike,
    extra_keys: Mapping[str, torch.Tensor],
    drop_keys: Iterable[str],
    metadata: Optional[Mapping[str, str]] = None,
) -> None:
    from safetensors.torch import save_file

    for k in drop_keys:
        tensors.pop(k, None)
    for k, v in extra_keys.items():
        tensors[k] = v.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, os.fspath(path), metadata=dict(metadata or {}))


def write_synthetic_sdxl(
    path: PathLike,
    width: float = 1 / 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    *,
    base: Optional[PathLike] = None,
    noise: float = 0.02,
    extra_keys: Optional[Mapping[str, torch.Tensor]] = None,
    drop_keys: Iterable[str] = (),
    metadata: Optional[Mapping[str, str]] = None,
) -> None:
    """Write a width-scaled SDXL single file with exactly the 2515 manifest keys.

    Values are seeded random per key (independent of the other keys, so ``drop_keys`` does not
    shift them). With ``base``: ``base + noise * randn`` (``base`` must have the same shapes), so
    several files are realistic fine-tunes of one base. ``position_ids`` is always int64
    ``arange(77)[None]``; ``logit_scale`` a scalar near ln(100). ``drop_keys`` are removed and
    ``extra_keys`` added last. Not loadable by diffusers (shapes are not a consistent model).
    """
    shapes = synthetic_shapes(width)
    base_sd = _load_base(base) if base is not None else None
    drop = set(drop_keys)
    with _one_thread():
        tensors = _synthetic_tensors(shapes, seed, dtype, base, base_sd, noise, drop)
    _finish(tensors, path, extra_keys or {}, drop, metadata)


def _synthetic_tensors(shapes, seed, dtype, base, base_sd, noise, drop) -> Dict[str, torch.Tensor]:
    tensors: Dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key in drop:
            continue
        if key == POSITION_IDS_KEY:  # never scaled (77 is a fixed dim): the canonical buffer
            tensors[key] = position_ids()
            continue
        if base_sd is not None and key in base_sd:
            b = base_sd[key]
            if tuple(b.shape) != shape:
                raise ValueError(f"base {base}: {key} has shape {list(b.shape)}, expected {list(shape)}")
            v = b.float().add_(_randn(shape, seed, key), alpha=noise)
        else:
            v = _init_value(key, shape, seed)
        tensors[key] = v.to(dtype)
    return tensors


# --------------------------------------------------------------------------------------------
# Tiny diffusers-loadable SDXL
# --------------------------------------------------------------------------------------------

# Depths are fixed by the key names; only widths shrink (see docs: "Tiny SDXL for tests").
TINY_UNET_CONFIG: Dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [32, 64, 96],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 96,  # CLIP-L width 32 + CLIP-G width 64
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [2, 4, 6],
    "use_linear_projection": True,
    "upcast_attention": False,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "addition_embed_type_num_heads": 64,
    "projection_class_embeddings_input_dim": 64 + 6 * 8,  # CLIP-G projection + 6 x time ids
}

TINY_VAE_CONFIG: Dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 64, 96, 96],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

TINY_VOCAB = 1000

TINY_CLIP_L_CONFIG: Dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 128,
    "projection_dim": 32,
    "num_hidden_layers": 12,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "pad_token_id": 1,
    "bos_token_id": TINY_VOCAB - 2,
    "eos_token_id": TINY_VOCAB - 1,
}

TINY_CLIP_G_CONFIG: Dict[str, Any] = {
    **TINY_CLIP_L_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 256,
    "projection_dim": 64,  # square text_projection
    "num_hidden_layers": 32,
    "num_attention_heads": 4,
    "hidden_act": "gelu",
}

_P_UNET = "model.diffusion_model."
_P_CLIP_L = "conditioner.embedders.0.transformer."
_P_CLIP_G = "conditioner.embedders.1.model."
_P_VAE = "first_stage_model."

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
_CLIP_G_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}

# op codes for diffusers -> sgm tensor transforms
OP_NONE, OP_T, OP_CONV1X1 = "", "T", "conv1x1"
OP_QKV = ("q", "k", "v")  # slice i of a stacked in_proj tensor


def _sub(rest: str, table: Mapping[str, str]) -> Optional[str]:
    for a, b in table.items():
        if rest.startswith(a):
            return b + rest[len(a) :]
    return None


def _sub_known(rest: str, table: Mapping[str, str], what: str, key: str) -> str:
    """:func:`_sub` for a key that must be in ``table``: raises ``KeyError`` naming ``key``."""
    name = _sub(rest, table)
    if name is None:
        raise KeyError(f"no sgm name for {what} key {key!r}")
    return name


def _unet_name(k: str, layers_per_block: int = 2, up_has_attn: Tuple[bool, ...] = (True, True, False)) -> str:
    top = _sub(k, _UNET_TOP)
    if top is not None:
        return top
    s = layers_per_block + 1
    parts = k.split(".")
    if parts[0] == "down_blocks":
        i = int(parts[1])
        kind = parts[2]
        if kind == "resnets":
            j = int(parts[3])
            return f"input_blocks.{s * i + j + 1}.0." + _unet_res(".".join(parts[4:]))
        if kind == "attentions":
            j = int(parts[3])
            return f"input_blocks.{s * i + j + 1}.1." + ".".join(parts[4:])
        if kind == "downsamplers":  # downsamplers.0.conv.X
            return f"input_blocks.{s * (i + 1)}.0.op." + ".".join(parts[5:])
    if parts[0] == "mid_block":
        j = int(parts[2])
        if parts[1] == "resnets":
            return f"middle_block.{2 * j}." + _unet_res(".".join(parts[3:]))
        if parts[1] == "attentions":
            return "middle_block.1." + ".".join(parts[3:])
    if parts[0] == "up_blocks":
        i = int(parts[1])
        kind = parts[2]
        if kind == "resnets":
            j = int(parts[3])
            return f"output_blocks.{s * i + j}.0." + _unet_res(".".join(parts[4:]))
        if kind == "attentions":
            j = int(parts[3])
            return f"output_blocks.{s * i + j}.1." + ".".join(parts[4:])
        if kind == "upsamplers":  # upsamplers.0.conv.X
            return f"output_blocks.{s * i + s - 1}.{2 if up_has_attn[i] else 1}.conv." + ".".join(parts[5:])
    raise KeyError(f"no sgm name for diffusers UNet key {k!r}")


def _unet_res(tail: str) -> str:
    out = _sub(tail, _UNET_RESNET)
    if out is None:
        raise KeyError(f"unknown UNet resnet parameter {tail!r}")
    return out


def _vae_name(k: str, num_levels: int = 4) -> Tuple[str, str]:
    coder, rest = k.split(".", 1) if k.startswith(("encoder.", "decoder.")) else ("", k)
    if not coder:  # quant_conv / post_quant_conv
        return k, OP_NONE
    parts = rest.split(".")
    resnet = {"conv_shortcut.": "nin_shortcut."}

    def res(tail: str) -> str:
        return _sub(tail, resnet) or tail

    if parts[0] == "conv_norm_out":
        return f"{coder}.norm_out." + ".".join(parts[1:]), OP_NONE
    if parts[0] in ("conv_in", "conv_out"):
        return f"{coder}.{rest}", OP_NONE
    if parts[0] == "mid_block":
        if parts[1] == "resnets":
            return f"{coder}.mid.block_{int(parts[2]) + 1}." + res(".".join(parts[3:])), OP_NONE
        if parts[1] == "attentions":
            tail = ".".join(parts[3:])
            name = f"{coder}.mid.attn_1." + _sub_known(tail, _VAE_ATTN, "diffusers VAE", k)
            return name, (OP_CONV1X1 if name.endswith(".weight") and not name.endswith("norm.weight") else OP_NONE)
    if parts[0] == "down_blocks":
        i = int(parts[1])
        if parts[2] == "resnets":
            return f"{coder}.down.{i}.block.{parts[3]}." + res(".".join(parts[4:])), OP_NONE
        if parts[2] == "downsamplers":
            return f"{coder}.down.{i}.downsample.conv." + ".".join(parts[5:]), OP_NONE
    if parts[0] == "up_blocks":
        i = num_levels - 1 - int(parts[1])
        if parts[2] == "resnets":
            return f"{coder}.up.{i}.block.{parts[3]}." + res(".".join(parts[4:])), OP_NONE
        if parts[2] == "upsamplers":
            return f"{coder}.up.{i}.upsample.conv." + ".".join(parts[5:]), OP_NONE
    raise KeyError(f"no sgm name for diffusers VAE key {k!r}")


def _clip_g_name(k: str) -> Tuple[str, str]:
    if k == "text_projection.weight":
        return "text_projection", OP_T
    if k.startswith("text_model."):
        k = k[len("text_model.") :]
    if k == "embeddings.token_embedding.weight":
        return "token_embedding.weight", OP_NONE
    if k == "embeddings.position_embedding.weight":
        return "positional_embedding", OP_NONE
    if k.startswith("final_layer_norm."):
        return "ln_final." + k[len("final_layer_norm.") :], OP_NONE
    if k.startswith("encoder.layers."):
        _, _, n, rest = k.split(".", 3)
        for qkv in OP_QKV:
            pre = f"self_attn.{qkv}_proj."
            if rest.startswith(pre):
                return f"transformer.resblocks.{n}.attn.in_proj_{rest[len(pre):]}", qkv
        return f"transformer.resblocks.{n}." + _sub_known(rest, _CLIP_G_LAYER, "CLIP-G", k), OP_NONE
    raise KeyError(f"no sgm name for CLIP-G key {k!r}")


def sgm_name(component: str, diffusers_key: str) -> Tuple[str, str]:
    """Full sgm key and transform op for one diffusers/transformers state-dict key of a component.

    Ops: ``""`` same tensor; ``"T"`` transposed (CLIP-G text_projection); ``"conv1x1"`` 2-D -> [C,C,1,1]
    (VAE attention); ``"q"|"k"|"v"`` the 1st/2nd/3rd third of a stacked ``in_proj_*`` tensor.
    """
    if component == "unet":
        return _P_UNET + _unet_name(diffusers_key), OP_NONE
    if component == "vae":
        name, op = _vae_name(diffusers_key)
        return _P_VAE + name, op
    if component == "clip_l":
        k = diffusers_key if diffusers_key.startswith("text_model.") else "text_model." + diffusers_key
        return _P_CLIP_L + k, OP_NONE
    if component == "clip_g":
        name, op = _clip_g_name(diffusers_key)
        return _P_CLIP_G + name, op
    raise ValueError(component)


_TINY_SPEC: Optional[Dict[str, Tuple[Tuple[int, ...], bool]]] = None


def _tiny_models(device: str = "meta"):
    """Instantiate the four tiny component models (on the meta device by default)."""
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
    except ImportError as e:
        raise ImportError(
            f"the tiny loadable SDXL is built with diffusers, which is not installed ({e}); install the "
            "test extra (pip install -e '.[test]') or use write_synthetic_sdxl, which needs neither"
        ) from e
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        clip_l = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_L_CONFIG))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_G_CONFIG))
    return {"unet": unet, "clip_l": clip_l, "clip_g": clip_g, "vae": vae}


def tiny_shapes() -> Dict[str, Tuple[Tuple[int, ...], bool]]:
    """sgm key -> (shape, is_norm_weight) of the tiny SDXL, in manifest order (computed once)."""
    global _TINY_SPEC
    if _TINY_SPEC is not None:
        return _TINY_SPEC
    models = _tiny_models("meta")
    spec: Dict[str, Tuple[Tuple[int, ...], bool]] = {}
    for comp, model in models.items():
        norm_params = set()
        for mname, mod in model.named_modules():
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                norm_params.add(f"{mname}.weight")
        for dkey, t in model.state_dict().items():
            if dkey.endswith("position_ids"):
                continue
            name, op = sgm_name(comp, dkey)
            shape = tuple(t.shape)
            if op == OP_T:
                shape = shape[::-1]
            elif op == OP_CONV1X1:
                shape = shape + (1, 1)
            elif op in OP_QKV:
                shape = (3 * shape[0],) + shape[1:]
            if name in spec and spec[name][0] != shape:
                raise AssertionError(f"inconsistent tiny shape for {name}")
            spec[name] = (shape, dkey in norm_params)
    spec[POSITION_IDS_KEY] = (POSITION_IDS_SHAPE, False)
    spec[LOGIT_SCALE_KEY] = ((), False)
    missing = set(SDXL_KEYS) - set(spec)
    extra = set(spec) - set(SDXL_KEYS)
    if missing or extra:
        raise AssertionError(
            f"tiny SDXL key set differs from the manifest: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
        )
    _TINY_SPEC = {k: spec[k] for k in SDXL_KEYS}
    return _TINY_SPEC


def tiny_state_dict(
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    *,
    base: Optional[Union[PathLike, Mapping[str, torch.Tensor]]] = None,
    noise: float = 0.02,
) -> Dict[str, torch.Tensor]:
    """The tiny SDXL as an sgm-named state dict (2515 keys).

    Values: per-key seeded init (weights ~ N(0, 1/fan_in), norm scales ~ 1, biases ~ N(0, 0.02)),
    or ``base + noise * randn`` when ``base`` (a file or state dict of the same tiny shapes) is given.
    """
    spec = tiny_shapes()
    base_sd = _load_base(base) if isinstance(base, (str, os.PathLike)) else base
    out: Dict[str, torch.Tensor] = {}
    for key, (shape, is_norm) in spec.items():
        if key == POSITION_IDS_KEY:
            out[key] = position_ids()
            continue
        if base_sd is not None and key in base_sd:
            b = base_sd[key]
            if tuple(b.shape) != shape:
                raise ValueError(f"base: {key} has shape {list(b.shape)}, expected {list(shape)}")
            v = b.float().add_(_randn(shape, seed, key), alpha=noise)
        else:
            r = _randn(shape, seed, key)
            if key == LOGIT_SCALE_KEY:
                v = r.mul_(0.01).add_(_LOGIT_SCALE)
            elif is_norm:
                v = r.mul_(0.02).add_(1.0)
            elif len(shape) >= 2:
                fan_in = 1
                for d in shape[1:]:
                    fan_in *= d
                v = r.mul_(fan_in**-0.5)
            else:
                v = r.mul_(0.02)
        out[key] = v.to(dtype)
    return out


def write_tiny_sdxl(
    path: PathLike,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    *,
    base: Optional[PathLike] = None,
    noise: float = 0.02,
    extra_keys: Optional[Mapping[str, torch.Tensor]] = None,
    drop_keys: Iterable[str] = (),
    metadata: Optional[Mapping[str, str]] = None,
) -> None:
    """Write a tiny diffusers-loadable SDXL single file with the exact 2515 manifest key names.

    Load it with ``StableDiffusionXLPipeline.from_single_file(path, config=write_tiny_config_dir(d),
    tokenizer=None, tokenizer_2=None, local_files_only=True)``.
    """
    with _one_thread():
        tensors = tiny_state_dict(seed, dtype, base=base, noise=noise)
    _finish(tensors, path, extra_keys or {}, drop_keys, metadata)


def write_tiny_config_dir(folder: PathLike) -> Path:
    """Write ``model_index.json`` + component configs of the tiny SDXL pipeline into ``folder``."""
    import json

    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    # From its own module: under TYPE_CHECKING, ``diffusers/__init__`` also offers the torch-less
    # dummy class of that name, which has no ``save_config``.
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
    from transformers import CLIPTextConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    _save_diffusers_config(UNet2DConditionModel, TINY_UNET_CONFIG, folder / "unet")
    _save_diffusers_config(AutoencoderKL, TINY_VAE_CONFIG, folder / "vae")
    for sub, cfg, arch in (
        ("text_encoder", TINY_CLIP_L_CONFIG, "CLIPTextModel"),
        ("text_encoder_2", TINY_CLIP_G_CONFIG, "CLIPTextModelWithProjection"),
    ):
        c = CLIPTextConfig(**cfg)
        c.architectures = [arch]
        c.save_pretrained(folder / sub)
    sched = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    sched.save_config(folder / "scheduler")
    return folder


def _save_diffusers_config(cls, config: Mapping[str, object], folder: Path) -> None:
    """Write ``config.json`` for a diffusers model class without instantiating weights."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    doc = {"_class_name": cls.__name__, **config}
    (folder / "config.json").write_text(json.dumps(doc, indent=2))
