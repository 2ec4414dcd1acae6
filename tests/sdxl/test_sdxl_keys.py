import pytest
import torch

from mergekit_sdxl.sdxl.keys import (
    EXTRA_KINDS,
    FLAG_KEYS,
    POSITION_IDS_KEY,
    TEXT_PROJECTION_ALT_KEY,
    TEXT_PROJECTION_KEY,
    VAE_ATTENTION_WEIGHTS,
    canonical_name,
    canonical_shape,
    canonicalize_tensor,
    classify_extra_key,
    position_ids,
)
from mergekit_sdxl.sdxl.manifest import SDXL_KEYS


def test_canonical_name():
    for k in SDXL_KEYS:
        assert canonical_name(k) == k
    assert canonical_name(TEXT_PROJECTION_ALT_KEY) == TEXT_PROJECTION_KEY
    for k in (
        "v_pred",
        "ztsnr",
        "model_ema.decay",
        "lora_unet_down_blocks_0.lora_down.weight",
        "alphas_cumprod",
        "conditioner.embedders.1.model.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.attn_mask",
        "model.diffusion_model.scaled_fp8",
    ):
        assert canonical_name(k) is None, k


def test_text_projection_weight_is_transposed():
    w = torch.arange(12.0).reshape(3, 4)
    out = canonicalize_tensor(TEXT_PROJECTION_KEY, TEXT_PROJECTION_ALT_KEY, w)
    assert out.shape == (4, 3) and torch.equal(out, w.T) and out.is_contiguous()
    # the canonical name itself is left alone (same object)
    assert canonicalize_tensor(TEXT_PROJECTION_KEY, TEXT_PROJECTION_KEY, w) is w
    assert canonical_shape(TEXT_PROJECTION_KEY, TEXT_PROJECTION_ALT_KEY, (3, 4)) == (4, 3)
    with pytest.raises(ValueError):
        canonicalize_tensor(TEXT_PROJECTION_KEY, TEXT_PROJECTION_ALT_KEY, torch.zeros(3))


def test_vae_attention_reshape():
    assert len(VAE_ATTENTION_WEIGHTS) == 8 and VAE_ATTENTION_WEIGHTS <= set(SDXL_KEYS)
    for k in VAE_ATTENTION_WEIGHTS:
        assert len(SDXL_KEYS[k].shape) == 4
    k = "first_stage_model.decoder.mid.attn_1.proj_out.weight"
    w = torch.randn(8, 8)
    out = canonicalize_tensor(k, k, w)
    assert out.shape == (8, 8, 1, 1) and torch.equal(out[:, :, 0, 0], w)
    w4 = torch.randn(8, 8, 1, 1)
    assert canonicalize_tensor(k, k, w4) is w4
    assert canonical_shape(k, k, (512, 512)) == (512, 512, 1, 1)
    # biases and other 2-D tensors are untouched
    b = torch.randn(8)
    assert canonicalize_tensor("first_stage_model.decoder.mid.attn_1.q.bias", "x", b) is b
    lin = torch.randn(4, 4)
    assert canonicalize_tensor("model.diffusion_model.time_embed.0.weight", "x", lin) is lin


def test_position_ids():
    p = position_ids()
    assert p.dtype == torch.int64 and p.shape == (1, 77) and torch.equal(p[0], torch.arange(77))
    corrupted = torch.arange(77, dtype=torch.float16)[None] + 0.3
    fixed = canonicalize_tensor(POSITION_IDS_KEY, POSITION_IDS_KEY, corrupted)
    assert torch.equal(fixed, p)
    assert canonical_shape(POSITION_IDS_KEY, POSITION_IDS_KEY, (77,)) == (1, 77)


@pytest.mark.parametrize(
    "key, kind",
    [
        ("v_pred", "flag:v_pred"),
        ("ztsnr", "flag:ztsnr"),
        ("model_ema.decay", "ema"),
        ("model_ema.num_updates", "ema"),
        ("model_ema.diffusion_modelinput_blocks00weight", "ema"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora"),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha", "lora"),
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", "lora"),
        ("model.diffusion_model.input_blocks.1.0.lora_A.weight", "lora"),
        ("alphas_cumprod", "schedule"),
        ("sqrt_recipm1_alphas_cumprod", "schedule"),
        ("betas", "schedule"),
        ("denoiser.sigmas", "schedule"),
        ("edm_mean", "schedule"),
        ("edm_std", "schedule"),
        ("edm_vpred.sigma_max", "schedule"),
        ("conditioner.embedders.1.model.transformer.text_model.embeddings.position_ids", "other"),
        ("conditioner.embedders.1.model.attn_mask", "other"),
        ("conditioner.embedders.0.transformer.text_projection.weight", "other"),
        ("model.diffusion_model.scaled_fp8", "other"),
        ("something.else", "other"),
    ],
)
def test_classify_extra_key(key, kind):
    assert classify_extra_key(key) == kind
    assert kind in EXTRA_KINDS


def test_classify_rejects_model_keys():
    assert FLAG_KEYS == ("v_pred", "ztsnr")
    with pytest.raises(ValueError):
        classify_extra_key("model.diffusion_model.out.2.weight")
    with pytest.raises(ValueError):
        classify_extra_key(TEXT_PROJECTION_ALT_KEY)


def test_canonical_keys_prefer_the_manifest_spelling():
    from mergekit_sdxl.sdxl.header import TensorInfo
    from mergekit_sdxl.sdxl.keys import canonical_keys, canonical_shapes

    other = next(iter(SDXL_KEYS))
    for order in ((TEXT_PROJECTION_ALT_KEY, TEXT_PROJECTION_KEY), (TEXT_PROJECTION_KEY, TEXT_PROJECTION_ALT_KEY)):
        stored = (other, "v_pred", *order)
        assert canonical_keys(stored) == {other: other, TEXT_PROJECTION_KEY: TEXT_PROJECTION_KEY}
    assert canonical_keys([TEXT_PROJECTION_ALT_KEY, "model_ema.decay"]) == {TEXT_PROJECTION_KEY: TEXT_PROJECTION_ALT_KEY}
    tensors = {
        TEXT_PROJECTION_ALT_KEY: TensorInfo("F16", (3, 4), (0, 24)),
        POSITION_IDS_KEY: TensorInfo("F32", (77,), (24, 332)),
        "v_pred": TensorInfo("U8", (0,), (332, 332)),
    }
    assert canonical_shapes(tensors) == {TEXT_PROJECTION_KEY: (4, 3), POSITION_IDS_KEY: (1, 77)}


def test_position_ids_key_has_one_source():
    from mergekit_sdxl.sdxl import keys, manifest, tiny

    assert keys.POSITION_IDS_KEY is manifest.POSITION_IDS_KEY is tiny.POSITION_IDS_KEY
    assert SDXL_KEYS[POSITION_IDS_KEY] == (manifest.POSITION_IDS_SHAPE, manifest.POSITION_IDS_DTYPE)
    assert POSITION_IDS_KEY in manifest.OPTIONAL_KEYS
