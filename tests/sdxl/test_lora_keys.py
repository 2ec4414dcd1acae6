"""LoRA module names -> SDXL keys, parsing a file's tensor names, and LoRA detection from headers."""

import pytest
import torch

from mergekit_sdxl.sdxl.header import SafetensorsHeader, TensorInfo
from mergekit_sdxl.sdxl.lora_detect import detect_lora, is_lora_header
from mergekit_sdxl.sdxl.lora_keys import delta_shape, module_targets, parse_lora, rank_of, target_of

U = "model.diffusion_model."
G = "conditioner.embedders.1.model."
L = "conditioner.embedders.0.transformer.text_model."


def test_every_diffusers_module_of_the_tiny_sdxl_maps_where_diffusers_puts_it():
    """The diffusers / PEFT spelling of every weight of the real model classes (on the meta device)
    targets the sgm key that the tiny builder (checked against diffusers' own conversion) uses."""
    pytest.importorskip("diffusers")
    from mergekit_sdxl.sdxl.tiny import OP_QKV, OP_T, _tiny_models, sgm_name

    prefixes = {"unet": "unet.", "clip_l": "text_encoder.", "clip_g": "text_encoder_2."}
    checked = 0
    for component, model in _tiny_models("meta").items():
        if component == "vae":
            continue
        for key in model.state_dict():
            if not key.endswith(".weight"):
                continue
            name, op = sgm_name(component, key)
            target = target_of(prefixes[component] + key[: -len(".weight")])
            assert target is not None, key
            assert target.weight == name, key
            assert target.block == (OP_QKV.index(op) if op in OP_QKV else None), key
            assert target.transpose == (op == OP_T), key
            checked += 1
    assert checked > 1000


