"""Discover + filter + write a mergekit config (workflow/recipe.py) and the inspect/recipe commands."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import typer
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl
from mergekit_sdxl.workflow.recipe import METHOD_PARAMETERS, RecipeError, build_recipe, discover_checkpoints

W = 1 / 64
U = "model.diffusion_model."


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder like the hidden one: good SDXL files mixed with an SD1-like file, a v-pred file,
    a NaN file, a duplicate, a truncated file, a name with + and @, and the base itself."""
    root = tmp_path_factory.mktemp("recipe")
    models = root / "models"
    (models / "sub").mkdir(parents=True)
    base = root / "sd_xl_base.safetensors"
    write_synthetic_sdxl(base, width=W, seed=0)
    write_synthetic_sdxl(models / "a_model.safetensors", width=W, seed=1, base=base)
    write_synthetic_sdxl(models / "sub" / "b+lora@v2.safetensors", width=W, seed=2, base=base)
    write_synthetic_sdxl(models / "c_vpred.safetensors", width=W, seed=3, base=base, extra_keys={"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    write_synthetic_sdxl(models / "d_model.safetensors", width=W, seed=4, base=base, extra_keys={"model_ema.decay": torch.tensor(0.9)})
    shutil.copy(models / "a_model.safetensors", models / "e_copy_of_a.safetensors")
    shutil.copy(base, models / "f_copy_of_base.safetensors")
    sd = load_file(str(models / "d_model.safetensors"))
    k = U + "middle_block.1.proj_in.weight"
    sd[k] = sd[k].clone()
    sd[k].view(-1)[5] = float("nan")
    save_file(sd, str(models / "g_nan.safetensors"))
    save_file(
        {
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(16, 8),
            U + "input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
        },
        str(models / "h_sd15.safetensors"),
    )
    shutil.copy(models / "d_model.safetensors", models / "i_trunc.safetensors")
    with open(models / "i_trunc.safetensors", "r+b") as fh:
        fh.truncate(os.path.getsize(models / "i_trunc.safetensors") // 2)
    (models / "notes.txt").write_text("not a checkpoint")
    return {"root": root, "models": models, "base": base}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from mergekit_sdxl.io.hashing import HashCache

    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "hashcache"))
    return HashCache(tmp_path / "hashcache")


def test_discovery_is_recursive_and_sorted(folder):
    names = [p.relative_to(folder["models"]).as_posix() for p in discover_checkpoints(folder["models"])]
    assert names == sorted(names)
    assert "sub/b+lora@v2.safetensors" in names and "notes.txt" not in names
    assert len(names) == 9


def test_recipe_keeps_and_excludes_with_reasons(folder, cache):
    m = folder["models"]
    res = build_recipe(m, folder["base"], "tgmd", scan=True, cache=cache)
    kept = [Path(i.path).relative_to(m).as_posix() for i in res.kept]
    assert kept == ["a_model.safetensors", "d_model.safetensors", "sub/b+lora@v2.safetensors"]
    reasons = {Path(p).relative_to(m).as_posix(): r for p, r in res.excluded}
    assert set(reasons) == {
        "c_vpred.safetensors", "e_copy_of_a.safetensors", "f_copy_of_base.safetensors",
        "g_nan.safetensors", "h_sd15.safetensors", "i_trunc.safetensors",
    }
    assert "v-prediction" in reasons["c_vpred.safetensors"] and "--allow-vpred-mix" in reasons["c_vpred.safetensors"]
    assert reasons["e_copy_of_a.safetensors"].startswith("duplicate of a_model.safetensors")
    assert reasons["f_copy_of_base.safetensors"].startswith("duplicate of the base model")
    assert "NaN/inf" in reasons["g_nan.safetensors"] and U + "middle_block.1.proj_in.weight" in reasons["g_nan.safetensors"]
    assert "not an SDXL base-family checkpoint" in reasons["h_sd15.safetensors"] and "sd1" in reasons["h_sd15.safetensors"]
    assert reasons["i_trunc.safetensors"].startswith("unreadable: truncated")
    # hashes of the kept inputs are the files' real sha256
    for i in res.kept + [res.base]:
        assert i.sha256 == sha(Path(i.path)) and i.autov2 == i.sha256[:10] and i.size == os.path.getsize(i.path)
    assert [i.role for i in res.inputs] == ["base", "model", "model", "model"]


def test_recipe_yaml_parses_pins_and_orders(folder, cache):
    from mergekit.config import MergeConfiguration

    res = build_recipe(folder["models"], folder["base"], "tgmd", scan=True, cache=cache)
    doc = yaml.safe_load(res.yaml_text)
    cfg = MergeConfiguration.model_validate(doc)
    assert cfg.merge_method == "tgmd"
    assert cfg.base_model.model.path == str(folder["base"].resolve())
    paths = [mi.model.model.path for mi in cfg.models]
    assert paths == [i.path for i in res.kept]
    # + and @ survive: the mapping form is not split into model+LoRA or path@revision
    plus = [mi.model for mi in cfg.models if "b+lora" in mi.model.model.path][0]
    assert plus.lora is None and plus.model.revision is None
    assert str(folder["base"].resolve()) not in paths
    assert cfg.parameters == METHOD_PARAMETERS["tgmd"]
    assert doc["parameters"] == {"drop_rate": 0.1, "density": 1.0, "rescale": 0.0, "sign_election": "count",
                                 "aggregate": "median", "eps": 1e-6, "maxiter": 100, "ftol": 1e-20,
                                 "lambda": 1.0, "seed": 240603}
    assert doc["dtype"] == "float64" and doc["out_dtype"] == "float16"
    assert doc["sdxl"] == {"method_version": {"tgmd": 2}}  # the pin of the method's meaning, nothing else
    # each model line is preceded by its pin comment, equal to hashlib of the file
    lines = res.yaml_text.splitlines()
    pin = re.compile(r"^\s*# sha256: ([0-9a-f]{64})  autov2: ([0-9a-f]{10})  size: (\d+)$")
    model_lines = [n for n, line in enumerate(lines) if line.strip().startswith("- model:")]
    assert len(model_lines) == len(res.kept)
    for n, info in zip(model_lines, res.kept, strict=True):
        m = pin.match(lines[n - 1])
        assert m, lines[n - 1]
        assert m.group(1) == sha(Path(info.path)) and m.group(2) == m.group(1)[:10]
        assert int(m.group(3)) == os.path.getsize(info.path)
    bl = [n for n, line in enumerate(lines) if line.startswith("base_model:")][0]
    assert pin.match(lines[bl - 1]).group(1) == sha(folder["base"])
    # every excluded file is listed in the header comment with its reason
    for p, reason in res.excluded:
        assert f"#   {p}: {reason}" in res.yaml_text


def test_nan_file_kept_without_scan_and_vpred_with_allow(folder, cache):
    m = folder["models"]
    res = build_recipe(m, folder["base"], "ties_soup", allow_vpred_mix=True, cache=cache)
    kept = [Path(i.path).name for i in res.kept]
    assert "g_nan.safetensors" in kept and "c_vpred.safetensors" in kept
    doc = yaml.safe_load(res.yaml_text)
    assert doc["sdxl"] == {"method_version": {"ties_soup": 2}, "allow_vpred_mix": True}
    assert doc["merge_method"] == "ties_soup" and doc["parameters"]["aggregate"] == "mean" and doc["parameters"]["drop_rate"] == 0.0


def test_vpred_base_wins(folder, cache):
    # every other SDXL file is epsilon: nothing is left, and the error says why per file
    with pytest.raises(RecipeError, match="epsilon-prediction model, but the base is v-prediction"):
        build_recipe(folder["models"], folder["models"] / "c_vpred.safetensors", "tgmd", cache=cache)


def test_vpred_base_excludes_eps_models(folder, cache, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(folder["models"] / "a_model.safetensors", d / "eps.safetensors")
    write_synthetic_sdxl(d / "v2.safetensors", width=W, seed=7, base=folder["base"], extra_keys={"v_pred": torch.tensor([])})
    res = build_recipe(d, folder["models"] / "c_vpred.safetensors", "tgmd", cache=cache)
    assert [Path(i.path).name for i in res.kept] == ["v2.safetensors"]
    assert "epsilon-prediction model, but the base is v-prediction" in dict(res.excluded)[str(d / "eps.safetensors")]


@pytest.mark.parametrize("method", ["tgmd", "ties_soup", "linear", "geometric_median"])
def test_methods_and_seed(folder, cache, method):
    from mergekit.config import MergeConfiguration

    res = build_recipe(folder["models"], folder["base"], method, seed=7, cache=cache)
    doc = yaml.safe_load(res.yaml_text)
    MergeConfiguration.model_validate(doc)
    expected = dict(METHOD_PARAMETERS[method])
    if "seed" in expected:
        expected["seed"] = 7
    assert doc["parameters"] == expected
    assert doc["merge_method"] == method


def test_base_inside_folder_listed_once(folder, cache, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(folder["base"], d / "base.safetensors")
    shutil.copy(folder["models"] / "a_model.safetensors", d / "a.safetensors")
    res = build_recipe(d, d / "base.safetensors", "tgmd", cache=cache)
    assert [Path(i.path).name for i in res.kept] == ["a.safetensors"]
    assert dict(res.excluded) == {str(d / "base.safetensors"): "is the base model (already base_model)"}
    assert res.yaml_text.count("base.safetensors") == 2  # the base_model line and the exclusion note


def test_recipe_errors(folder, cache, tmp_path):
    with pytest.raises(RecipeError, match="not a directory"):
        build_recipe(tmp_path / "nope", folder["base"], cache=cache)
    with pytest.raises(RecipeError, match="SD 1.x"):
        build_recipe(folder["models"], folder["models"] / "h_sd15.safetensors", cache=cache)
    with pytest.raises(RecipeError, match="truncated"):
        build_recipe(folder["models"], folder["models"] / "i_trunc.safetensors", cache=cache)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RecipeError, match="no usable SDXL checkpoints"):
        build_recipe(empty, folder["base"], cache=cache)
    with pytest.raises(ValueError):
        build_recipe(folder["models"], folder["base"], "slerp", cache=cache)


# --- the commands -----------------------------------------------------------------------------


def _app() -> typer.Typer:
    """The real ``mergekit-sdxl`` app: its errors become messages and exit codes as in the CLI."""
    from mergekit_sdxl.cli.main import app

    return app


def test_recipe_command_writes_config(folder, cache, tmp_path):
    out = tmp_path / "cfg" / "merge.yaml"
    r = CliRunner().invoke(_app(), ["recipe", str(folder["models"]), "--base", str(folder["base"]), "--scan", "-o", str(out)])
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(out.read_text())
    assert len(doc["models"]) == 3
    assert "keep     a_model.safetensors" in r.output
    assert re.search(r"exclude\s+h_sd15\.safetensors\s+not an SDXL base-family checkpoint", r.output)
    assert "generated by: mergekit-sdxl recipe" in out.read_text()
    # YAML on stdout when no -o
    r = CliRunner().invoke(_app(), ["recipe", str(folder["models"]), "--base", str(folder["base"]), "--method", "linear"])
    assert r.exit_code == 0
    assert "merge_method: linear" in r.stdout
    r = CliRunner().invoke(_app(), ["recipe", str(folder["models"]), "--base", str(folder["models"] / "h_sd15.safetensors")])
    assert r.exit_code == 1 and "SD 1.x" in r.output


def test_inspect_command_table_json_and_exit_code(folder, cache, monkeypatch):
    app = _app()
    r = CliRunner().invoke(app, ["inspect", str(folder["models"])])
    assert r.exit_code == 1  # the truncated file
    out = r.output
    assert re.search(r"h_sd15\.safetensors\s+sd1\s", out)
    assert re.search(r"c_vpred\.safetensors\s+sdxl-base \(scaled\)\s+v\+ztsnr", out)
    assert "i_trunc.safetensors  error: truncated" in out
    assert sha(folder["models"] / "a_model.safetensors") in out

    r = CliRunner().invoke(app, ["inspect", "--json", "--scan", str(folder["models"] / "g_nan.safetensors"), str(folder["models"] / "d_model.safetensors")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [Path(d["path"]).name for d in doc] == ["g_nan.safetensors", "d_model.safetensors"]
    assert doc[0]["nonfinite"]["per_component"]["unet"] == 1
    assert doc[1]["extra"] == ["model_ema.decay"] and doc[1]["n_extra"] == 1
    assert doc[1]["sha256"] == sha(folder["models"] / "d_model.safetensors") and doc[1]["autov2"] == doc[1]["sha256"][:10]

    # second run: every hash from the cache (hashing the files again would fail)
    import mergekit_sdxl.io.hashing as hashing

    def boom(*a, **k):
        raise AssertionError("re-hashed a cached file")

    monkeypatch.setattr(hashing, "sha256_file", boom)
    monkeypatch.setattr(hashing, "_hash_with_progress", boom)
    r = CliRunner().invoke(app, ["inspect", "--json", str(folder["models"] / "d_model.safetensors")])
    assert r.exit_code == 0, r.output
    # --no-hash: header only
    r = CliRunner().invoke(app, ["inspect", "--json", "--no-hash", str(folder["models"] / "h_sd15.safetensors")])
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["sha256"] is None


def test_inspect_shows_merge_provenance(folder, cache, tmp_path):
    from mergekit_sdxl.io.provenance import build_metadata

    res = build_recipe(folder["models"], folder["base"], "tgmd", cache=cache)
    meta = build_metadata(res.yaml_text, res.inputs, method="tgmd", seed=240603, dtype="float64", out_dtype="float16",
                          title="merged", prediction_type="epsilon", plugin_version="0.1.0", mergekit_version="0.1.5")
    out = tmp_path / "merged.safetensors"
    sd = load_file(str(folder["base"]))
    save_file(sd, str(out), metadata=meta)
    r = CliRunner().invoke(_app(), ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "merged by mergekit-sdxl 0.1.0 (mergekit 0.1.5): method tgmd, seed 240603" in r.output
    for i in res.inputs:
        assert i.sha256 in r.output
    assert "merge_method: tgmd" in r.output
    r = CliRunner().invoke(_app(), ["inspect", "--json", "--no-hash", str(out)])
    rec = json.loads(r.stdout)[0]["merged_recipe"]
    assert [i["sha256"] for i in rec["inputs"]] == [i.sha256 for i in res.inputs]


def test_config_inputs_order_and_roles(folder, cache):
    from mergekit.config import MergeConfiguration

    from mergekit_sdxl.workflow.recipe import config_input_infos, config_inputs

    res = build_recipe(folder["models"], folder["base"], "tgmd", scan=True, cache=cache)
    cfg = MergeConfiguration.model_validate(yaml.safe_load(res.yaml_text))
    pairs = config_inputs(cfg)
    assert pairs == [(i.path, i.role) for i in res.inputs]
    assert pairs[0] == (str(folder["base"].resolve()), "base")
    infos = config_input_infos(cfg, cache=cache)
    assert [(i.sha256, i.role) for i in infos] == [(i.sha256, i.role) for i in res.inputs]
