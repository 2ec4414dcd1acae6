"""The alpha of diffusers / PEFT LoRA files from diffusers' ``lora_adapter_metadata``."""

import json

import pytest

from mergekit_sdxl.sdxl.lora_peft import PEFT_METADATA_KEY, PeftAlpha, PeftMetadataError, peft_alpha, peft_configs


def _metadata(flat: dict) -> dict:
    return {PEFT_METADATA_KEY: json.dumps(flat), "format": "pt"}


def test_components_patterns_and_rslora():
    configs = peft_configs(
        _metadata(
            {
                "unet.r": 4,
                "unet.lora_alpha": 8,
                "unet.alpha_pattern": {"attentions.0.proj_in": 2},
                "text_encoder.lora_alpha": 1.5,
                "text_encoder_2.lora_alpha": 3,
                "text_encoder_2.use_rslora": True,
                "text_encoder_2.alpha_pattern": {"encoder.layers.1.self_attn.q_proj": 6},
            }
        )
    )
    assert set(configs) == {"unet", "text_encoder", "text_encoder_2"}
    assert peft_alpha(configs, "unet.down_blocks.1.attentions.0.proj_in") == PeftAlpha(2.0)
    assert peft_alpha(configs, "unet.down_blocks.1.attentions.1.proj_in") == PeftAlpha(8.0)  # the pattern ends at a dot
    assert peft_alpha(configs, "text_encoder.text_model.encoder.layers.0.mlp.fc1") == PeftAlpha(1.5)
    assert peft_alpha(configs, "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj") == PeftAlpha(6.0, rslora=True)
    assert peft_alpha(configs, "text_encoder_2.encoder.layers.1.self_attn.q_proj") == PeftAlpha(6.0, rslora=True)
    assert peft_alpha(configs, "text_encoder_2.encoder.layers.11.self_attn.q_proj") == PeftAlpha(3.0, rslora=True)


def test_an_adapter_saved_from_one_model_is_unprefixed():
    configs = peft_configs(_metadata({"r": 8, "lora_alpha": 16}))
    assert peft_alpha(configs, "down_blocks.0.resnets.0.conv1") == PeftAlpha(16.0)
    assert peft_alpha(configs, "unet.down_blocks.0.resnets.0.conv1") == PeftAlpha(16.0)


def test_no_metadata_or_no_alpha_gives_none():
    assert peft_configs({"ss_network_dim": "4"}) == {}
    assert peft_alpha({}, "unet.down_blocks.0.resnets.0.conv1") is None
    assert peft_alpha(peft_configs(_metadata({"unet.r": 4})), "unet.conv_in") is None
    assert peft_alpha(peft_configs(_metadata({"unet.lora_alpha": 4})), "text_encoder.text_model.encoder.layers.0.mlp.fc1") is None


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", json.dumps({"unet.lora_alpha": "eight"})])
def test_unreadable_metadata_is_an_error(raw):
    with pytest.raises(PeftMetadataError, match=PEFT_METADATA_KEY):
        configs = peft_configs({PEFT_METADATA_KEY: raw})
        peft_alpha(configs, "unet.conv_in")
