"""Block weights and per-component merges through mergekit: the expanded MBW filters as mergekit
itself resolves them, the config check of both (one line naming the entry), and the SDXL planner's
tasks for a config whose components use different methods."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_sdxl.host.validate import ConfigError, validate_config
from mergekit_sdxl.sdxl.manifest import SDXL_KEYS, component_of
from mergekit_sdxl.workflow.block_weights import MBW_BLOCKS, block_for_key
from mergekit_sdxl.workflow.mbw_presets import PRESETS

SRC = "c.yaml"
P = "model.diffusion_model."
CLIP_L_KEY = "conditioner.embedders.0.transformer.text_model.encoder.layers.3.mlp.fc1.weight"
CLIP_G_KEY = "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc.weight"
UNET_KEY = P + "input_blocks.4.1.proj_in.weight"


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as error:
        validate_config(text, source=SRC, check_files=False)
    message = str(error.value)
    assert "\n" not in message
    return message


TGMD = """merge_method: tgmd
base_model: {model: {path: /m/base.safetensors}}
models:
  - model: {model: {path: /m/a.safetensors}}
  - model: {model: {path: /m/b.safetensors}}
parameters: {drop_rate: 0.1, seed: 1}
"""


# ------------------------------------------------------------------ MBW through mergekit


def test_mergekit_resolves_the_expanded_setting_to_each_keys_block_value():
    from mergekit.config import evaluate_setting

    values = [0.01 * (i + 1) for i in range(20)]
    text = TGMD.replace("  - model: {model: {path: /m/b.safetensors}}", "  - model: {model: {path: /m/b.safetensors}}\n"
                        f"    parameters: {{weight: {{mbw: \"{','.join(map(str, values))}\"}}}}")
    config = validate_config(text, source=SRC, check_files=False).config
    setting = config.models[1].parameters["weight"]
    for key in SDXL_KEYS:
        assert evaluate_setting(key, setting, 0.5, validate=float) == values[MBW_BLOCKS.index(block_for_key(key))], key


def test_mbw_errors_name_the_model_the_parameter_and_the_line():
    text = TGMD.replace("  - model: {model: {path: /m/b.safetensors}}", "  - model: {model: {path: /m/b.safetensors}}\n"
                        "    parameters:\n      weight: {mbw: \"1,1,0.5\"}")
    assert _error(text) == (
        "config c.yaml: models[1] (b.safetensors): parameter 'weight': mbw: 3 values; SDXL block weights take 20 "
        "(BASE, IN00-IN08, M00, OUT00-OUT08) (line 7, column 15)"
    )
    assert _error(text.replace('"1,1,0.5"', "WRAP_08")).startswith(
        "config c.yaml: models[1] (b.safetensors): parameter 'weight': mbw: unknown block-weight preset 'WRAP_08' (did you mean 'WRAP08'"
    )
    # The expanded values are checked like any other: density above 1 is refused by tgmd's declared range.
    assert "parameter 'density' = 2.0 (filter 'conditioner.embedders.0.transformer.')" in _error(
        text.replace('weight: {mbw: "1,1,0.5"}', "density: {mbw: \"" + ",".join(["2"] * 20) + "\"}")
    )
    validate_config(text.replace('"1,1,0.5"', "GRAD_V"), source=SRC, check_files=False)


def test_load_config_expands_block_weights_for_mergekit():
    from mergekit_sdxl.host.driver import load_config

    text = TGMD.replace("parameters: {drop_rate: 0.1, seed: 1}", "parameters: {drop_rate: {mbw: FLAT_25}, seed: 1}")
    setting = load_config(text).config.parameters["drop_rate"]
    assert [c.value for c in setting] == [PRESETS["FLAT_25"][MBW_BLOCKS.index(block_for_key(c.filter))] for c in setting]
    assert {c.filter for c in setting} >= {P + "input_blocks.1.", P + "out.", "first_stage_model."}


# ------------------------------------------------------------------ the config check of sdxl.components


@pytest.mark.parametrize(
    "section, message",
    [
        ("{vae: {source: base}}", "sdxl.components: unknown component 'vae' (the VAE is chosen with sdxl.vae.source)"),
        ("{clip: {source: base}}", "sdxl.components: unknown component 'clip' (did you mean 'clip_l' or 'clip_g'?)"),
        ("{clip_l: {sourc: base}}", "sdxl.components.clip_l: unknown key 'sourc' (did you mean 'source'?)"),
        ("{clip_l: {}}", "sdxl.components.clip_l: give source: (copy it from base or one model) or merge_method:"),
        ("{clip_l: {source: base, merge_method: linear}}", "sdxl.components.clip_l: source: copies clip_l unmerged; remove merge_method: or source:"),
        ("{clip_l: {source: /m/c.safetensors}}", "sdxl.components.clip_l.source: /m/c.safetensors is not one of the models of this merge"),
        ("{clip_l: {merge_method: lineer}}", "sdxl.components.clip_l: unknown merge_method 'lineer' (did you mean 'linear'?)"),
        ("{clip_l: {merge_method: linear, parameters: {wieght: 1}}}", "sdxl.components.clip_l: unknown parameter 'wieght' for merge method linear (did you mean 'weight'?)"),
        ("{clip_l: {merge_method: linear}}", "merge method linear needs parameter 'weight' for every model: set it here or under sdxl.components.clip_l.parameters:"),
        ("{clip_l: {merge_method: linear, parameters: {weight: 1}, models: [{model: /m/z.safetensors}]}}",
         "sdxl.components.clip_l.models[0] (z.safetensors): not one of the config's models: list it under models: first"),
        ("{clip_l: {merge_method: linear, parameters: {weight: 1}, models: [{model: /m/base.safetensors}]}}",
         "not one of the config's models: list it under models: first (mergekit adds the base to the inputs itself)"),
        ("{clip_l: {merge_method: linear, parameters: {weight: 1}, models: [{model: /m/a.safetensors}, {model: /m/./a.safetensors}]}}",
         "sdxl.components.clip_l.models[1] (a.safetensors) is the same file as sdxl.components.clip_l.models[0] (a.safetensors)"),
        ("{clip_l: {merge_method: linear, models: [{model: /m/a.safetensors, parameters: {weight: 1, normalize: true}}]}}",
         "'normalize' is a global parameter of merge method linear; mergekit ignores it when set per model: move it to sdxl.components.clip_l.parameters:"),
        ("{clip_l: {merge_method: linear, models: [{model: /m/a.safetensors, paramters: {}}]}}",
         "sdxl.components.clip_l.models[0] (a.safetensors): unknown key 'paramters' (did you mean 'parameters'?)"),
        ("{unet: {parameters: {lambda: .inf}}}", "sdxl.components.unet: parameter 'lambda' = .inf: must be a finite number"),
        ("[clip_l]", "sdxl.components: expected a mapping of components (unet:, clip_l:, clip_g:), got a list"),
    ],
)  # fmt: skip
def test_component_mistakes_are_one_line_naming_the_component(section, message):
    assert message in _error(TGMD + f"sdxl: {{components: {section}}}\n")


def test_component_configs_that_pass():
    ok = [
        "{clip_l: {source: base}, clip_g: {source: /m/b.safetensors}}",
        "{clip_g: {source: /m/../m/b.safetensors}}",  # the same file in another spelling
        "{unet: {parameters: {drop_rate: 0.3, seed: 2}}}",  # the top-level method, other parameters
        "{clip_g: {merge_method: linear, parameters: {weight: {mbw: ALL_B}}, models: [{model: /m/a.safetensors, parameters: {weight: {mbw: GRAD_A}}}]}}",
    ]
    for section in ok:
        validate_config(TGMD + f"sdxl: {{components: {section}}}\n", source=SRC, check_files=False)


def test_a_component_of_a_modules_config_takes_that_modules_models():
    text = """merge_method: linear
