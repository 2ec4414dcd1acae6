"""The example configs in configs/: each loads as a mergekit MergeConfiguration and plans through
mergekit (with placeholder paths replaced by tiny files made here)."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import yaml

from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl
from mergekit_sdxl.workflow.recipe import METHOD_PARAMETERS
from tests.paths import CONFIGS

SDXL_CONFIGS = ["astolfomix-xl-tgmd.yaml", "ties-soup.yaml", "block-weights.yaml", "vae-from-model.yaml", "tgmd-unet-base-text-encoders.yaml"]
LLM_CONFIGS = ["llm-tgmd.yaml"]
PLACEHOLDER = re.compile(r"/path/to/[A-Za-z0-9_./+@-]+")


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(SDXL_CONFIGS + LLM_CONFIGS)


@pytest.fixture(scope="module")
def sdxl_template(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg_sdxl") / "template.safetensors"
    write_synthetic_sdxl(p, width=1 / 64, seed=0)
    return p


@pytest.fixture(scope="module")
def llama_template(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("cfg_llama") / "llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(str(d), safe_serialization=True)
    return d


def materialize(name: str, tmp_path: Path, sdxl_template: Path, llama_template=None) -> str:
    """Config text with every /path/to/... placeholder replaced by a real file or folder."""
    lines = (CONFIGS / name).read_text().splitlines(keepends=True)
    code = [i for i, line in enumerate(lines) if not line.lstrip().startswith("#")]  # comments keep theirs
    placeholders = sorted({ph for i in code for ph in PLACEHOLDER.findall(lines[i].split(" #")[0])})
    assert placeholders, f"{name} has no placeholder paths"
    for ph in placeholders:
        real = tmp_path / ph[len("/path/to/"):]
        real.parent.mkdir(parents=True, exist_ok=True)
        if ph.endswith(".safetensors"):
            shutil.copy(sdxl_template, real)
        else:
            assert llama_template is not None
            shutil.copytree(llama_template, real)
        for i in code:
            lines[i] = lines[i].replace(ph, str(real))
    text = "".join(lines)
    assert "/path/to/" not in yaml.safe_dump(yaml.safe_load(text))
    return text


@pytest.mark.parametrize("name", SDXL_CONFIGS)
def test_sdxl_config_loads(name, tmp_path, sdxl_template):
    from mergekit.config import MergeConfiguration

    raw = (CONFIGS / name).read_text()
    cfg = MergeConfiguration.model_validate(yaml.safe_load(raw))  # placeholders parse as paths too
    text = materialize(name, tmp_path, sdxl_template)
    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    assert cfg.base_model is not None and Path(cfg.base_model.model.path).is_file()
    for m in cfg.models:
        assert Path(m.model.model.path).is_file() and m.model.lora is None
    assert cfg.out_dtype == "float16"


def test_reference_parameters_are_exact():
    astolfo = yaml.safe_load((CONFIGS / "astolfomix-xl-tgmd.yaml").read_text())
    assert astolfo["merge_method"] == "tgmd"
    assert astolfo["parameters"] == METHOD_PARAMETERS["tgmd"] == {
        "drop_rate": 0.1, "density": 1.0, "rescale": 0.0, "sign_election": "count", "aggregate": "median",
        "eps": 1e-6, "maxiter": 100, "ftol": 1e-20, "lambda": 1.0, "seed": 240603,
    }
    assert astolfo["dtype"] == "float64" and astolfo["out_dtype"] == "float16"
    soup = yaml.safe_load((CONFIGS / "ties-soup.yaml").read_text())
    assert soup["merge_method"] == "ties_soup"
    assert soup["parameters"]["aggregate"] == "mean" and soup["parameters"]["drop_rate"] == 0.0
    vae = yaml.safe_load((CONFIGS / "vae-from-model.yaml").read_text())
    assert vae["sdxl"]["vae"]["source"].endswith("model_with_good_vae.safetensors")
    bw = yaml.safe_load((CONFIGS / "block-weights.yaml").read_text())
    assert bw["models"][0]["parameters"]["weight"] == [0.0, 0.5, 1.0]
    assert bw["models"][1]["parameters"]["weight"][0] == {"filter": "input_blocks", "value": 0.2}


def test_llm_config_loads(tmp_path, sdxl_template, llama_template):
    from mergekit.config import MergeConfiguration

    text = materialize("llm-tgmd.yaml", tmp_path, sdxl_template, llama_template)
    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    assert cfg.merge_method == "tgmd" and len(cfg.models) == 3
    assert Path(cfg.base_model.model.path, "config.json").is_file()


# --- planning through mergekit (the lead's driver/planner) -------------------------------------

HAVE_DRIVER = importlib.util.find_spec("mergekit_sdxl.host.driver") is not None


def _plan(text: str):
    """Plan without executing, through mergekit's public ``plan_to_disk`` as both commands do:
    SDXL configs with ``mergekit-sdxl merge``'s planner, others with the stock planner (which
    the plugin's patches extend). Returns the config and the planned (key name, task) pairs."""
    from mergekit_sdxl.host.driver import load_config
    from mergekit_sdxl.host.mergekit_api import (
        LoaderCache,
        MergeOptions,
        MergePlanner,
        SaveTensor,
        get_architecture_info,
    )
    from mergekit_sdxl.host.planner import SDXLMergePlanner, SDXLRules
    from mergekit_sdxl.host.plugin import register_all

    register_all()
    loaded = load_config(text)
    options = MergeOptions()
    LoaderCache().setup(options=options)
    arch = get_architecture_info(loaded.config, options)
    donor = loaded.config.base_model or loaded.config.referenced_models()[0]
    out_cfg = donor.config(trust_remote_code=False)
    if "SDXLCheckpoint" in arch.architectures:
        planner = SDXLMergePlanner(loaded.config, arch, options=options, out_model_config=out_cfg, rules=SDXLRules(options=loaded.sdxl))
    else:
        planner = MergePlanner(loaded.config, arch, options=options, out_model_config=out_cfg)
    saves = [t for t in planner.plan_to_disk("unused") if isinstance(t, SaveTensor)]
    return loaded, [(t.tensor_name, t.tensor_task) for t in saves]


@pytest.mark.skipif(not HAVE_DRIVER, reason="TODO: mergekit planning of SDXL (mergekit_sdxl.host.driver) not available yet")
@pytest.mark.parametrize("name", SDXL_CONFIGS)
def test_sdxl_config_plans(name, tmp_path, sdxl_template):
    text = materialize(name, tmp_path, sdxl_template)
    loaded, planned = _plan(text)
    names = {name for name, _ in planned}
    assert len(names) >= 2514
    assert "model.diffusion_model.input_blocks.0.0.weight" in names
    assert "first_stage_model.decoder.conv_out.weight" in names
    if name == "vae-from-model.yaml":
        source = loaded.sdxl.vae.source
        assert source.endswith("model_with_good_vae.safetensors")
        vae_tasks = [t for name, t in planned if name.startswith("first_stage_model.")]
        donors = {str(t.model.model.path) for t in vae_tasks if hasattr(t, "model")}
        assert donors == {source}


@pytest.mark.skipif(not HAVE_DRIVER, reason="TODO: mergekit planning (mergekit_sdxl.host.driver) not available yet")
def test_llm_config_plans(tmp_path, sdxl_template, llama_template):
    text = materialize("llm-tgmd.yaml", tmp_path, sdxl_template, llama_template)
    _, planned = _plan(text)
    names = {name for name, _ in planned}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.embed_tokens.weight" in names
