"""End to end: SDXL single files through the stock mergekit-yaml and through mergekit-sdxl merge."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_sdxl.sdxl.manifest import SDXL_KEYS, component_of

pytestmark = pytest.mark.slow  # every test here starts mergekit-sdxl / mergekit-yaml processes

BIN = Path(sys.executable).parent
POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
TEXT_PROJECTION = "conditioner.embedders.1.model.text_projection"
LOGIT_SCALE = "conditioner.embedders.1.model.logit_scale"


def _run(args, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(args, capture_output=True, text=True, env=env, **kw)
    if result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _config(method: str, base: Path, models, parameters=None, **extra) -> str:
    config = {
        "merge_method": method,
        "base_model": {"model": {"path": str(base)}},
        "models": [{"model": {"model": {"path": str(m)}}, "parameters": p} for m, p in models],
        "dtype": "float32",
        **extra,
    }
    if parameters:
        config["parameters"] = parameters
    return yaml.safe_dump(config, sort_keys=False)


@pytest.fixture
def three_models(synthetic_sdxl_factory, tmp_path):
    base = synthetic_sdxl_factory("base", seed=0)
    # '+' and '@' in file names: mergekit's string form would split them; the mapping form must work.
    a = synthetic_sdxl_factory("pony+v6@final", seed=1, base=base)
    b = synthetic_sdxl_factory("illu", seed=2, base=base)
    return base, a, b


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_stock_mergekit_yaml_merges_sdxl_single_files(three_models, tmp_path, method):
    base, a, b = three_models
    if method == "linear":
        text = _config("linear", base, [(a, {"weight": 0.75}), (b, {"weight": 0.25})])
        text = text.replace("base_model", "_unused_base")  # linear takes no base
    else:
        text = _config("ties", base, [(a, {"weight": 1.0, "density": 1.0}), (b, {"weight": 1.0, "density": 1.0})])
    config = tmp_path / "config.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    _run([str(BIN / "mergekit-yaml"), str(config), str(out), "--no-copy-tokenizer"])
    merged = load_file(out / "model.safetensors")
    assert set(merged) == set(SDXL_KEYS)
    assert merged[POSITION_IDS].dtype == torch.int64
    assert torch.equal(merged[POSITION_IDS], torch.arange(77)[None])
    tb, ta, tbb = load_file(base), load_file(a), load_file(b)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    xa, xb, xbase = ta[key].float(), tbb[key].float(), tb[key].float()
    if method == "linear":
        expected = 0.75 * xa + 0.25 * xb
    else:
        da, db = xa - xbase, xb - xbase
        sign = torch.where(da + db >= 0, 1.0, -1.0)  # mergekit's TIES breaks a tied vote towards +
        keep_a, keep_b = (torch.sign(da) == sign), (torch.sign(db) == sign)
        total = da * keep_a + db * keep_b
        count = keep_a.float() + keep_b.float()
        expected = xbase + torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    torch.testing.assert_close(merged[key].float(), expected.to(merged[key].dtype).float(), atol=2e-3, rtol=1e-2)
    # The VAE is taken from the base (linear has none: the first model) by default, in the stock command too.
    donor = ta if method == "linear" else tb
    for vae_key in (k for k in SDXL_KEYS if component_of(k) == "vae"):
        assert torch.equal(merged[vae_key].to(donor[vae_key].dtype), donor[vae_key]), vae_key


def test_mergekit_sdxl_merge_writes_one_loadable_file(three_models, tmp_path):
    base, a, b = three_models
    config = tmp_path / "config.yaml"
    text = _config("ties_soup", base, [(a, {}), (b, {})], parameters={"seed": 7})
    config.write_text(text)
    out = tmp_path / "merged.safetensors"
    result = _run([str(BIN / "mergekit-sdxl"), "merge", str(config), str(out)])
    assert out.is_file() and not Path(str(out) + ".partial").exists()
    merged = load_file(out)
    assert set(merged) == set(SDXL_KEYS)
    assert all(t.dtype == torch.float16 for k, t in merged.items() if k != POSITION_IDS)
    assert merged[POSITION_IDS].dtype == torch.int64
    tb = load_file(base)
    for key in SDXL_KEYS:
        if component_of(key) == "vae":
            assert torch.equal(merged[key], tb[key]), key
    assert torch.equal(merged[LOGIT_SCALE], tb[LOGIT_SCALE])
    with safe_open(out, "pt") as handle:
        metadata = handle.metadata()
    # The published recipe is the config with each input named by its file name, not the user's path.
    published = yaml.safe_load(text.replace(str(tmp_path) + "/", "").replace(str(base.parent) + "/", ""))
    assert yaml.safe_load(metadata["mergekit_sdxl.recipe"]) == published
    assert str(base.parent) not in metadata["mergekit_sdxl.recipe"]
    assert "mergekit.version" in metadata and "mergekit_sdxl.version" in metadata
    import hashlib

    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in result.stdout
    assert f"AutoV2 {digest[:10]}" in result.stdout


def test_text_projection_variant_is_normalised(synthetic_sdxl_factory, tmp_path):
    base = synthetic_sdxl_factory("base", seed=0)
    a = synthetic_sdxl_factory("a", seed=1, base=base)
    ta = load_file(a)
    # Model b stores the Linear-oriented `.weight` variant (transposed) and a float position_ids.
    b_tensors = dict(load_file(synthetic_sdxl_factory("b", seed=2, base=base)))
    projection = b_tensors.pop(TEXT_PROJECTION)
    b_tensors[TEXT_PROJECTION + ".weight"] = projection.t().contiguous()
    b_tensors[POSITION_IDS] = torch.arange(77, dtype=torch.float32)[None] + 0.3
    b_tensors["model_ema.decay"] = torch.tensor(0.999)
    from safetensors.torch import save_file

    b = tmp_path / "b_variant.safetensors"
    save_file(b_tensors, b)
    config = tmp_path / "c.yaml"
    linear = yaml.safe_load(_config("linear", base, [(a, {"weight": 0.5}), (b, {"weight": 0.5})]))
    del linear["base_model"]  # a plain average of a and b
    config.write_text(yaml.safe_dump(linear, sort_keys=False))
    out = tmp_path / "m.safetensors"
    _run([str(BIN / "mergekit-sdxl"), "merge", str(config), str(out)])
    merged = load_file(out)
    expected = (0.5 * ta[TEXT_PROJECTION].float() + 0.5 * projection.float()).half()
    torch.testing.assert_close(merged[TEXT_PROJECTION], expected, atol=1e-3, rtol=1e-3)
    assert torch.equal(merged[POSITION_IDS], torch.arange(77)[None])
    assert "model_ema.decay" not in merged


def test_sdxl_block_gradient_varies_per_unet_block(three_models, tmp_path):
    base, a, _b = three_models
    text = yaml.safe_dump(
        {
            "merge_method": "linear",
            "models": [
                {"model": {"model": {"path": str(a)}}, "parameters": {"weight": [1.0, 0.0]}},
                {"model": {"model": {"path": str(base)}}, "parameters": {"weight": [0.0, 1.0]}},
            ],
            "dtype": "float32",
        }
    )
    config = tmp_path / "g.yaml"
    config.write_text(text)
    out = tmp_path / "g.safetensors"
    _run([str(BIN / "mergekit-sdxl"), "merge", str(config), str(out)])
    merged, ta, tb = load_file(out), load_file(a), load_file(base)
    first = "model.diffusion_model.input_blocks.0.0.weight"  # IN00: t = 0 -> all model a
    last = "model.diffusion_model.out.2.weight"  # OUT08: t = 1 -> all base
    middle = "model.diffusion_model.middle_block.0.in_layers.2.weight"  # M00: t = 0.5
    assert torch.equal(merged[first], ta[first])
    assert torch.equal(merged[last], tb[last])
    torch.testing.assert_close(merged[middle].float(), (0.5 * ta[middle].float() + 0.5 * tb[middle].float()).half().float())


def test_diffusers_loads_the_merged_file_and_denoises(tiny_sdxl_factory, tiny_config_dir, tmp_path):
    pytest.importorskip("diffusers")
    base = tiny_sdxl_factory("base", seed=0)
    a = tiny_sdxl_factory("a", seed=1, base=base)
    b = tiny_sdxl_factory("b", seed=2, base=base)
    config = tmp_path / "tgmd.yaml"
    config.write_text(_config("tgmd", base, [(a, {}), (b, {})], parameters={"seed": 3}))
    out = tmp_path / "tiny-merged.safetensors"
    _run([str(BIN / "mergekit-sdxl"), "merge", str(config), str(out)])
    from mergekit_sdxl.sdxl.diffusers_check import denoise_two_steps

    image = denoise_two_steps(out, tiny_config_dir)
    assert image.shape[0] == 1 and bool(torch.isfinite(torch.as_tensor(image)).all())
