"""The SDXL planner's key tasks (host/key_tasks.py) against mergekit's own ``plan_tensor``:
the same model order, shared and per-model parameters (filters, gradients, per-model values,
the base's scope), output weight and gathered tensors, key by key."""

from __future__ import annotations

import copy

import pytest
import yaml


def _setup(config_text: str):
    from mergekit_sdxl.host.driver import load_config
    from mergekit_sdxl.host.mergekit_api import LoaderCache, MergeOptions, get_architecture_info
    from mergekit_sdxl.host.plugin import register_all

    register_all()
    loaded = load_config(config_text)
    options = MergeOptions()
    LoaderCache.loaders.clear()
    LoaderCache().setup(options=options)
    arch = get_architecture_info(loaded.config, options)
    out_config = copy.deepcopy(loaded.config.base_model.config())
    return loaded.config, arch, options, out_config


def _recorded_calls(config, arch, options, out_config):
    """Every (weight, weights_in, models, cfg_reader) mergekit's planner plans, in order."""
    from mergekit_sdxl.host.planner import SDXLMergePlanner, SDXLRules

    calls = []

    class Recording(SDXLMergePlanner):
        def plan_tensor(self, weight, weights_in, models, cfg_reader):
            calls.append((weight, list(weights_in), list(models), cfg_reader))

    Recording(config, arch, options=options, out_model_config=out_config, rules=SDXLRules()).plan_to_disk(
        out_path="(none)"
    )
    return calls


def _config(base, models, method):
    return yaml.safe_dump(
        {
            "merge_method": method,
            "base_model": {"model": {"path": str(base)}},
            "models": [
                # a per-model value
                {"model": {"model": {"path": str(models[0])}}, "parameters": {"weight": 0.5, "density": 0.7}},
                # a filter: attention keys get 2.0, the rest 1.0
                {
                    "model": {"model": {"path": str(models[1])}},
                    "parameters": {"weight": [{"filter": "attn", "value": 2.0}, {"value": 1.0}], "density": 0.7},
                },
                # a gradient over the layers (t), and the same density as the first two: one group
                {"model": {"model": {"path": str(models[2])}}, "parameters": {"weight": [0.0, 1.0], "density": 0.7}},
                # the same settings as the first model, by value: grouped with it
                {"model": {"model": {"path": str(models[3])}}, "parameters": {"weight": 0.5, "density": 0.7}},
            ],
            "parameters": {"drop_rate": 0.1, "seed": 3} if method == "tgmd" else {"normalize": False},
            "dtype": "float64",
        }
    )


@pytest.mark.parametrize("method", ["tgmd", "ties"])
def test_every_key_task_equals_mergekits_plan_tensor(synthetic_sdxl_factory, method):
    from mergekit_sdxl.host.key_tasks import KeyTaskBuilder
    from mergekit_sdxl.host.mergekit_api import MergePlanner, planned_tensors, planner_method
    from mergekit_sdxl.host.planner import mergekit_plan_tensor

    base = synthetic_sdxl_factory("base", seed=0, width=1 / 32)
    models = [synthetic_sdxl_factory(f"m{i}", seed=i, base=base, width=1 / 32) for i in range(1, 5)]
    config, arch, options, out_config = _setup(_config(base, models, method))
    calls = _recorded_calls(config, arch, options, out_config)
    assert len(calls) > 2000

    reference = MergePlanner(config, arch, options=options, out_model_config=out_config)
    builder = KeyTaskBuilder(planner_method(reference), dtype=config.dtype, device=None)
    plan_tensor = mergekit_plan_tensor()
    weights_seen = set()
    per_input_maps = set()
    for weight, weights_in, key_models, cfg_reader in calls:
        plan_tensor(reference, weight, weights_in, key_models, cfg_reader)
        _, expected = planned_tensors(reference)[-1]
        ours = builder.build(weight, weights_in, key_models, cfg_reader)
        assert ours is not None
        assert ours.method_name == expected.method_name
        assert ours.model_order == expected.model_order
        assert ours.base_model == expected.base_model
        assert ours.output_weight == expected.output_weight
        assert dict(ours.parameters.items()) == dict(expected.parameters.items()), weight.name
        assert len(ours.input_parameters) == len(expected.input_parameters)
        for model in expected.model_order:
            assert dict(ours.input_parameters[model].items()) == dict(expected.input_parameters[model].items()), (
                weight.name,
                model,
            )
            weights_seen.add(dict(expected.input_parameters[model].items()).get("weight"))
        for index, model in enumerate(expected.model_order):
            assert ours.gather_tensors.weight_of(index) == expected.gather_tensors.weight_info[model]
        assert ours.gather_tensors.dtype == expected.gather_tensors.dtype
        per_input_maps.add(id(ours.input_parameters))
    # The filter, the gradient and the per-model values all took effect...
    assert {0.5, 1.0, 2.0, 0.0} <= weights_seen
    assert any(0.0 < w < 1.0 and w != 0.5 for w in weights_seen if isinstance(w, float))
    # ...and keys that resolve alike share one per-model map (one per layer t and filter outcome).
    assert len(per_input_maps) < len(calls) / 20


