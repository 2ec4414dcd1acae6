"""Provenance: metadata dict, sidecar JSON, model card (io/provenance.py)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_sdxl.io.provenance import (
    InputInfo,
    build_metadata,
    input_info,
    legacy_hash,
    read_provenance,
    sidecar_paths,
    write_sidecars,
)

RECIPE = """merge_method: tgmd
base_model: {model: {path: "/m/base.safetensors"}}
models:
  - model: {model: {path: "/m/a+b@c.safetensors"}}
parameters:
  drop_rate: 0.1
  seed: 240603
dtype: float64
out_dtype: float16
"""


def _file(path, n_bytes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, generator=g)
    save_file({"w": t}, str(path))
    return path


@pytest.fixture
def inputs(tmp_path):
    from mergekit_sdxl.io.hashing import HashCache

    cache = HashCache(tmp_path / "cache")
    base = input_info(_file(tmp_path / "base.safetensors", 2_000_000, 1), role="base", cache=cache)
    other = input_info(_file(tmp_path / "a+b@c.safetensors", 300_000, 2), role="model", cache=cache)
    return [base, other]


def _meta(inputs, **kw):
    args = dict(method="tgmd", seed=240603, dtype="float64", out_dtype="float16", title="My Merge",
                prediction_type="epsilon", plugin_version="0.1.0", mergekit_version="0.1.5")
    args.update(kw)
    return build_metadata(RECIPE, inputs, **args)


def test_input_info_hashes(inputs, tmp_path):
    base, other = inputs
    raw = (tmp_path / "base.safetensors").read_bytes()
    assert base.sha256 == hashlib.sha256(raw).hexdigest()
    assert base.autov2 == base.sha256[:10]
    assert base.size == len(raw)
    assert base.legacy_hash == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    # a file shorter than 1 MiB hashes the empty string (A1111 behaviour)
    assert other.legacy_hash == hashlib.sha256(b"").hexdigest()[:8] == legacy_hash(other.path)
    assert other.name == "a+b@c.safetensors"


def test_metadata_all_strings_and_keys(inputs):
    meta = _meta(inputs)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["mergekit_sdxl.recipe"] == RECIPE
    assert meta["mergekit_sdxl.version"] == "0.1.0"
    assert meta["mergekit.version"] == "0.1.5"
    assert meta["mergekit_sdxl.seed"] == "240603"
    assert meta["mergekit_sdxl.dtype"] == "float64" and meta["mergekit_sdxl.out_dtype"] == "float16"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.implementation"] == "sgm"
    assert meta["modelspec.title"] == "My Merge"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert not any("date" in k for k in meta)
    recs = json.loads(meta["mergekit_sdxl.inputs"])
    assert [r["name"] for r in recs] == ["base.safetensors", "a+b@c.safetensors"]
    assert [r["sha256"] for r in recs] == [i.sha256 for i in inputs]
    assert [r["autov2"] for r in recs] == [i.autov2 for i in inputs]
    assert [r["size"] for r in recs] == [i.size for i in inputs]
    assert [r["role"] for r in recs] == ["base", "model"]
    models = json.loads(meta["sd_merge_models"])
    assert set(models) == {i.sha256 for i in inputs}
    assert models[inputs[0].sha256] == {"name": "base.safetensors", "legacy_hash": inputs[0].legacy_hash, "sd_merge_recipe": None}
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["type"] == "mergekit-sdxl" and recipe["merge_method"] == "tgmd"
    assert recipe["base_model_hash"] == inputs[0].sha256
    assert recipe["model_hashes"] == [inputs[1].sha256]
    assert recipe["parameters"] == {"drop_rate": 0.1, "seed": 240603}


def test_metadata_is_deterministic_and_v_prediction(inputs):
    assert _meta(inputs) == _meta(inputs)
    assert _meta(inputs, prediction_type="v")["modelspec.prediction_type"] == "v"
    assert _meta(inputs, prediction_type="v_prediction")["modelspec.prediction_type"] == "v"
    with pytest.raises(ValueError):
        _meta(inputs, prediction_type="flow")


def test_metadata_accepts_lead_style_input_info(tmp_path):
    # InputInfo(path, size, sha256, autov2) without role/legacy_hash: legacy hash computed from the path
    p = _file(tmp_path / "x.safetensors", 10)
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    meta = build_metadata(RECIPE, [InputInfo(path=str(p), size=p.stat().st_size, sha256=sha, autov2=sha[:10])], method="linear")
    assert json.loads(meta["sd_merge_models"])[sha]["legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]
    assert "role" not in json.loads(meta["mergekit_sdxl.inputs"])[0]
    assert meta["mergekit_sdxl.seed"] == ""


def test_metadata_round_trips_through_a_safetensors_file(inputs, tmp_path):
    meta = _meta(inputs)
    out = tmp_path / "merged.safetensors"
    save_file({"x": torch.zeros(2)}, str(out), metadata=meta)
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == meta
    from mergekit_sdxl.sdxl.header import read_header

    prov = read_provenance(read_header(out).metadata)
    assert prov["tool"] == "mergekit-sdxl" and prov["method"] == "tgmd" and prov["recipe"] == RECIPE
    assert [i["sha256"] for i in prov["inputs"]] == [i.sha256 for i in inputs]
    assert prov["modelspec"]["architecture"] == "stable-diffusion-xl-v1-base"
    assert read_provenance({"format": "pt"}) is None
    assert read_provenance({}) is None


def test_write_sidecars(inputs, tmp_path):
    meta = _meta(inputs)
    out = tmp_path / "My Merge.safetensors"
    save_file({"x": torch.zeros(2)}, str(out), metadata=meta)
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    jp, mp = write_sidecars(out, meta, sha, sha[:10], inputs, config_name="my.yaml")
    assert (jp, mp) == sidecar_paths(out)
    assert jp.name == "My Merge.safetensors.json" and mp.name == "My Merge.md"
    doc = json.loads(jp.read_text())
    assert doc["sha256"] == sha and doc["autov2"] == sha[:10] and doc["size"] == out.stat().st_size
    assert doc["metadata"] == meta
    assert [i["sha256"] for i in doc["inputs"]] == [i.sha256 for i in inputs]
    card = mp.read_text()
    assert sha in card and sha[:10] in card
    for i in inputs:
        assert i.sha256 in card and i.autov2 in card
    assert "| 1 | base | base.safetensors |" in card
    assert "mergekit-sdxl merge my.yaml 'My Merge.safetensors'" in card
    # the recipe is in the card verbatim, and parses
    block = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == yaml.safe_load(RECIPE)
    assert "`drop_rate`" in card
    # deterministic: writing twice gives identical files
    before = (jp.read_bytes(), mp.read_bytes())
    write_sidecars(out, meta, sha, sha[:10], inputs, config_name="my.yaml")
    assert (jp.read_bytes(), mp.read_bytes()) == before
