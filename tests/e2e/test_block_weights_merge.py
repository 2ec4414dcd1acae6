"""End to end through ``run_sdxl_merge`` (in process) on small synthetic SDXL files: SuperMerger
block weights under ``linear`` give each block's keys exactly the hand-computed mix, and a config
that copies both text encoders from the base while the UNet is TGMD-merged writes the base's text
encoders bit for bit and the same UNet as the plain TGMD merge."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_sdxl.sdxl.manifest import SDXL_KEYS, component_of
from mergekit_sdxl.workflow.block_weights import MBW_BLOCKS, block_for_key

pytestmark = pytest.mark.slow  # whole merges

WIDTH = 1 / 64


def _merge(config: dict, out) -> dict:
    from mergekit_sdxl.host.driver import run_sdxl_merge
    from mergekit_sdxl.host.mergekit_api import MergeOptions

    run_sdxl_merge(yaml.safe_dump(config, sort_keys=False), str(out), MergeOptions(quiet=True), source=None)
    return load_file(out)


@pytest.fixture
def inputs(synthetic_sdxl_factory):
    base = synthetic_sdxl_factory("base", seed=0, width=WIDTH)
    return base, synthetic_sdxl_factory("a", seed=1, base=base, width=WIDTH), synthetic_sdxl_factory("b", seed=2, base=base, width=WIDTH)


def test_mbw_weights_under_linear_mix_each_block_exactly(inputs, tmp_path):
    _, a, b = inputs
    # Dyadic weights without normalizing: every product and sum is exact in float32, so the float16
    # output must equal the hand-computed mix bit for bit.
    wa = [0.5] * 20
    wb = [0.5] * 20
    wa[MBW_BLOCKS.index("IN04")], wb[MBW_BLOCKS.index("IN04")] = 0.75, 0.25
    wa[MBW_BLOCKS.index("OUT02")], wb[MBW_BLOCKS.index("OUT02")] = 0.25, 0.75
    wa[MBW_BLOCKS.index("BASE")], wb[MBW_BLOCKS.index("BASE")] = 1.0, 0.0
    config = {
        "merge_method": "linear",
        "models": [
            {"model": {"model": {"path": str(a)}}, "parameters": {"weight": {"mbw": ",".join(map(str, wa))}}},
            {"model": {"model": {"path": str(b)}}, "parameters": {"weight": {"mbw": wb}}},
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
        "out_dtype": "float16",
    }
    merged = _merge(config, tmp_path / "mbw.safetensors")
    ta, tb = load_file(a), load_file(b)

    def mix(key: str, x: float, y: float) -> torch.Tensor:
        return (x * ta[key].float() + y * tb[key].float()).to(torch.float16)

    checked = {"IN04": 0, "OUT02": 0}
    for key in SDXL_KEYS:
        block = block_for_key(key)
        if block in checked:
            i = MBW_BLOCKS.index(block)
            assert torch.equal(merged[key], mix(key, wa[i], wb[i])), key
            checked[block] += 1
    assert checked == {"IN04": 58, "OUT02": 220}  # every key of both blocks
    neighbour = "model.diffusion_model.input_blocks.5.1.proj_in.weight"  # IN05: the default 0.5 / 0.5
    assert torch.equal(merged[neighbour], mix(neighbour, 0.5, 0.5))
    assert not torch.equal(merged[neighbour], mix(neighbour, 0.75, 0.25))
    time_embed = "model.diffusion_model.time_embed.0.weight"  # IN00, as in SuperMerger
    assert torch.equal(merged[time_embed], mix(time_embed, 0.5, 0.5))
    clip_g = "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc.weight"  # BASE: all of a
    assert torch.equal(merged[clip_g], ta[clip_g])


def test_text_encoders_from_the_base_and_a_tgmd_unet(inputs, tmp_path):
    base, a, b = inputs
    config = {
        "merge_method": "tgmd",
        "base_model": {"model": {"path": str(base)}},
        "models": [{"model": {"model": {"path": str(m)}}} for m in (a, b)],
        "parameters": {"drop_rate": 0.1, "seed": 240603},
        "dtype": "float32",
        "out_dtype": "float16",
    }
    plain = _merge(config, tmp_path / "plain.safetensors")
    config["sdxl"] = {"components": {"clip_l": {"source": "base"}, "clip_g": {"source": "base"}}}
    split = _merge(config, tmp_path / "split.safetensors")
    tbase = load_file(base)
    assert set(split) == set(plain) == set(SDXL_KEYS)
    text_keys = [k for k in SDXL_KEYS if component_of(k) in ("clip_l", "clip_g")]
    unet_keys = [k for k in SDXL_KEYS if component_of(k) == "unet"]
    for key in text_keys:
        assert split[key].dtype == tbase[key].dtype and torch.equal(split[key], tbase[key]), key
    for key in unet_keys:
        assert torch.equal(split[key], plain[key]), key
    # Both halves of the check can fail: the plain merge changes the text encoders, and the UNet.
    assert sum(not torch.equal(plain[k], tbase[k]) for k in text_keys) > len(text_keys) // 2
    assert sum(not torch.equal(split[k], tbase[k]) for k in unet_keys) > len(unet_keys) // 2
