"""Method versions (mergekit_sdxl/method_versions.py): the pin a config carries in
``sdxl.method_version``, what the written configs pin, and which methods a config uses."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from mergekit_sdxl.io.provenance import InputInfo
from mergekit_sdxl.method_versions import (
    GRAM_VERSION_1_MAX_INPUTS,
    METHOD_VERSIONS,
    check_method_versions,
    check_pinned_input_count,
    config_methods,
    format_method_versions,
    installed_mergekit_version,
    method_versions,
)
from mergekit_sdxl.workflow.options import SDXLOptions
from mergekit_sdxl.workflow.recipe import Method, render_recipe_yaml


def _info(name: str, role: str) -> InputInfo:
    return InputInfo(path=f"/m/{name}", size=1, sha256="0" * 64, autov2="0" * 10, role=role, legacy_hash="0" * 8)


def test_the_plugins_methods_and_the_budgeted_builtins_have_integer_versions():
    for name in ("tgmd", "ties_soup", "dgmla", "geometric_median"):
        assert METHOD_VERSIONS[name] == 2
    for name in ("della", "della_linear", "dare_ties", "ties"):
        assert METHOD_VERSIONS[name] == 1
    # A method of mergekit itself is its code in the installed mergekit.
    assert method_versions(["slerp", "tgmd", "slerp"], "0.1.5") == {"slerp": "mergekit 0.1.5", "tgmd": 2}


@pytest.mark.parametrize(
    "pins, message",
    [
        ({"tgmd": 3}, "tgmd: version 3 is not implemented by this mergekit-sdxl (it runs versions 1 and 2); "
                      "the config was written for a newer one"),
        ({"linear": 2}, "linear: version 2 is not implemented by this mergekit-sdxl (it runs version 1)"),
        ({"tgmd": 0}, "written for an older one"),
        ({"tgmd": "mergekit 0.1.5"}, "tgmd: this plugin versions it itself: write tgmd: 2"),
        ({"slerp": 1}, "slerp: not a method this plugin versions"),
        ({"slerp": "mergekit 0.0.1"}, "slerp: pinned to 'mergekit 0.0.1', but mergekit"),
        ({"tgmd": True}, "tgmd: a method version is an integer"),
    ],
)
def test_a_pin_this_installation_does_not_implement_is_refused(pins, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_method_versions(pins)
    with pytest.raises(ValidationError, match="method_version"):
        SDXLOptions.model_validate({"method_version": pins})


def test_version_1_of_the_gram_methods_is_run_up_to_128_inputs():
    for method in ("tgmd", "ties_soup", "dgmla", "geometric_median"):
        check_method_versions({method: 1})
        check_pinned_input_count({method: 1}, GRAM_VERSION_1_MAX_INPUTS)
        check_pinned_input_count({method: 2}, 1000)
        with pytest.raises(ValueError, match=f"{method}: version 1 is reproduced only up to 128 inputs and this config has 129"):
            check_pinned_input_count({method: 1}, 129)


def test_the_current_versions_are_accepted():
    pins = method_versions(["tgmd", "dgmla", "slerp"])
    assert pins["slerp"] == f"mergekit {installed_mergekit_version()}"
    assert SDXLOptions.model_validate({"method_version": pins}).method_version == pins


@pytest.mark.parametrize("method", [m.value for m in Method])
def test_a_written_recipe_pins_its_method_and_the_pin_loads(method):
    text = render_recipe_yaml(_info("base.safetensors", "base"), [_info("a.safetensors", "model")], [], method=method, parameters={})
    doc = yaml.safe_load(text)
    assert doc["sdxl"]["method_version"] == {method: METHOD_VERSIONS[method]}
    assert f"  method_version: {format_method_versions({method: METHOD_VERSIONS[method]})}\n" in text
    SDXLOptions.model_validate(doc["sdxl"])


@pytest.mark.parametrize(
    "components",
    [
        {},
        {"clip_l": {"source": "base"}, "clip_g": {"merge_method": "linear"}, "unet": {"parameters": {"seed": 1}}},
        {"unet": {"merge_method": "dgmla"}, "clip_l": {"merge_method": "linear"}, "clip_g": {"merge_method": "dgmla"}},
        {"clip_l": {"source": "/m/a.safetensors"}, "clip_g": {"source": "base"}},
    ],
)
def test_config_methods_agree_with_the_options_section(components):
    """The parsed-YAML reading (metadata) and the pydantic one (the merge) name the same methods."""
    doc = {"merge_method": "tgmd", "sdxl": {"components": components}}
    assert config_methods(doc) == SDXLOptions.model_validate(doc["sdxl"]).methods_used("tgmd")
    assert config_methods({"merge_method": "ties"}) == ("ties",)
    assert config_methods({}) == ()
