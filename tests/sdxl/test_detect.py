"""Family detection and key differences from headers (sdxl/detect.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mergekit_sdxl.sdxl.detect import FAMILIES, Detection, detect
from mergekit_sdxl.sdxl.header import SafetensorsHeader, TensorInfo, read_header
from mergekit_sdxl.sdxl.manifest import OPTIONAL_KEYS, SDXL_KEYS
from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

W = 1 / 64  # smallest synthetic width: ~6 MB per file

U = "model.diffusion_model."
CG = "conditioner.embedders.1.model."
CL = "conditioner.embedders.0.transformer.text_model."
TP = CG + "text_projection"
POS = CL + "embeddings.position_ids"


def header_of(shapes, dtype="F16", metadata=None) -> SafetensorsHeader:
    """An in-memory header (no file): lets us test full-size SDXL shapes for free."""
    tensors = {}
    off = 0
    for k, s in shapes.items():
        dt = dtype if not isinstance(s, tuple) or k != POS else "I64"
        if isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], str):
            s, dt = s
        n = 1
        for d in s:
            n *= d
        nb = n * (8 if dt in ("I64", "F64") else 4 if dt == "F32" else 2)
        tensors[k] = TensorInfo(dt, tuple(s), (off, off + nb))
        off += nb
    return SafetensorsHeader(tensors, dict(metadata or {}), 0, off + 8)


def full_sdxl_shapes():
    return {k: tuple(v.shape) for k, v in SDXL_KEYS.items()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("detect")
    p = d / "base.safetensors"
    write_synthetic_sdxl(p, width=W, seed=0)
    return p


def test_synthetic_sdxl_is_base_family_and_clean(synth):
    det = detect(read_header(synth))
    assert det.family == "sdxl-base"
    assert det.scaled is True
    assert det.missing == [] and det.extra == [] and det.wrong_shape == [] and det.missing_optional == []
    assert det.v_pred is False and det.ztsnr is False and det.prediction_type == "epsilon"
    assert det.dtype == "float16"
    assert det.in_channels == 4
    assert det.n_tensors == len(SDXL_KEYS) == 2515
    assert det.merged_recipe is None
    json.dumps(det.to_dict())  # JSON-ready


def test_full_size_header_is_not_scaled_and_reports_wrong_shapes():
    shapes = full_sdxl_shapes()
    det = detect(header_of(shapes))
    assert det.family == "sdxl-base" and det.scaled is False and det.wrong_shape == []
    key = U + "output_blocks.0.0.in_layers.2.weight"
    shapes[key] = (1280, 2560, 3, 1)
    det = detect(header_of(shapes))
    assert det.wrong_shape == [(key, tuple(SDXL_KEYS[key].shape), (1280, 2560, 3, 1))]


def test_vae_attention_2d_variant_is_not_a_wrong_shape():
    shapes = full_sdxl_shapes()
    k = "first_stage_model.decoder.mid.attn_1.q.weight"
    assert shapes[k] == (512, 512, 1, 1)
    shapes[k] = (512, 512)
    assert detect(header_of(shapes)).wrong_shape == []


def test_scaled_file_checks_rank_only(tmp_path):
    p = tmp_path / "s.safetensors"
    k = U + "input_blocks.1.0.in_layers.2.weight"
    write_synthetic_sdxl(p, width=W, seed=1, drop_keys=[k], extra_keys={k: torch.zeros(8, 8)})
    det = detect(read_header(p))
    assert det.scaled
    assert [w[0] for w in det.wrong_shape] == [k]
    assert det.wrong_shape[0][2] == (8, 8)


def test_flags_variants_and_extra_keys(tmp_path):
    p = tmp_path / "v.safetensors"
    tp_val = torch.zeros(8, 8, dtype=torch.float16)
    write_synthetic_sdxl(
        p,
        width=W,
        seed=2,
        drop_keys=[TP, POS, U + "out.2.bias"],
        extra_keys={
            "v_pred": torch.tensor([]),
            "ztsnr": torch.tensor([]),
            TP + ".weight": tp_val,
            "model_ema.decay": torch.tensor(0.999),
            "lora_unet_down_blocks_0.alpha": torch.tensor(1.0),
            "alphas_cumprod": torch.ones(1000),
        },
    )
    det = detect(read_header(p))
    assert det.family == "sdxl-base"
    assert det.v_pred and det.ztsnr and det.prediction_type == "v"
    # text_projection.weight stands for text_projection; flags are not "extra"
    assert TP not in det.missing
    assert det.extra == sorted(["model_ema.decay", "lora_unet_down_blocks_0.alpha", "alphas_cumprod"])
    assert det.extra_kinds == {"ema": 1, "lora": 1, "schedule": 1}
    # position_ids is optional, out.2.bias is not
    assert det.missing == [U + "out.2.bias"]
    assert det.missing_optional == [POS]
    assert POS in OPTIONAL_KEYS
    # a v_pred marker tensor does not change the majority dtype
    assert det.dtype == "float16"


def test_inpaint_and_ip2p_by_input_channels(tmp_path):
    k = U + "input_blocks.0.0.weight"
    for ch, fam in ((9, "sdxl-inpaint"), (8, "unknown")):
        p = tmp_path / f"c{ch}.safetensors"
        write_synthetic_sdxl(p, width=W, seed=3, drop_keys=[k], extra_keys={k: torch.zeros(24, ch, 3, 3, dtype=torch.float16)})
        det = detect(read_header(p))
        assert det.family == fam, ch
        assert det.in_channels == ch
        if fam == "sdxl-inpaint":
            assert det.wrong_shape == [] and det.missing == []
        else:
            assert any("pix2pix" in n for n in det.notes)


def _write(path, keys, dtype=torch.float16):
    save_file({k: torch.zeros(s, dtype=dtype) for k, s in keys.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "keys,family",
    [
        ({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (10, 8), U + "input_blocks.0.0.weight": (32, 4, 3, 3)}, "sd1"),
        ({"cond_stage_model.model.token_embedding.weight": (10, 8), U + "input_blocks.0.0.weight": (32, 4, 3, 3)}, "sd2"),
        ({"conditioner.embedders.0.model.token_embedding.weight": (10, 8), U + "input_blocks.0.0.weight": (24, 4, 3, 3)}, "sdxl-refiner"),
        ({U + "joint_blocks.0.x_block.attn.qkv.weight": (12, 4)}, "sd3"),
        ({"double_blocks.0.img_attn.qkv.weight": (12, 4), "img_in.weight": (4, 4)}, "flux"),
        ({U + "double_blocks.0.img_attn.qkv.weight": (12, 4)}, "flux"),
        ({"encoder.weight": (4, 4)}, "unknown"),
        ({}, "unknown"),
    ],
)
def test_other_families_by_key_names(tmp_path, keys, family):
    det = detect(read_header(_write(tmp_path / "f.safetensors", keys)))
    assert det.family == family
    assert family in FAMILIES
    # key differences are only computed for SDXL base/inpaint
    assert det.missing == [] and det.extra == []


def test_unet_only_fallback_on_context_width():
    shapes = {U + "input_blocks.0.0.weight": (320, 4, 3, 3), U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}
    assert detect(header_of(shapes)).family == "sd1"
    shapes[U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (320, 1024)
    assert detect(header_of(shapes)).family == "sd2"
    shapes[U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (640, 2048)
    det = detect(header_of(shapes))
    assert det.family == "sdxl-base" and len(det.missing) > 2000


def test_majority_dtype_by_elements():
    shapes = {
        U + "label_emb.0.0.weight": ((80, 176), "BF16"),
        CL + "embeddings.token_embedding.weight": ((49408, 48), "BF16"),
        CG + "token_embedding.weight": ((49408, 80), "F32"),
        POS: ((1, 77), "I64"),
    }
    det = detect(header_of(shapes))
    assert det.dtype == "float32"
    assert any("mixed float dtypes" in n for n in det.notes)


def test_vpred_from_modelspec_metadata():
    det = detect(header_of(full_sdxl_shapes(), metadata={"modelspec.prediction_type": "v"}))
    assert det.v_pred


def test_merged_recipe_from_metadata():
    from mergekit_sdxl.io.provenance import InputInfo, build_metadata

    infos = [InputInfo(path="/x/base.safetensors", size=1, sha256="a" * 64, autov2="a" * 10, role="base", legacy_hash="00000000")]
    meta = build_metadata("merge_method: tgmd\n", infos, method="tgmd", seed=1, dtype="float64", out_dtype="float16",
                          title="t", prediction_type="epsilon", plugin_version="0.1.0", mergekit_version="0.1.5")
    det = detect(header_of(full_sdxl_shapes(), metadata=meta))
    assert det.merged_recipe is not None
    assert det.merged_recipe["tool"] == "mergekit-sdxl"
    assert det.merged_recipe["recipe"] == "merge_method: tgmd\n"
    assert [i["sha256"] for i in det.merged_recipe["inputs"]] == ["a" * 64]
    a1111 = {"sd_merge_recipe": json.dumps({"type": "webui", "primary_model_hash": "b" * 64}),
             "sd_merge_models": json.dumps({"b" * 64: {"name": "x.safetensors", "legacy_hash": "12345678"}})}
    rec = detect(header_of(full_sdxl_shapes(), metadata=a1111)).merged_recipe
    assert rec["tool"] == "a1111" and rec["inputs"][0]["name"] == "x.safetensors"


def test_detection_is_dataclass_with_defaults():
    d = Detection(family="unknown")
    assert d.to_dict()["wrong_shape"] == [] and not d.is_sdxl
