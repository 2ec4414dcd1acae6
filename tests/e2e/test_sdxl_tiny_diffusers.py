"""The tiny SDXL builder: exact manifest key names, loads in diffusers, every tensor lands where
diffusers' own sgm -> diffusers conversion puts it, and two denoising steps stay finite."""

import json
import time

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from mergekit_sdxl.sdxl.header import read_header  # noqa: E402
from mergekit_sdxl.sdxl.manifest import SDXL_KEYS  # noqa: E402
from mergekit_sdxl.sdxl.tiny import OP_QKV, sgm_name, tiny_shapes  # noqa: E402

POS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    from mergekit_sdxl.sdxl.tiny import write_tiny_sdxl

    p = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    write_tiny_sdxl(p, seed=0)
    return p


@pytest.fixture(scope="module")
def tiny_pipe(tiny_file, tiny_config_dir):
    from mergekit_sdxl.sdxl.diffusers_check import load_pipeline

    return load_pipeline(tiny_file, tiny_config_dir)


def test_key_set_equals_manifest(tiny_file):
    h = read_header(tiny_file)
    assert set(h.tensors) == set(SDXL_KEYS)
    assert h.tensors[POS].dtype == "I64" and h.tensors[POS].shape == (1, 77)
    assert all(t.dtype == "F16" for k, t in h.tensors.items() if k != POS)
    assert h.tensors["conditioner.embedders.1.model.logit_scale"].shape == ()
    assert 20e6 < h.file_size < 60e6
    shapes = {k: v[0] for k, v in tiny_shapes().items()}
    assert {k: v.shape for k, v in h.tensors.items()} == shapes
    # shape pattern: context = 32 + 64, label_emb input = 64 + 6 * 8, stacked q/k/v, square projection
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (128, 112)
    assert shapes["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == (96, 96)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (192, 64)
    assert shapes["conditioner.embedders.1.model.text_projection"] == (64, 64)
    assert shapes["first_stage_model.decoder.mid.attn_1.q.weight"] == (96, 96, 1, 1)
    # skip/nin shortcuts exactly where the manifest has them (same key set), GroupNorm-friendly widths
    assert shapes["model.diffusion_model.output_blocks.8.0.skip_connection.weight"] == (32, 64, 1, 1)


def test_every_tensor_lands_where_diffusers_puts_it(tiny_file, tiny_pipe):
    sd = {k: v.float() for k, v in load_file(str(tiny_file)).items()}
    components = {
        "unet": tiny_pipe.unet,
        "vae": tiny_pipe.vae,
        "clip_l": tiny_pipe.text_encoder,
        "clip_g": tiny_pipe.text_encoder_2,
    }
    used = set()
    for comp, model in components.items():
        for dkey, value in model.state_dict().items():
            if dkey.endswith("position_ids"):
                continue
            name, op = sgm_name(comp, dkey)
            src = sd[name]
            if op == "T":
                src = src.T
            elif op == "conv1x1":
                src = src[:, :, 0, 0]
            elif op in OP_QKV:
                n = src.shape[0] // 3
                i = OP_QKV.index(op)
                src = src[i * n : (i + 1) * n]
            assert torch.equal(value.float(), src), (comp, dkey, name)
            used.add(name)
    assert set(SDXL_KEYS) - used == {POS, "conditioner.embedders.1.model.logit_scale"}


def test_two_denoising_steps_finite(tiny_pipe):
    t = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 77, 96, generator=g)
    ppe = torch.randn(1, 64, generator=g)
    kw = dict(
        prompt_embeds=pe,
        pooled_prompt_embeds=ppe,
        negative_prompt_embeds=torch.zeros_like(pe),
        negative_pooled_prompt_embeds=torch.zeros_like(ppe),
        num_inference_steps=2,
        height=64,
        width=64,
    )
    latents = tiny_pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8)
    assert torch.isfinite(latents).all()
    decoded = tiny_pipe.vae.decode(latents / tiny_pipe.vae.config.scaling_factor).sample
    assert decoded.shape == (1, 3, 64, 64) and torch.isfinite(decoded).all()
    assert time.perf_counter() - t < 30


def test_config_dir_contents(tiny_config_dir):
    idx = json.loads((tiny_config_dir / "model_index.json").read_text())
    assert idx["_class_name"] == "StableDiffusionXLPipeline"
    for sub in ("unet/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json"):
        assert (tiny_config_dir / sub).is_file()
    assert (tiny_config_dir / "scheduler" / "scheduler_config.json").is_file()


def test_base_and_seeds(tiny_sdxl_factory):
    a = tiny_sdxl_factory("a", seed=0)
    b = tiny_sdxl_factory("b", seed=1, base=a, noise=0.01)
    c = tiny_sdxl_factory("c", seed=0)
    sa, sb, sc = load_file(str(a)), load_file(str(b)), load_file(str(c))
    k = "model.diffusion_model.middle_block.1.transformer_blocks.3.attn1.to_q.weight"
    assert torch.equal(sa[k], sc[k])
    d = sb[k].float() - sa[k].float()
    assert 0.005 < d.std() < 0.02
    assert torch.equal(sb[POS], torch.arange(77)[None])


def test_diffusers_conversion_roundtrip_without_pipeline():
    """sgm_name is the inverse of diffusers' own converter for every UNet/VAE key (names only)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from mergekit_sdxl.sdxl.tiny import TINY_UNET_CONFIG, TINY_VAE_CONFIG

    marks = {k: torch.tensor([float(i)]) for i, k in enumerate(SDXL_KEYS)}
    unet = convert_ldm_unet_checkpoint(marks, dict(TINY_UNET_CONFIG))
    for dkey, v in unet.items():
        assert marks[sgm_name("unet", dkey)[0]] is v, dkey
    vae = convert_ldm_vae_checkpoint(marks, dict(TINY_VAE_CONFIG))
    for dkey, v in vae.items():
        assert torch.equal(marks[sgm_name("vae", dkey)[0]], v), dkey
    assert len(unet) == 1680 and len(vae) == 248
