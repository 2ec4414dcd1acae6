"""A LoRA file bound to a base: refusals naming the file and key, and rows of base + LoRA computed
chunk by chunk equal to the whole-tensor formulas."""

import pytest
import torch

from mergekit_sdxl.io.lora_file import LoraFile
from mergekit_sdxl.kernels.lora_delta import DORA_EPS
from mergekit_sdxl.sdxl.header import CheckpointError
from mergekit_sdxl.sdxl.tiny import synthetic_shapes
from mergekit_sdxl.sdxl.tiny_lora import lora_factors, write_lora

U = "model.diffusion_model."
G = "conditioner.embedders.1.model."
SHAPES = synthetic_shapes(1 / 16)
PROJ = "lora_unet_input_blocks_4_1_proj_in"
CONV = "lora_unet_input_blocks_1_0_in_layers_2"


def _base(key, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPES[key], generator=g).half()


def _rows(binding, key, step):
    base = _base(key)
    rows = base.shape[0] if base.ndim else 1
    flat = base.reshape(rows, -1)
    parts = [binding.rows(key, a, min(rows, a + step), lambda x, y: flat[x:y], base.shape) for a in range(0, rows, step)]
    return torch.cat(parts).reshape(base.shape), base.float()


def test_kohya_lora_and_locon_rows(tmp_path):
    proj, conv = SHAPES[U + "input_blocks.4.1.proj_in.weight"], SHAPES[U + "input_blocks.1.0.in_layers.2.weight"]
    f1 = lora_factors("lora", proj, 4, seed=1, alpha=2.0)
    f2 = lora_factors("lora", conv, 2, seed=2, alpha=None)
    path = write_lora(tmp_path / "l.safetensors", {PROJ: f1, CONV: f2}, dtype=torch.float32)
    binding = LoraFile(str(path)).bind(SHAPES)
    assert set(binding.keys) == {U + "input_blocks.4.1.proj_in.weight", U + "input_blocks.1.0.in_layers.2.weight"}
    got, base = _rows(binding, U + "input_blocks.4.1.proj_in.weight", 7)
    expected = base + (f1["lora_up.weight"] @ f1["lora_down.weight"]) * (2.0 / 4)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    got, base = _rows(binding, U + "input_blocks.1.0.in_layers.2.weight", 3)
    up, down = f2["lora_up.weight"].flatten(1), f2["lora_down.weight"].flatten(1)
    torch.testing.assert_close(got, base + (up @ down).reshape(conv), rtol=1e-6, atol=1e-6)  # no alpha: scale 1


def test_clip_g_qkv_go_into_their_third_of_in_proj(tmp_path):
    key = G + "transformer.resblocks.3.attn.in_proj_weight"
    width = SHAPES[key][1]
    names = {x: f"lora_te2_text_model_encoder_layers_3_self_attn_{x}_proj" for x in "qkv"}
    factors = {names[x]: lora_factors("lora", (width, width), 2, seed=i, alpha=1.0) for i, x in enumerate("qv")}
    path = write_lora(tmp_path / "t.safetensors", factors, dtype=torch.float32)
    got, base = _rows(LoraFile(str(path)).bind(SHAPES), key, 5)
    expected = base.clone()
    for i, x in enumerate("qkv"):
        f = factors.get(names[x])
        if f is not None:
            expected[i * width : (i + 1) * width] += f["lora_up.weight"] @ f["lora_down.weight"] * 0.5
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[width : 2 * width], base[width : 2 * width])  # k untouched


def test_text_projection_change_is_transposed(tmp_path):
    key = G + "text_projection"
    n = SHAPES[key][0]
    f = lora_factors("lora", (n, n), 2, seed=3, alpha=2.0)
    path = write_lora(tmp_path / "p.safetensors", {"lora_te2_text_projection": f}, dtype=torch.float32)
    got, base = _rows(LoraFile(str(path)).bind(SHAPES), key, 3)
    torch.testing.assert_close(got, base + (f["lora_up.weight"] @ f["lora_down.weight"]).T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["rows", "columns"])
