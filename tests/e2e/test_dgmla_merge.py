"""End to end: ``merge_method: dgmla`` on width-scaled SDXL single files, by name from a mergekit
YAML config, through the stock ``mergekit-yaml`` and ``mergekit-sdxl merge`` (with and without a
small memory budget): the same bytes everywhere, the DELLA kernel's values, the method's version in
the output's metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_sdxl.kernels.tgmd import TGMDParams, tgmd_merge
from mergekit_sdxl.method_versions import METHOD_VERSIONS
from mergekit_sdxl.sdxl.manifest import SDXL_KEYS

pytestmark = pytest.mark.slow  # starts mergekit-yaml / mergekit-sdxl processes

BIN = Path(sys.executable).parent
NAMES = ("a.safetensors", "b.safetensors", "c.safetensors")
KEYS = (
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",  # UNet conv
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",  # CLIP-G
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",  # CLIP-L
)


def _run(args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd)
    if result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    root = tmp_path_factory.mktemp("dgmla")
    write_synthetic_sdxl(root / "base.safetensors", width=1 / 32, seed=0)
    for i, name in enumerate(NAMES):
        write_synthetic_sdxl(root / name, width=1 / 32, seed=i + 1, base=root / "base.safetensors")
    return root


def _config(folder: Path, method: str, **parameters) -> Path:
    # Bare file names, run in the folder: the masks depend on the model as written in the config.
    text = yaml.safe_dump(
        {
            "merge_method": method,
            "base_model": "base.safetensors",
            "models": [{"model": name} for name in NAMES],
            "parameters": {"seed": 241011, **parameters},
            "dtype": "float64",
            "out_dtype": "float16",
        },
        sort_keys=False,
    )
    path = folder / f"{method}.yaml"
    path.write_text(text)
    return path


def _expected(folder: Path, key: str, params: TGMDParams) -> torch.Tensor:
    base = load_file(folder / "base.safetensors")[key].double()
    models = [load_file(folder / name)[key].double() for name in NAMES]
    return tgmd_merge(base, models, params, torch.float64, tensor_name=key, model_keys=list(NAMES)).to(torch.float16)


def test_dgmla_by_name_merges_sdxl_the_same_everywhere(folder):
    config = _config(folder, "dgmla")
    _run([str(BIN / "mergekit-yaml"), str(config), "stock", "--no-copy-tokenizer"], cwd=folder)
    stock = load_file(folder / "stock" / "model.safetensors")
    _run([str(BIN / "mergekit-sdxl"), "merge", str(config), "plugin.safetensors"], cwd=folder)
    plugin = load_file(folder / "plugin.safetensors")
    _run([str(BIN / "mergekit-sdxl"), "merge", str(config), "budget.safetensors", "--memory-budget", "16MB"], cwd=folder)
    budget = load_file(folder / "budget.safetensors")
    assert set(plugin) == set(SDXL_KEYS) == set(budget)
    for key in SDXL_KEYS:  # DELLA masks are chunk independent: a 16 MB budget changes no byte
        assert torch.equal(plugin[key], budget[key]), key
        assert torch.equal(plugin[key], stock[key].to(plugin[key].dtype)), key

    dgmla = TGMDParams(
        drop_rate=[0.1] * 3, density=[1.0] * 3, weight=[1.0] * 3, drop_method="della", epsilon=[-0.1] * 3, seed=241011
    )
    uniform = TGMDParams(drop_rate=[0.1] * 3, density=[1.0] * 3, weight=[1.0] * 3, seed=241011)
    for key in KEYS:
        want = _expected(folder, key, dgmla)
        assert torch.equal(plugin[key], want), key
        assert not torch.equal(want, _expected(folder, key, uniform)), key  # DELLA's masks, not uniform DROP's

    with safe_open(folder / "plugin.safetensors", "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["mergekit_sdxl.method_version"]) == {"dgmla": METHOD_VERSIONS["dgmla"]}
    assert metadata["mergekit_sdxl.method"] == "dgmla"


def test_a_pin_to_another_version_of_dgmla_is_refused(folder):
    config = _config(folder, "dgmla")
    config.write_text(config.read_text() + "sdxl:\n  method_version: {dgmla: 3}\n")
    result = subprocess.run(
        [str(BIN / "mergekit-sdxl"), "merge", str(config), "refused.safetensors"], capture_output=True, text=True, cwd=folder
    )
    assert result.returncode != 0 and not (folder / "refused.safetensors").exists()
    assert "dgmla: version 3 is not implemented by this mergekit-sdxl (it runs versions 1 and 2)" in result.stderr
    assert "Traceback" not in result.stderr
