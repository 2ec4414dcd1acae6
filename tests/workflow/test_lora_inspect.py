"""``inspect`` and LoRA files: network, rank, components and base family from the header; a LoRA
of another family is described, and said not to merge with an SDXL base."""

import torch

from mergekit_sdxl.io.hashing import HashCache
from mergekit_sdxl.sdxl.tiny import synthetic_shapes
from mergekit_sdxl.sdxl.tiny_lora import kohya_modules, lora_factors, module_shape, write_lora
from mergekit_sdxl.workflow.inspect import format_table, inspect_paths

SHAPES = synthetic_shapes(1 / 16)


def _files(folder):
    modules = kohya_modules(SHAPES, conv=True)
    locon = {n: lora_factors("lora", module_shape(t, SHAPES), 4, seed=i, alpha=2.0) for i, (n, t) in enumerate(modules) if i % 5 == 0}
    write_lora(folder / "style_locon.safetensors", locon, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    proj = dict(modules)["lora_unet_input_blocks_4_1_proj_in"]
    lokr = lora_factors("lokr", module_shape(proj, SHAPES), 2, alpha=1.0, full_w2=False, dora="rows")
    write_lora(folder / "lokr_dora.safetensors", {"lora_unet_input_blocks_4_1_proj_in": lokr}, dtype=torch.float32)
    write_lora(
        folder / "sd15_detail.safetensors",
        {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": lora_factors("lora", (768, 768), 8, alpha=4.0)},
        metadata={"ss_base_model_version": "sd_v1"},
    )
    write_lora(folder / "flux_style.safetensors", {"lora_unet_double_blocks_0_img_attn_proj": lora_factors("lora", (64, 64), 16)})
    return locon


def test_inspect_describes_sdxl_and_other_family_loras(tmp_path):
    folder = tmp_path / "loras"
    locon = _files(folder)
    reports = inspect_paths([folder], cache=HashCache(tmp_path / "cache"))
    by_name = {r.path.rsplit("/", 1)[-1]: r for r in reports}
    assert all(r.ok and r.lora is not None for r in reports)
    style = by_name["style_locon.safetensors"].lora
    assert style is not None and style.network == "LoCon" and style.ranks == (4,) and style.family == "sdxl-base"
    assert sum(style.components.values()) == len(locon) and set(style.components) == {"unet", "clip_l", "clip_g"}
    text = format_table(reports, base_dir=folder)
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("sd15_detail.safetensors"))
    assert "sd1 LoRA" in row
    assert f"LoCon rank 4, {len(locon)} modules (unet {style.components['unet']}, clip_l {style.components['clip_l']}," in text
    assert "LoKr+DoRA rank 2, 1 modules (unet 1)" in text
    assert "trained for SD 1.x (ss_base_model_version 'sd_v1')" in text
    assert "a LoRA for SD 1.x: it cannot be merged with an SDXL base" in text
    assert "LoRA rank 16, 1 modules (1 on no SDXL key); trained for Flux" in text
    assert "a LoRA for Flux: it cannot be merged with an SDXL base" in text


def test_a_lora_in_a_checkpoint_folder_gets_a_reason_that_names_recipe_loras(tmp_path):
    from mergekit_sdxl.workflow.lora_check import lora_exclusion_reason
    from mergekit_sdxl.workflow.preflight import inspect_file

    folder = tmp_path / "loras"
    _files(folder)
    style = inspect_file(folder / "style_locon.safetensors", hash=False)
    sd15 = inspect_file(folder / "sd15_detail.safetensors", hash=False)
    assert lora_exclusion_reason(style) == "a LoRA file (LoCon, for SDXL base-family), not a checkpoint: bake LoRAs in with recipe --loras DIR"
    assert lora_exclusion_reason(sd15) == "a LoRA file (LoRA, for SD 1.x), not a checkpoint: bake LoRAs in with recipe --loras DIR"
