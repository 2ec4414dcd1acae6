"""The plugin's methods inside mergekit: registry, Python API, mergekit-yaml on a tiny Llama, bad numbers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergekit_sdxl.kernels.tgmd import TGMDParams, tgmd_merge

BIN = Path(sys.executable).parent


def _run(args, env=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.mark.slow
def test_methods_are_registered_by_the_post_import_hook():
    code = "from mergekit.merge_methods import registry; print(sorted(m for m in registry._METHODS if m in ('tgmd','ties_soup','geometric_median')))"
    on = _run([sys.executable, "-c", code]).stdout.strip()
    assert on == "['geometric_median', 'tgmd', 'ties_soup']"
    off = _run([sys.executable, "-c", code], env={"MERGEKIT_SDXL_DISABLE": "1"}).stdout.strip()
    assert off == "[]"


def test_registration_is_idempotent_and_conflicts_are_errors():
    from mergekit.merge_methods import registry

    from mergekit_sdxl.host import plugin

    plugin.register_all()
    plugin.register_all()
    assert registry.get("tgmd").spec.name == "tgmd"
    original = registry._METHODS["ties_soup"]
    try:
        registry._METHODS["ties_soup"] = registry.get("linear")
        with pytest.raises(plugin.RegistrationConflict, match="ties_soup"):
            plugin.register_methods()
    finally:
        registry._METHODS["ties_soup"] = original


def test_merge_tensors_python_api_matches_the_kernel():
    from mergekit.merge_methods import merge_tensors

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    models = [base + 0.1 * torch.randn(6, 5, generator=generator, dtype=torch.float64) for _ in range(4)]
    result = merge_tensors(
        [base, *models],
        "tgmd",
        base_index=0,
        ids=["base", "m1", "m2", "m3", "m4"],
        name="layer.weight",
        parameters={"drop_rate": 0.25, "seed": 11},
        dtype=torch.float64,
    )
    expected = tgmd_merge(
        base,
        models,
        TGMDParams(drop_rate=[0.25] * 4, density=[1.0] * 4, weight=[1.0] * 4, seed=11),
        torch.float64,
        tensor_name="layer.weight",
        model_keys=["m1", "m2", "m3", "m4"],
    )
    assert torch.equal(result, expected)
    # Plain geometric median: the point every model is close to.
    gm = merge_tensors([torch.zeros(3), torch.zeros(3), torch.tensor([9.0, 9.0, 9.0])], "geometric_median", dtype=torch.float64)
    assert float(gm.abs().max()) < 1e-3


def _tiny_llama(path: Path, seed: int, base: Path | None = None) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    if base is not None:
        base_state = load_file(base / "model.safetensors")
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in base_state:
                    parameter.copy_(base_state[name] + 0.02 * torch.randn_like(parameter))
    model.save_pretrained(path, safe_serialization=True)
    return path


def _llama_config(base: Path, models, **parameters) -> str:
    return yaml.safe_dump(
        {
            "merge_method": "tgmd",
            "base_model": str(base),
            "models": [{"model": str(m)} for m in models],
            "parameters": {"drop_rate": 0.1, "seed": 240603, **parameters},
            "dtype": "float64",
            "out_dtype": "float32",
        }
    )


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = _tiny_llama(root / "base", 0)
    return base, [_tiny_llama(root / f"ft{i}", i + 1, base=base) for i in range(3)]


@pytest.mark.slow
def test_mergekit_yaml_merges_a_tiny_llama_with_tgmd(llamas, tmp_path):
    base, models = llamas
    config = tmp_path / "llama.yaml"
    config.write_text(_llama_config(base, models))
    out = tmp_path / "out"
    _run([str(BIN / "mergekit-yaml"), str(config), str(out), "--no-copy-tokenizer"])
    merged = load_file(out / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    inputs = [load_file(m / "model.safetensors")[key].double() for m in models]
    expected = tgmd_merge(
        load_file(base / "model.safetensors")[key].double(),
        inputs,
        TGMDParams(drop_rate=[0.1] * 3, density=[1.0] * 3, weight=[1.0] * 3, seed=240603),
        torch.float64,
        tensor_name=key,
        model_keys=[str(m) for m in models],
    )
    assert torch.equal(merged[key], expected.float())
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert bool(torch.isfinite(logits).all())


@pytest.mark.slow
def test_same_config_and_seed_give_identical_bytes_across_thread_counts(llamas, tmp_path):
    base, models = llamas
    config = tmp_path / "llama.yaml"
    config.write_text(_llama_config(base, models))
    digests = []
    for threads in ("1", "2"):
        out = tmp_path / f"out{threads}"
        _run([str(BIN / "mergekit-yaml"), str(config), str(out), "--no-copy-tokenizer", "--num-threads", threads])
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.slow
def test_nan_input_is_left_out_with_a_warning_or_fails_by_option(llamas, tmp_path):
    base, models = llamas
    bad = tmp_path / "bad"
    bad.mkdir()
    for item in models[0].iterdir():
        (bad / item.name).write_bytes(item.read_bytes())
    state = load_file(bad / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    state[key][3, 4] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})

    config = tmp_path / "nan.yaml"
    config.write_text(_llama_config(base, [bad, models[1], models[2]]))
    out = tmp_path / "out"
    result = _run([str(BIN / "mergekit-yaml"), str(config), str(out), "--no-copy-tokenizer"])
    assert f"{bad}: key {key}" in result.stderr and "left out" in result.stderr
    merged = load_file(out / "model.safetensors")
    expected = tgmd_merge(
        load_file(base / "model.safetensors")[key].double(),
        [load_file(m / "model.safetensors")[key].double() for m in models[1:]],
        TGMDParams(drop_rate=[0.1] * 2, density=[1.0] * 2, weight=[1.0] * 2, seed=240603),
        torch.float64,
        tensor_name=key,
        model_keys=[str(m) for m in models[1:]],
    )
    assert torch.equal(merged[key], expected.float())

    config.write_text(_llama_config(base, [bad, models[1], models[2]], on_nonfinite="error"))
    failed = _run([str(BIN / "mergekit-yaml"), str(config), str(tmp_path / "out2"), "--no-copy-tokenizer"], check=False)
    assert failed.returncode != 0
    assert key in failed.stderr and str(bad) in failed.stderr


@pytest.mark.parametrize("module", ["mergekit_sdxl.host.methods", "mergekit_sdxl.host.tasks", "mergekit_sdxl.host.driver"])
@pytest.mark.slow
def test_any_plugin_module_imported_first_still_registers(module):
    code = (
        f"import {module}\n"
        "from mergekit.merge_methods import registry\n"
        "import mergekit.plan\n"
        "assert 'tgmd' in registry._METHODS\n"
        "assert hasattr(mergekit.plan.MergePlanner.plan_tensor, '_mergekit_sdxl_original')\n"
    )
    _run([sys.executable, "-c", code])