def test_dora_over_any_chunking(tmp_path, mode):
    key = U + "input_blocks.1.0.in_layers.2.weight"
    shape = SHAPES[key]
    f = lora_factors("lora", shape, 2, seed=4, alpha=1.0, dora=mode)
    path = write_lora(tmp_path / "d.safetensors", {CONV: f}, dtype=torch.float32)
    got, base = _rows(LoraFile(str(path)).bind(SHAPES), key, 3)
    merged = base + (f["lora_up.weight"].flatten(1) @ f["lora_down.weight"].flatten(1)).reshape(shape) * 0.5
    if mode == "rows":
        norm = merged.reshape(shape[0], -1).norm(dim=1).reshape(-1, 1, 1, 1)
    else:  # LyCORIS wd_on_out=False: per input channel, over every output row and kernel position
        norm = merged.transpose(0, 1).reshape(shape[1], -1).norm(dim=1).reshape(1, -1, 1, 1)
    torch.testing.assert_close(got, merged * f["dora_scale"] / (norm + DORA_EPS), rtol=1e-5, atol=1e-6)


def test_full_diff_changes_weight_and_bias(tmp_path):
    w, b = U + "input_blocks.4.1.proj_in.weight", U + "input_blocks.4.1.proj_in.bias"
    diff, diff_b = torch.randn(SHAPES[w]), torch.randn(SHAPES[b])
    path = write_lora(tmp_path / "f.safetensors", {PROJ: {"diff": diff, "diff_b": diff_b}}, dtype=torch.float32)
    binding = LoraFile(str(path)).bind(SHAPES)
    got, base = _rows(binding, w, 4)
    torch.testing.assert_close(got, base + diff)
    got, base = _rows(binding, b, 4)
    torch.testing.assert_close(got, base + diff_b)


