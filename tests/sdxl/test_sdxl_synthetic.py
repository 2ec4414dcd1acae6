
import pytest
import torch
from safetensors import safe_open

from mergekit_sdxl.sdxl.header import read_header
from mergekit_sdxl.sdxl.manifest import SDXL_KEYS
from mergekit_sdxl.sdxl.tiny import synthetic_shapes, write_synthetic_sdxl

G = "conditioner.embedders.1.model."
L = "conditioner.embedders.0.transformer.text_model."
POS = L + "embeddings.position_ids"


def test_full_width_shapes_equal_manifest():
    shapes = synthetic_shapes(1.0)
    assert shapes == {k: v.shape for k, v in SDXL_KEYS.items()}


def test_scaled_shapes_rules():
    s = synthetic_shapes(1 / 16)
    assert list(s) == list(SDXL_KEYS)
    assert s[G + "token_embedding.weight"] == (49408, 80)
    assert s[L + "embeddings.token_embedding.weight"] == (49408, 48)
    assert s[G + "positional_embedding"] == (77, 80)
    assert s[POS] == (1, 77)
    assert s[G + "transformer.resblocks.0.attn.in_proj_weight"] == (240, 80)
    assert s[G + "logit_scale"] == ()
    assert s["model.diffusion_model.input_blocks.0.0.weight"] == (24, 4, 3, 3)
    assert s["first_stage_model.decoder.mid.attn_1.q.weight"] == (32, 32, 1, 1)
    assert s["first_stage_model.decoder.conv_out.weight"] == (3, 8, 3, 3)
    for shape in s.values():
        assert all(d > 0 for d in shape)
    with pytest.raises(ValueError):
        synthetic_shapes(0)


def test_write_synthetic(synthetic_sdxl_factory):
    p = synthetic_sdxl_factory("a", seed=0)
    h = read_header(p)
    assert set(h.tensors) == set(SDXL_KEYS)
    shapes = synthetic_shapes(1 / 16)
    assert {k: v.shape for k, v in h.tensors.items()} == shapes
    assert h.tensors[POS].dtype == "I64"
    assert all(v.dtype == "F16" for k, v in h.tensors.items() if k != POS)
    assert h.metadata == {}
    assert 25e6 < h.file_size < 60e6
    with safe_open(str(p), "pt") as f:
        assert torch.equal(f.get_tensor(POS), torch.arange(77)[None])
        ls = f.get_tensor(G + "logit_scale")
        assert ls.shape == () and abs(float(ls) - 4.6052) < 0.1
        w = f.get_tensor("model.diffusion_model.out.2.weight").float()
        assert torch.isfinite(w).all() and w.std() > 0


def test_seeds_base_and_determinism(synthetic_sdxl_factory):
    base = synthetic_sdxl_factory("base", seed=0)
    again = synthetic_sdxl_factory("base2", seed=0)
    other = synthetic_sdxl_factory("other", seed=1)
    ft = synthetic_sdxl_factory("ft", seed=1, base=base, noise=0.01)
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    with safe_open(str(base), "pt") as fb, safe_open(str(again), "pt") as fa, safe_open(
        str(other), "pt"
    ) as fo, safe_open(str(ft), "pt") as ff:
        b = fb.get_tensor(key).float()
        assert torch.equal(b, fa.get_tensor(key).float())
        assert not torch.equal(b, fo.get_tensor(key).float())
        d = ff.get_tensor(key).float() - b
        assert 0.005 < d.std() < 0.02
        assert torch.equal(ff.get_tensor(POS), torch.arange(77)[None])


def test_drop_and_extra_keys(synthetic_sdxl_factory):
    full = synthetic_sdxl_factory("full", seed=3)
    p = synthetic_sdxl_factory(
        "x",
        seed=3,
        drop_keys=[POS, G + "logit_scale"],
        extra_keys={"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])},
        dtype=torch.float32,
    )
    h = read_header(p)
    assert set(h.tensors) == (set(SDXL_KEYS) - {POS, G + "logit_scale"}) | {"v_pred", "ztsnr"}
    assert h.tensors["v_pred"].shape == (0,)
    assert h.tensors["model.diffusion_model.out.0.weight"].dtype == "F32"
    # values per key do not depend on which other keys exist
    k = "first_stage_model.encoder.conv_in.weight"
    with safe_open(str(full), "pt") as a, safe_open(str(p), "pt") as b:
        assert torch.equal(a.get_tensor(k), b.get_tensor(k).half())


def test_base_shape_mismatch(tmp_path):
    base = tmp_path / "b.safetensors"
    write_synthetic_sdxl(base, width=1 / 16)
    with pytest.raises(ValueError, match="expected"):
        write_synthetic_sdxl(tmp_path / "c.safetensors", width=1 / 8, base=base)