@pytest.mark.parametrize(
    "names, key, block",
    [
        (("lora_unet_input_blocks_4_1_proj_in", "lora_unet_down_blocks_1_attentions_0_proj_in", "unet.down_blocks.1.attentions.0.proj_in",
          "lycoris_down_blocks_1_attentions_0_proj_in", "lycoris_input_blocks_4_1_proj_in", "unet.base_model.model.down_blocks.1.attentions.0.proj_in"),
         U + "input_blocks.4.1.proj_in.weight", None),
        (("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_down_blocks_0_resnets_0_conv1"), U + "input_blocks.1.0.in_layers.2.weight", None),
        (("lora_unet_input_blocks_3_0_op", "lora_unet_down_blocks_0_downsamplers_0_conv"), U + "input_blocks.3.0.op.weight", None),
        (("lora_unet_output_blocks_2_2_conv", "lora_unet_up_blocks_0_upsamplers_0_conv"), U + "output_blocks.2.2.conv.weight", None),
        (("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k", "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"), U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", None),
        (("lora_unet_middle_block_2_emb_layers_1", "lora_unet_mid_block_resnets_1_time_emb_proj"), U + "middle_block.2.emb_layers.1.weight", None),
        (("lora_unet_label_emb_0_0", "unet.add_embedding.linear_1"), U + "label_emb.0.0.weight", None),
        (("lora_te1_text_model_encoder_layers_3_self_attn_q_proj", "text_encoder.text_model.encoder.layers.3.self_attn.q_proj", "lora_te_text_model_encoder_layers_3_self_attn_q_proj"), L + "encoder.layers.3.self_attn.q_proj.weight", None),
        (("lora_te2_text_model_encoder_layers_5_self_attn_v_proj", "text_encoder_2.text_model.encoder.layers.5.self_attn.v_proj",
          "text_encoder_2.encoder.layers.5.self_attn.v_proj"), G + "transformer.resblocks.5.attn.in_proj_weight", 2),
        (("text_encoder.encoder.layers.3.mlp.fc2",), L + "encoder.layers.3.mlp.fc2.weight", None),
        (("lora_te2_text_model_encoder_layers_5_mlp_fc1",), G + "transformer.resblocks.5.mlp.c_fc.weight", None),
        (("down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",), None, None),
    ],
)
def test_spellings_of_one_module(names, key, block):
    for name in names:
        target = target_of(name)
        if key is None:
            assert target is None  # the processor spelling is normalised by parse_lora, not here
            continue
        assert target is not None and target.weight == key and target.block == block, name


def test_clip_g_text_projection_is_transposed():
    t = target_of("text_encoder_2.text_projection")
    assert t is not None and t.weight == G + "text_projection" and t.transpose


def test_names_are_unique():
    table = module_targets()
    assert len(table) > 4000
    assert target_of("lora_unet_input_blocks_10_1_proj_in") is None  # SD1's 12 input blocks


def _shapes(**named):
    return {k: tuple(v) for k, v in named.items()}


def test_parse_groups_components_and_kinds():
    names = [
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight",
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight",
        "lora_unet_input_blocks_4_1_proj_in.alpha",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_b",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w2_a",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w2_b",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.dora_scale",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
        "lora_unet_input_blocks_5_1_proj_in.lokr_w1",
        "lora_unet_input_blocks_5_1_proj_in.lokr_w2_a",
        "lora_unet_input_blocks_5_1_proj_in.lokr_w2_b",
        "bundle_emb.mytoken.string_to_param.*",
    ]
    layout = parse_lora(names)
    assert not layout.problems and not layout.unmapped
    kinds = {m.name: m.kind for m in layout.modules.values()}
    assert kinds == {
        "lora_unet_input_blocks_4_1_proj_in": "lora",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": "loha",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": "lora",
        "lora_unet_input_blocks_5_1_proj_in": "lokr",
    }
    assert layout.modules["lora_te1_text_model_encoder_layers_0_mlp_fc1"].dora
    assert layout.ignored == ["bundle_emb.mytoken.string_to_param.*"]
    assert layout.modules["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"].target.weight == (
        U + "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.weight"
    )


def test_parse_reports_unknown_incomplete_mixed_and_unmapped():
    layout = parse_lora(
        [
            "lora_unet_input_blocks_4_1_proj_in.oft_blocks",  # OFT: not read
            "lora_unet_input_blocks_4_1_proj_out.lora_down.weight",  # no lora_up
            "lora_unet_input_blocks_5_1_proj_in.lora_down.weight",
            "lora_unet_input_blocks_5_1_proj_in.hada_w1_a",
            "lora_unet_nonexistent_block.lora_down.weight",
            "lora_unet_nonexistent_block.lora_up.weight",
        ]
    )
    problems = dict(layout.problems)
    assert "is not a LoRA/LyCORIS component" in problems["lora_unet_input_blocks_4_1_proj_in.oft_blocks"]
    assert "lacks up" in problems["lora_unet_input_blocks_4_1_proj_out"]
    assert "mixes" in problems["lora_unet_input_blocks_5_1_proj_in"]
    assert layout.unmapped == ["lora_unet_nonexistent_block"]


@pytest.mark.parametrize(
    "components, shapes, rows_cols, rank",
    [
        ({"down": "d", "up": "u"}, {"d": (4, 640), "u": (320, 4)}, (320, 640), 4),
        ({"down": "d", "up": "u"}, {"d": (8, 320, 3, 3), "u": (640, 8, 1, 1)}, (640, 2880), 8),
        ({"down": "d", "up": "u", "mid": "m"}, {"d": (8, 320, 1, 1), "u": (640, 8, 1, 1), "m": (8, 8, 3, 3)}, (640, 2880), 8),
        ({"hada_w1_a": "a", "hada_w1_b": "b", "hada_w2_a": "c", "hada_w2_b": "e"}, {"a": (64, 2), "b": (2, 32), "c": (64, 2), "e": (2, 32)}, (64, 32), 2),
        ({"lokr_w1": "a", "lokr_w2_a": "b", "lokr_w2_b": "c"}, {"a": (4, 4), "b": (16, 3), "c": (3, 8)}, (64, 32), 3),
        ({"lokr_w1": "a", "lokr_w2": "b"}, {"a": (4, 4), "b": (16, 8)}, (64, 32), None),
    ],
)
def test_delta_shape_and_rank_from_factor_shapes(components, shapes, rows_cols, rank):
    kind = "lora" if "down" in components else ("loha" if "hada_w1_a" in components else "lokr")
    from mergekit_sdxl.sdxl.lora_keys import LoraModule

    module = LoraModule("m", kind, components, target_of("lora_unet_input_blocks_4_1_proj_in"))  # type: ignore[arg-type]
    assert delta_shape(module, shapes) == rows_cols
    assert rank_of(module, shapes) == rank


def test_delta_shape_refuses_factors_that_do_not_multiply():
    from mergekit_sdxl.sdxl.lora_keys import LoraModule

    module = LoraModule("m", "lora", {"down": "d", "up": "u"}, target_of("lora_unet_input_blocks_4_1_proj_in"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="module m: lora_up and lora_down do not multiply"):
        delta_shape(module, {"d": (4, 64), "u": (32, 8)})


def _header(shapes, metadata=None):
    tensors = {}
    offset = 0
    for name, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod()) if shape else 2
        tensors[name] = TensorInfo("F16", tuple(shape), (offset, offset + n))
        offset += n
    return SafetensorsHeader(tensors=tensors, metadata=dict(metadata or {}), header_size=0, file_size=offset)


def _kohya(prefix, rank, inp, out, conv=False):
    down = (rank, inp, 3, 3) if conv else (rank, inp)
    up = (out, rank, 1, 1) if conv else (out, rank)
    return {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up, f"{prefix}.alpha": ()}


def test_detect_sdxl_locon_from_metadata():
    shapes = {
        **_kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 8, 2048, 640),
        **_kohya("lora_unet_input_blocks_1_0_in_layers_2", 4, 320, 320, conv=True),
        **_kohya("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 8, 1280, 1280),
    }
    header = _header(shapes, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert is_lora_header(header)
    det = detect_lora(header)
    assert det.family == "sdxl-base" and "ss_base_model_version" in det.family_source
    assert det.network == "LoCon" and det.ranks == (4, 8) and det.rank_text == "4-8"
    assert det.components == {"unet": 2, "clip_g": 1}


@pytest.mark.parametrize(
    "shapes, metadata, family",
    [
        (_kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 4, 768, 768), {}, "sd1"),
        (_kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 4, 1024, 1024), {}, "sd2"),
        (_kohya("lora_unet_down_blocks_0_attentions_0_proj_in", 4, 320, 320), {}, "sd1"),
        (_kohya("lora_unet_double_blocks_0_img_attn_qkv", 4, 3072, 9216), {}, "flux"),
        (_kohya("lora_unet_input_blocks_4_1_proj_in", 4, 64, 64), {"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1"),
        (_kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 4, 2048, 640), {}, "sdxl-base"),
        (_kohya("lora_unet_input_blocks_4_1_proj_in", 4, 64, 64), {}, "sdxl-base"),  # sgm names, tiny widths
        (_kohya("lora_unet_input_blocks_4_1_proj_in", 4, 64, 64), {"ss_base_model_version": "sd_v1"}, "sd1"),
    ],
)
def test_detect_family(shapes, metadata, family):
    assert detect_lora(_header(shapes, metadata)).family == family


def test_a_checkpoint_is_not_a_lora_header():
    assert not is_lora_header(_header({U + "input_blocks.0.0.weight": (320, 4, 3, 3), U + "out.2.bias": (4,)}))