def test_an_sd1_lora_is_refused_naming_the_file_and_family(tmp_path):
    f = lora_factors("lora", (320, 768), 4, alpha=4.0)
    path = write_lora(tmp_path / "sd15_style.safetensors", {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": f})
    with pytest.raises(CheckpointError, match=r"sd15_style\.safetensors: a LoRA for SD 1\.x \(from a single text encoder.*only SDXL LoRAs"):
        LoraFile(str(path)).bind(SHAPES)


def test_a_module_with_no_sdxl_key_is_an_error_naming_it(tmp_path):
    f = lora_factors("lora", (64, 64), 4)
    path = write_lora(tmp_path / "odd.safetensors", {PROJ: f, "lora_unet_input_blocks_4_1_not_a_layer": f})
    with pytest.raises(CheckpointError, match=r"odd\.safetensors.*lora_unet_input_blocks_4_1_not_a_layer.*map to no SDXL key"):
        LoraFile(str(path)).bind(SHAPES)


def test_factors_that_do_not_fit_the_base_are_an_error_naming_the_module(tmp_path):
    f = lora_factors("lora", (999, 64), 4)
    path = write_lora(tmp_path / "wide.safetensors", {PROJ: f})
    with pytest.raises(CheckpointError, match=rf"module {PROJ} changes .*proj_in.weight by a \[999, 64\] weight"):
        LoraFile(str(path)).bind(SHAPES)


def test_two_spellings_of_one_module_are_refused(tmp_path):
    shape = SHAPES[U + "input_blocks.4.1.proj_in.weight"]
    f = lora_factors("lora", shape, 2)
    path = write_lora(tmp_path / "twice.safetensors", {PROJ: f, "lora_unet_down_blocks_1_attentions_0_proj_in": f})
    with pytest.raises(CheckpointError, match="both change the same rows"):
        LoraFile(str(path)).bind(SHAPES)


def test_a_peft_files_alpha_comes_from_its_adapter_metadata(tmp_path):
    """diffusers' lora_adapter_metadata: lora_alpha / r, an alpha_pattern, rsLoRA's alpha / sqrt(r)."""
    import json

    proj, qkv = U + "input_blocks.4.1.proj_in.weight", G + "transformer.resblocks.3.attn.in_proj_weight"
    width = SHAPES[qkv][1]
    f_proj, f_out, f_q = (lora_factors("lora", s, 4, seed=i) for i, s in enumerate([SHAPES[proj], SHAPES[U + "input_blocks.4.1.proj_out.weight"], (width, width)]))

    def peft(f):
        return {"lora_A.weight": f["lora_down.weight"], "lora_B.weight": f["lora_up.weight"]}

    metadata = {
        "unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"down_blocks.1.attentions.0.proj_out": 1},
        "text_encoder_2.r": 4, "text_encoder_2.lora_alpha": 6, "text_encoder_2.use_rslora": True,
    }
    path = write_lora(
        tmp_path / "pytorch_lora_weights.safetensors",
        {
            "unet.down_blocks.1.attentions.0.proj_in": peft(f_proj),
            "unet.down_blocks.1.attentions.0.proj_out": peft(f_out),
            "text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj": peft(f_q),
        },
        dtype=torch.float32,
        metadata={"lora_adapter_metadata": json.dumps(metadata)},
    )
    binding = LoraFile(str(path)).bind(SHAPES)
    got, base = _rows(binding, proj, 16)
    torch.testing.assert_close(got, base + f_proj["lora_up.weight"] @ f_proj["lora_down.weight"] * 2.0, rtol=1e-6, atol=1e-6)
    out = U + "input_blocks.4.1.proj_out.weight"
    got, base = _rows(binding, out, 16)
    torch.testing.assert_close(got, base + f_out["lora_up.weight"] @ f_out["lora_down.weight"] * 0.25, rtol=1e-6, atol=1e-6)
    got, base = _rows(binding, qkv, 16)
    expected = base.clone()
    expected[:width] += f_q["lora_up.weight"] @ f_q["lora_down.weight"] * (6 / 2)  # alpha / sqrt(4)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_unreadable_adapter_metadata_is_refused_naming_the_file(tmp_path):
    f = lora_factors("lora", SHAPES[U + "input_blocks.4.1.proj_in.weight"], 2)
    parts = {"lora_A.weight": f["lora_down.weight"], "lora_B.weight": f["lora_up.weight"]}
    path = write_lora(tmp_path / "broken.safetensors", {"unet.down_blocks.1.attentions.0.proj_in": parts}, metadata={"lora_adapter_metadata": "{"})
    with pytest.raises(CheckpointError, match=r"broken\.safetensors: metadata: lora_adapter_metadata is not JSON"):
        LoraFile(str(path)).bind(SHAPES)


@pytest.mark.parametrize(
    "metadata, names, family",
    [
        ({"ss_base_model_version": "sd_v2"}, ["lora_unet_down_blocks_1_attentions_0_proj_in"], "SD 2"),
        ({"modelspec.architecture": "flux-1-dev/lora"}, ["lora_unet_double_blocks_0_img_attn_proj"], "Flux"),
        ({}, ["lora_unet_double_blocks_0_img_attn_proj"], "Flux"),
    ],
    ids=["sd2-by-ss_base_model_version", "flux-by-modelspec", "flux-by-key-names"],
)
def test_sd2_and_flux_loras_are_refused_naming_the_file_and_family(tmp_path, metadata, names, family):
    f = lora_factors("lora", (64, 64), 4, alpha=4.0)
    path = write_lora(tmp_path / "other_family.safetensors", dict.fromkeys(names, f), metadata=metadata)
    with pytest.raises(CheckpointError, match=rf"other_family\.safetensors: a LoRA for {family}.*only SDXL LoRAs"):
        LoraFile(str(path)).bind(SHAPES)
