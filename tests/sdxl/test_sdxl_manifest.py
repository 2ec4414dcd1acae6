import json
import re
from collections import Counter
from importlib import resources

import pytest

from mergekit_sdxl.sdxl import manifest as M
from mergekit_sdxl.sdxl.manifest import (
    BLOCK_IDS,
    COMPONENT_PREFIXES,
    NUM_LAYERS,
    OPTIONAL_KEYS,
    SDXL_KEYS,
    KeySpec,
    block_of,
    component_of,
    keys_of,
    layer_of,
)


def _blocks_json():
    return json.loads(resources.files("mergekit_sdxl.sdxl.data").joinpath("sdxl_blocks.json").read_text())


def test_key_count_and_specs():
    assert len(SDXL_KEYS) == 2515
    spec = SDXL_KEYS["model.diffusion_model.label_emb.0.0.weight"]
    assert isinstance(spec, KeySpec)
    assert spec.shape == (1280, 2816) and spec.dtype == "F16"
    assert SDXL_KEYS["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] == ((1, 77), "I64")
    assert SDXL_KEYS["conditioner.embedders.1.model.logit_scale"].shape == ()
    assert sum(1 for _ in SDXL_KEYS) == 2515
    assert "nope" not in SDXL_KEYS


def test_total_elements():
    total = 0
    for spec in SDXL_KEYS.values():
        n = 1
        for d in spec.shape:
            n *= d
        total += n
    assert total == 3_468_837_945


def test_component_counts():
    counts = Counter(component_of(k) for k in SDXL_KEYS)
    assert counts == {"unet": 1680, "clip_l": 197, "clip_g": 390, "vae": 248}
    assert len(keys_of("clip_g")) == 390
    assert component_of("v_pred") is None
    assert component_of("model_ema.decay") is None
    assert set(COMPONENT_PREFIXES) == set(NUM_LAYERS)


def test_block_ids_match_sd_mecha_for_every_key():
    blocks = _blocks_json()
    assert set(blocks) == set(SDXL_KEYS)
    mismatches = {k: (block_of(k), v["sd_mecha"]) for k, v in blocks.items() if block_of(k) != v["sd_mecha"]}
    assert not mismatches
    assert {block_of(k) for k in SDXL_KEYS} <= set(BLOCK_IDS)


@pytest.mark.parametrize(
    "key, block",
    [
        ("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", "IN01"),
        ("model.diffusion_model.input_blocks.10.0.in_layers.0.weight", "BASE"),  # anchored: no IN01
        ("model.diffusion_model.output_blocks.8.0.skip_connection.weight", "OUT08"),
        ("model.diffusion_model.out.2.weight", "OUT08"),
        ("model.diffusion_model.middle_block.1.proj_in.weight", "M00"),
        ("model.diffusion_model.time_embed.0.weight", "BASE"),
        ("model.diffusion_model.label_emb.0.0.weight", "BASE"),
        ("first_stage_model.decoder.conv_in.weight", "VAE"),
        ("conditioner.embedders.1.model.token_embedding.weight", "BASE"),
        ("v_pred", "BASE"),
    ],
)
def test_block_of_examples(key, block):
    assert block_of(key) == block


def test_layer_of():
    by_comp = {}
    for k in SDXL_KEYS:
        lay = layer_of(k)
        if lay is not None:
            comp, idx = lay
            assert comp == component_of(k)
            by_comp.setdefault(comp, set()).add(idx)
    assert by_comp["unet"] == set(range(19))
    assert by_comp["clip_l"] == set(range(12))
    assert by_comp["clip_g"] == set(range(32))
    assert "vae" not in by_comp
    for comp, n in NUM_LAYERS.items():
        assert len(by_comp.get(comp, ())) == n

    P = "model.diffusion_model."
    assert layer_of(P + "input_blocks.0.0.weight") == ("unet", 0)
    assert layer_of(P + "input_blocks.8.1.proj_out.bias") == ("unet", 8)
    assert layer_of(P + "middle_block.0.emb_layers.1.weight") == ("unet", 9)
    assert layer_of(P + "output_blocks.0.0.in_layers.2.weight") == ("unet", 10)
    assert layer_of(P + "output_blocks.8.0.out_layers.3.bias") == ("unet", 18)
    assert layer_of(P + "out.0.weight") == ("unet", 18)
    assert layer_of(P + "time_embed.0.weight") is None
    assert layer_of(P + "label_emb.0.2.bias") is None
    L = "conditioner.embedders.0.transformer.text_model."
    assert layer_of(L + "encoder.layers.11.mlp.fc1.weight") == ("clip_l", 11)
    assert layer_of(L + "encoder.layers.1.mlp.fc1.weight") == ("clip_l", 1)
    assert layer_of(L + "final_layer_norm.weight") is None
    assert layer_of(L + "embeddings.token_embedding.weight") is None
    G = "conditioner.embedders.1.model."
    assert layer_of(G + "transformer.resblocks.31.attn.in_proj_weight") == ("clip_g", 31)
    assert layer_of(G + "transformer.resblocks.3.ln_1.bias") == ("clip_g", 3)
    assert layer_of(G + "text_projection") is None
    assert layer_of(G + "ln_final.weight") is None
    assert layer_of("first_stage_model.decoder.mid.attn_1.q.weight") is None


def test_layer_index_consistent_with_block():
    for k in SDXL_KEYS:
        lay = layer_of(k)
        b = block_of(k)
        if lay and lay[0] == "unet":
            i = lay[1]
            expected = f"IN{i:02d}" if i < 9 else ("M00" if i == 9 else f"OUT{i - 10:02d}")
            assert b == expected, k


def test_optional_keys():
    assert OPTIONAL_KEYS <= set(SDXL_KEYS)
    assert len(OPTIONAL_KEYS) == 1 + 1 + 2 + 16
    L = "conditioner.embedders.0.transformer.text_model."
    assert L + "embeddings.position_ids" in OPTIONAL_KEYS
    assert L + "encoder.layers.11.self_attn.out_proj.weight" in OPTIONAL_KEYS
    assert L + "encoder.layers.10.self_attn.out_proj.weight" not in OPTIONAL_KEYS
    assert L + "final_layer_norm.bias" in OPTIONAL_KEYS
    assert "conditioner.embedders.1.model.logit_scale" in OPTIONAL_KEYS
    assert sum(1 for k in SDXL_KEYS if re.match(re.escape(L) + r"encoder\.layers\.11\.", k)) == 16


def test_variant_keys_loaded():
    v = M.load_variant_keys()
    assert "v_pred" in v and "ztsnr" in v


def test_out_of_range_indices():
    P = "model.diffusion_model."
    assert layer_of(P + "input_blocks.11.0.weight") is None
    assert layer_of(P + "output_blocks.9.0.weight") is None
    assert layer_of("conditioner.embedders.0.transformer.text_model.encoder.layers.12.mlp.fc1.weight") is None
    assert layer_of("conditioner.embedders.1.model.transformer.resblocks.32.ln_1.weight") is None