modules:
  unet: {models: [{model: /m/a.safetensors, parameters: {weight: 1}}]}
  clip_l: {models: [{model: /m/b.safetensors, parameters: {weight: 1}}]}
sdxl: {components: {clip_l: {source: /m/a.safetensors}}}
"""
    assert "sdxl.components.clip_l.source: /m/a.safetensors is not one of the models of this merge (b.safetensors)" in _error(text)
    validate_config(text.replace("/m/a.safetensors}}}", "/m/b.safetensors}}}"), source=SRC, check_files=False)
    assert "sdxl.components.clip_g: the config's modules: has no clip_g" in _error(text.replace("{clip_l: {source", "{clip_g: {source"))


# ------------------------------------------------------------------ planning


@pytest.fixture
def three(synthetic_sdxl_factory):
    base = synthetic_sdxl_factory("base", seed=0, width=1 / 64)
    return [base] + [synthetic_sdxl_factory(f"m{i}", seed=i, base=base, width=1 / 64) for i in (1, 2)]


def _plan(config: dict):
    from mergekit_sdxl.host.driver import input_paths, load_config
    from mergekit_sdxl.host.merge_planning import plan_merge
    from mergekit_sdxl.host.mergekit_api import MergeOptions
    from mergekit_sdxl.host.planner import SDXLRules
    from mergekit_sdxl.host.plugin import register_all

    register_all()
    text = yaml.safe_dump(config)
    validate_config(text, source=SRC)
    loaded = load_config(text)
    files = [p for p, _ in input_paths(loaded.config, loaded.sdxl)]
    planned = plan_merge(loaded.config, MergeOptions(), SDXLRules(options=loaded.sdxl), files)
    return {name: target.tensor_task for name, target in planned.targets}


def _merge_of(task):
    return getattr(task, "merge", task)  # a MergeKeyTask wraps mergekit's ExecuteMergeMethodTask


def _weights(task):
    return {os.path.basename(str(m)): dict(p.items()).get("weight") for m, p in _merge_of(task).input_parameters.items()}


def test_each_component_is_planned_with_its_own_method_parameters_and_models(three):
    from mergekit_sdxl.host.tasks import DonorTensor, MergeKeyTask, PositionIds

    base, a, b = three
    alpha = [0.25] * 20
    alpha[0] = 3.0  # BASE: both text encoders
    config = {
        "merge_method": "tgmd",
        "base_model": {"model": {"path": str(base)}},
        "models": [{"model": {"model": {"path": str(m)}}} for m in (a, b)],
        "parameters": {"drop_rate": 0.1, "seed": 7},
        "dtype": "float32",
        "sdxl": {
            "components": {
                "clip_l": {"source": "base"},
                "clip_g": {
                    "merge_method": "linear",
                    "parameters": {"weight": 1.0},
                    # the same file as the config's a, spelled another way: planned with the config's reference
                    "models": [{"model": {"model": {"path": os.path.join(str(a.parent), ".", a.name)}}, "parameters": {"weight": {"mbw": alpha}}}],
                },
            }
        },
    }
    tasks = _plan(config)
    assert len(tasks) == 2515
    for key, task in tasks.items():
        component = component_of(key)
        if key.endswith("position_ids"):
            assert isinstance(task, PositionIds)
        elif component == "clip_l" or component == "vae" or key.endswith("logit_scale"):  # the SDXL rules hold inside
            assert isinstance(task, DonorTensor) and task.model.model.path == str(base), key
        elif component == "clip_g":
            assert _merge_of(task).method_name == "linear", key
            assert [str(m) for m in _merge_of(task).model_order] == [str(a), str(base)], key
        else:
            assert isinstance(task, MergeKeyTask) and task.merge.method_name == "tgmd", key
            assert sorted(os.path.basename(str(m)) for m in task.merge.model_order) == ["base.safetensors", "m1.safetensors", "m2.safetensors"]
    assert _weights(tasks[CLIP_G_KEY]) == {"m1.safetensors": 3.0, "base.safetensors": 1.0}
    assert dict(_merge_of(tasks[CLIP_G_KEY]).parameters.items()) == {"normalize": True}
    assert dict(tasks[UNET_KEY].merge.parameters.items())["seed"] == 7

    # The planned clip_g task computes the linear merge: (1 * base + 3 * a) / 4.
    task = tasks[CLIP_G_KEY]
    merged = task.execute(tensors=_merge_of(task).gather_tensors.execute())
    xb, xa = load_file(base)[CLIP_G_KEY].float(), load_file(a)[CLIP_G_KEY].float()
    torch.testing.assert_close(merged.float(), (xb + 3 * xa) / 4, rtol=0, atol=1e-6)


def test_a_component_copied_from_one_model_and_the_unet_merged_with_other_parameters(three):
    from mergekit_sdxl.host.tasks import DonorTensor, MergeKeyTask

    base, a, b = three
    config = {
        "merge_method": "tgmd",
        "base_model": {"model": {"path": str(base)}},
        "models": [{"model": {"model": {"path": str(m)}}} for m in (a, b)],
        "parameters": {"drop_rate": 0.1, "seed": 7},
        "sdxl": {"components": {"clip_g": {"source": str(b)}, "unet": {"parameters": {"drop_rate": 0.5, "seed": 9}}}},
    }
    tasks = _plan(config)
    assert {t.model.model.path for k, t in tasks.items() if component_of(k) == "clip_g"} == {str(b)}
    assert all(isinstance(t, DonorTensor) for k, t in tasks.items() if component_of(k) == "clip_g")  # logit_scale too
    unet = tasks[UNET_KEY]
    assert isinstance(unet, MergeKeyTask) and dict(unet.merge.parameters.items())["seed"] == 9
    assert {p["drop_rate"] for m, p in unet.merge.input_parameters.items() if p} == {0.5}
    clip_l = tasks[CLIP_L_KEY]
    assert dict(clip_l.merge.parameters.items())["seed"] == 7  # not named: the top level