def test_models_with_equal_settings_are_resolved_once(synthetic_sdxl_factory, monkeypatch):
    from mergekit_sdxl.host import key_tasks
    from mergekit_sdxl.host.mergekit_api import MergePlanner, planner_method

    base = synthetic_sdxl_factory("base", seed=0, width=1 / 32)
    models = [synthetic_sdxl_factory(f"m{i}", seed=i, base=base, width=1 / 32) for i in range(1, 5)]
    config, arch, options, out_config = _setup(_config(base, models, "tgmd"))
    calls = _recorded_calls(config, arch, options, out_config)
    reference = MergePlanner(config, arch, options=options, out_model_config=out_config)
    builder = key_tasks.KeyTaskBuilder(planner_method(reference), dtype=None, device=None)
    resolved = []
    real = key_tasks.resolve_parameter
    monkeypatch.setattr(key_tasks, "resolve_parameter", lambda p, *a, **k: resolved.append(p.name) or real(p, *a, **k))
    weight, weights_in, key_models, cfg_reader = calls[-1]
    builder.build(weight, weights_in, key_models, cfg_reader)
    # 5 inputs (base + 4) in 4 groups: the base, models 1 and 4 (equal settings), 2, 3. The
    # base takes no non-base parameter: each of those is resolved 3 times, not 4 (or 5).
    assert resolved.count("weight") == 3
    assert resolved.count("drop_rate") == 3


def test_model_references_hash_and_compare_as_pydantic_does():
    from mergekit_sdxl.host.mergekit_api import ModelReference
    from mergekit_sdxl.host.plugin import register_all
    from mergekit_sdxl.host.stock_patches import unpatched

    register_all()
    original_hash, original_eq = unpatched(ModelReference.__hash__), unpatched(ModelReference.__eq__)
    assert original_hash is not ModelReference.__hash__  # the patch is in place
    a = ModelReference.model_validate({"model": {"path": "/x/base.safetensors"}})
    a_again = ModelReference.model_validate({"model": {"path": "/x/base.safetensors"}})
    lora = ModelReference.model_validate(
        {"model": {"path": "/x/base.safetensors"}, "lora": {"path": "/x/l.safetensors"}}
    )
    for ref in (a, a_again, lora):
        assert hash(ref) == original_hash(ref) == hash(ref)  # cached: the same value every time
    assert a == a_again and original_eq(a, a_again) and hash(a) == hash(a_again)
    assert a != lora and not original_eq(a, lora)
    assert lora != a and a == a and not (a != a)
    assert len({a, a_again, lora}) == 2
    assert (a == "not a reference") is False
