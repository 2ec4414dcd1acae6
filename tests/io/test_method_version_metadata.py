"""``mergekit_sdxl.method_version`` in a merged file's metadata (io/provenance.py): the version of
every method the config uses, read back by ``read_provenance``."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from mergekit_sdxl.io.provenance import InputInfo, build_metadata, read_provenance
from mergekit_sdxl.method_versions import METHOD_VERSIONS
from mergekit_sdxl.sdxl.header import read_header

INPUTS = [InputInfo(path="/m/base.safetensors", size=1, sha256="0" * 64, autov2="0" * 10, role="base", legacy_hash="0" * 8)]

PER_COMPONENT = """merge_method: tgmd
base_model: {model: {path: "/m/base.safetensors"}}
models:
  - model: {model: {path: "/m/a.safetensors"}}
sdxl:
  components:
    clip_l: {source: base}
    clip_g: {merge_method: linear}
    unet: {parameters: {drop_rate: 0.2}}
"""


def _versions(recipe: str, method: str, mergekit_version: str = "0.1.5"):
    meta = build_metadata(recipe, INPUTS, method=method, plugin_version="0.1.0", mergekit_version=mergekit_version)
    return json.loads(meta["mergekit_sdxl.method_version"])


def test_the_method_and_every_component_method_are_recorded():
    # clip_l is copied (no method), clip_g merged by linear, the UNet by the top level's tgmd.
    assert _versions(PER_COMPONENT, "tgmd") == {"tgmd": METHOD_VERSIONS["tgmd"], "linear": METHOD_VERSIONS["linear"]}
    assert _versions("merge_method: dgmla\n", "dgmla") == {"dgmla": 2}


def test_a_method_of_mergekit_itself_is_versioned_by_the_mergekit_that_ran_it():
    assert _versions("merge_method: slerp\n", "slerp", mergekit_version="0.1.5") == {"slerp": "mergekit 0.1.5"}
    assert _versions("merge_method: slerp\n", "slerp", mergekit_version="0.2.0") == {"slerp": "mergekit 0.2.0"}


def test_a_recipe_that_is_not_yaml_still_records_the_method():
    assert _versions("{not yaml: [", "tgmd") == {"tgmd": 2}


def test_read_back_from_a_file(tmp_path):
    meta = build_metadata(PER_COMPONENT, INPUTS, method="tgmd", plugin_version="0.1.0", mergekit_version="0.1.5")
    out = tmp_path / "merged.safetensors"
    save_file({"x": torch.zeros(2)}, str(out), metadata=meta)
    prov = read_provenance(read_header(out).metadata)
    assert prov is not None and prov["method_version"] == {"tgmd": 2, "linear": 1}
    # Files written before the key existed read as None, not as an error.
    old = {k: v for k, v in meta.items() if k != "mergekit_sdxl.method_version"}
    assert read_provenance(old)["method_version"] is None  # type: ignore[index]
