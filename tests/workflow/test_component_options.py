"""The ``sdxl.components`` section as pydantic reads it (no mergekit): a copy or a merge, not both,
only the UNet and the text encoders, and the methods a config with it uses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mergekit_sdxl.workflow.options import COMPONENT_OVERRIDES, ComponentOptions, SDXLOptions


def test_a_component_is_copied_or_merged():
    assert ComponentOptions(source="base").source == "base"
    merged = ComponentOptions.model_validate({"merge_method": "linear", "models": [{"model": "a.safetensors", "parameters": {"weight": 1}}]})
    assert merged.models is not None and merged.models[0].parameters == {"weight": 1}
    with pytest.raises(ValidationError, match="cannot be combined with merge_method:"):
        ComponentOptions(source="base", merge_method="linear")
    with pytest.raises(ValidationError, match="give source:"):
        ComponentOptions()
    with pytest.raises(ValidationError, match="source: must be 'base' or the path"):
        ComponentOptions(source=" ")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ComponentOptions.model_validate({"source": "base", "weight": 1})


def test_only_the_unet_and_the_text_encoders():
    assert COMPONENT_OVERRIDES == ("unet", "clip_l", "clip_g")
    assert SDXLOptions().components == {}
    with pytest.raises(ValidationError):
        SDXLOptions.model_validate({"components": {"vae": {"source": "base"}}})


def test_methods_used():
    options = SDXLOptions.model_validate(
        {"components": {"clip_l": {"source": "base"}, "clip_g": {"merge_method": "linear"}, "unet": {"parameters": {"seed": 1}}}}
    )
    assert options.methods_used("tgmd") == ("tgmd", "linear")
    assert SDXLOptions().methods_used("ties") == ("ties",)
