"""Config validation before any work (host/validate.py): every error is one ConfigError line
naming the config file and the key, parameter, model or file concerned."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from mergekit_sdxl.errors import UserError
from mergekit_sdxl.host.validate import (
    ConfigError,
    check_parameters,
    check_pins,
    load_yaml,
    parse_pins,
    validate_config,
)
from tests.paths import CONFIGS

SRC = "recipe.yaml"


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def error_of(text: str, **kw) -> str:
    kw.setdefault("check_files", False)
    with pytest.raises(ConfigError) as info:
        validate_config(text, source=SRC, **kw)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"config {SRC}")
    assert info.value.exit_code == 2 and isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    return message


def tgmd(models=("a.safetensors", "ponyXL.safetensors"), model_params="", params="  lambda: 1.0\n", extra="") -> str:
    lines = ["merge_method: tgmd", 'base_model: {model: {path: "base.safetensors"}}', "models:"]
    for m in models:
        lines.append(f'  - model: {{model: {{path: "{m}"}}}}')
        if model_params and m == models[-1]:
            lines.append("    parameters:")
            lines += [f"      {p}" for p in model_params.strip().splitlines()]
    return "\n".join(lines) + "\nparameters:\n" + params + extra


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Small opaque files in a cwd of their own (validation never parses tensors)."""
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(["base.safetensors", "a.safetensors", "ponyXL.safetensors", "c.safetensors"]):
        (tmp_path / name).write_bytes(bytes([i]) * (1000 + i))
    return tmp_path


# ----------------------------------------------------------------- YAML


def test_yaml_syntax_error_names_file_line_and_column():
    message = error_of("merge_method: tgmd\nparameters:\n  lambda: 1.0\n   weight: [1, 2\n")
    assert "YAML error at line 4, column 10" in message and "mapping values are not allowed here" in message


def test_yaml_duplicate_key_is_an_error():
    message = error_of("merge_method: tgmd\nparameters: {a: 1}\nparameters: {b: 2}\n")
    assert "line 3, column 1" in message and "duplicate key 'parameters' (first at line 2" in message


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "string"), ("", None)])
def test_yaml_top_level_must_be_a_mapping(text, kind):
    with pytest.raises(ConfigError, match=("not a " + kind) if kind else "empty") as info:
        load_yaml(text, SRC)
    assert str(info.value).startswith(f"config {SRC}: ")


# ----------------------------------------------------------------- keys


def test_unknown_top_level_key_with_hint():
    assert error_of(tgmd(extra="out_dtpye: float16\n")).endswith("unknown top-level key 'out_dtpye' (did you mean 'out_dtype'?)")


def test_unknown_key_in_sdxl_section_checked_against_sdxl_options():
    assert error_of(tgmd(extra="sdxl:\n  memory_budgt: 4GB\n")).endswith("sdxl: unknown key 'memory_budgt' (did you mean 'memory_budget'?)")
    assert error_of(tgmd(extra="sdxl:\n  vae: {sorce: base}\n")).endswith("sdxl.vae: unknown key 'sorce' (did you mean 'source'?)")


def test_sdxl_section_values_are_checked():
    assert error_of(tgmd(extra="sdxl:\n  memory_budget: 4XB\n")).endswith("sdxl.memory_budget: not a size: '4XB' (use e.g. 4GB, 512MB, 64MiB)")


def test_unknown_key_in_a_models_entry_names_the_model():
    text = tgmd().replace('path: "ponyXL.safetensors"}}', 'path: "ponyXL.safetensors"}}\n    paramters: {weight: 1}')
    assert error_of(text).endswith("models[1] (ponyXL.safetensors): unknown key 'paramters' (did you mean 'parameters'?)")


def test_unknown_key_in_base_model_and_model_mappings():
    text = tgmd().replace('base_model: {model: {path: "base.safetensors"}}', 'base_model: {model: {path: "base.safetensors"}, lroa: x}')
    assert error_of(text).endswith("base_model (base.safetensors): unknown key 'lroa' (did you mean 'lora'?)")
    text = tgmd().replace('{path: "a.safetensors"}', '{path: "a.safetensors", revison: main}')
    assert error_of(text).endswith("models[0].model.model (a.safetensors): unknown key 'revison' (did you mean 'revision'?)")


# ----------------------------------------------------------------- method and parameter names


def test_unknown_merge_method_lists_close_names():
    assert error_of(tgmd().replace("merge_method: tgmd", "merge_method: tgdm")).endswith("unknown merge_method 'tgdm' (did you mean 'tgmd'?)")


def test_unknown_global_parameter_with_hint():
    message = error_of(tgmd(params="  drop_rat: 0.1\n"))
    # tgmd's drop_method (DELLA) is close enough to be offered too, after the closest match.
    assert message == f"config {SRC}: unknown parameter 'drop_rat' for merge method tgmd (did you mean 'drop_rate' or 'drop_method'?)"


def test_unknown_per_model_parameter_names_the_model_file():
    message = error_of(tgmd(models=("a.safetensors", "b.safetensors", "c.safetensors", "ponyXL.safetensors"), model_params="denstiy: 0.5"))
    assert message == (
        f"config {SRC}: models[3] (ponyXL.safetensors): unknown parameter 'denstiy' for merge method tgmd (did you mean 'density'?)"
    )


def test_global_parameter_set_per_model_is_an_error():
    message = error_of(tgmd(model_params="lambda: 2.0"))
    assert "models[1] (ponyXL.safetensors): 'lambda' is a global parameter of merge method tgmd" in message
    assert "mergekit ignores it when set per model" in message


def test_per_model_parameter_as_global_default_is_accepted():
    validate_config(tgmd(params="  drop_rate: 0.2\n  density: 0.9\n  weight: 1.5\n"), source=SRC, check_files=False)


def test_slices_and_modules_forms_are_checked():
    slices = (
        "merge_method: linear\nslices:\n  - sources:\n"
        "      - model: a.safetensors\n        layer_range: [0, 4]\n        parameters: {weight: 0.5}\n"
        "      - model: b.safetensors\n        layer_range: [0, 4]\n        parameters: {wieght: 0.5}\n"
    )
    assert error_of(slices).endswith("slices[0].sources[1] (b.safetensors): unknown parameter 'wieght' for merge method linear (did you mean 'weight'?)")
    modules = "merge_method: linear\nmodules:\n  unet:\n    models:\n      - model: a.safetensors\n        parameters: {weight: 1, normalize: true}\n"
    assert error_of(modules).endswith("modules.unet.models[0] (a.safetensors): 'normalize' is a global parameter of merge method linear; "
                                      "mergekit ignores it when set per model: move it to the top-level parameters:")
    validate_config(slices.replace("wieght", "weight"), source=SRC, check_files=False)


def test_required_parameter_for_the_base_that_mergekit_adds():
    text = "merge_method: linear\nbase_model: base.safetensors\nmodels:\n  - model: a.safetensors\n    parameters: {weight: 1}\n"
    assert "base_model (base.safetensors): merge method linear needs parameter 'weight' for the base too" in error_of(text)


def test_method_that_needs_a_base():
    assert error_of(tgmd().replace('base_model: {model: {path: "base.safetensors"}}\n', "")).endswith("merge method tgmd needs a base_model")


# ----------------------------------------------------------------- parameter values


@pytest.mark.parametrize(
    "params, expected",
    [
        ("  lambda: .inf\n", "parameter 'lambda' = .inf: must be a finite number"),
        ("  lambda: .nan\n", "parameter 'lambda' = .nan: must be a finite number"),
        ("  drop_rate: 1.5\n", "parameter 'drop_rate' = 1.5: input should be less than or equal to 1"),
        ("  density: -0.1\n", "parameter 'density' = -0.1: input should be greater than or equal to 0"),
        ("  eps: 0.0\n", "parameter 'eps' = 0.0: input should be greater than 0"),
        ("  maxiter: 0\n", "parameter 'maxiter' = 0: must be at least 1"),
        ("  seed: 1.5\n", "parameter 'seed' = 1.5: input should be a valid integer, got a number with a fractional part"),
        ("  weight: yes\n", "parameter 'weight' = true: expected a number, got the boolean true"),
        ("  rescale: lots\n", "parameter 'rescale' = 'lots': input should be a valid number, unable to parse string as a number"),
        ("  aggregate: mode\n", "parameter 'aggregate' = 'mode': input should be 'median' or 'mean'"),
        ("  lambda:\n", "parameter 'lambda' = None: has no value"),
    ],
)
def test_bad_global_values_name_the_parameter(params, expected):
    assert error_of(tgmd(params=params)) == f"config {SRC}: {expected}"


def test_bad_per_model_value_names_parameter_and_model():
    message = error_of(tgmd(model_params="drop_rate: 1.5"))
    assert message == f"config {SRC}: models[1] (ponyXL.safetensors): parameter 'drop_rate' = 1.5: input should be less than or equal to 1"
    message = error_of(tgmd(model_params="weight: -.inf"))
    assert message.endswith("models[1] (ponyXL.safetensors): parameter 'weight' = -.inf: must be a finite number")


def test_every_scalar_of_gradients_and_filters_is_checked():
    message = error_of(tgmd(model_params="density: [0.2, 1.0, 1.2]"))
    assert message.endswith("parameter 'density' = 1.2 (gradient item 2): input should be less than or equal to 1")
    filters = "weight:\n  - filter: input_blocks\n    value: [1.0, .inf]\n  - value: 0.5"
    assert error_of(tgmd(model_params=filters)).endswith("parameter 'weight' = .inf (filter 'input_blocks') (gradient item 1): must be a finite number")
    typo = "weight:\n  - filter: input_blocks\n    vaule: 1.0"
    assert "unknown key 'vaule' in a filter entry (did you mean 'value'?)" in error_of(tgmd(model_params=typo))
    good = "weight:\n  - filter: input_blocks\n    value: [1.0, 0.5]\n  - value: 0.5\ndrop_rate: [0.0, 0.2]"
    validate_config(tgmd(model_params=good), source=SRC, check_files=False)


def test_scientific_notation_strings_are_numbers_like_mergekit_reads_them():
    validate_config(tgmd(params="  eps: 1e-6\n  ftol: 1.0e-20\n"), source=SRC, check_files=False)


def test_dtype_names_are_checked():
    assert error_of(tgmd(extra="out_dtype: fp16\n")).endswith("out_dtype: 'fp16' is not a floating-point dtype (did you mean 'float16'?)")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_repository_configs_pass_parameter_validation(path):
    text = path.read_text()
    check_parameters(load_yaml(text, path.name), path.name)
    result = validate_config(text, source=path.name, check_files=False)
    assert result.warnings == [] and result.config is not None


# ----------------------------------------------------------------- input files


def test_missing_input_file_is_named(files):
    message = error_of(tgmd(models=("a.safetensors", "gone.safetensors")), check_files=True)
    assert message.startswith(f"config {SRC}: models[1] (gone.safetensors): file not found (paths are read from the current directory ")


def test_missing_file_hint_when_it_exists_beside_the_config(files):
    (files / "cfg").mkdir()
    shutil.copy(files / "a.safetensors", files / "cfg" / "near.safetensors")
    with pytest.raises(ConfigError, match=r"it exists beside the config as cfg/near\.safetensors"):
        validate_config(tgmd(models=("near.safetensors",)), source="cfg/recipe.yaml")


def test_same_file_twice_by_path_spelling_or_link_is_an_error(files):
    message = error_of(tgmd(models=("a.safetensors", "ponyXL.safetensors", "./a.safetensors")), check_files=True)
    assert message.endswith("models[2] (./a.safetensors) is the same file as models[0] (a.safetensors): list each input once")
    os.symlink(files / "ponyXL.safetensors", files / "link.safetensors")
    message = error_of(tgmd(models=("ponyXL.safetensors", "link.safetensors")), check_files=True)
    assert "models[1] (link.safetensors) is the same file as models[0] (ponyXL.safetensors)" in message
    os.link(files / "c.safetensors", files / "hard.safetensors")
    message = error_of(tgmd(models=("c.safetensors", "hard.safetensors")), check_files=True)
    assert "models[1] (hard.safetensors) is the same file as models[0] (c.safetensors)" in message


def test_base_listed_again_under_models(files):
    text = tgmd(models=("a.safetensors", "./base.safetensors"))
    assert "models[1] (./base.safetensors) is the base model (base_model (base.safetensors))" in error_of(text, check_files=True)
    validate_config(text, source=SRC, allow_base_in_models=True)


def test_base_among_slice_sources_is_allowed(files):
    # In the slices form mergekit does not add the base: it must be listed among the sources.
    text = (
        "merge_method: tgmd\nbase_model: base.safetensors\nslices:\n  - sources:\n"
        "      - model: base.safetensors\n        layer_range: [0, 4]\n"
        "      - model: a.safetensors\n        layer_range: [0, 4]\n"
        "      - model: ./a.safetensors\n        layer_range: [0, 4]\n"
    )
    assert "slices[0].sources[2] (./a.safetensors) is the same file as slices[0].sources[1] (a.safetensors)" in error_of(text, check_files=True)
    validate_config(text.rsplit("      - model: ./a", 1)[0], source=SRC)


def test_copies_with_the_same_sha256_are_a_warning(files, caplog):
    shutil.copy(files / "a.safetensors", files / "copy_of_a.safetensors")
    hashed = []

    def sha256_of(path: str) -> str:
        hashed.append(os.path.basename(path))
        return sha(path)

    result = validate_config(tgmd(models=("a.safetensors", "ponyXL.safetensors", "copy_of_a.safetensors")), source=SRC, sha256_of=sha256_of)
    assert result.warnings == [
        (
            f"config {SRC}: models[2] (copy_of_a.safetensors) has the same content as models[0] (a.safetensors) "
            f"(sha256 {sha(files / 'a.safetensors')[:10]}); it will count twice in the merge"
        )
    ]
    assert "copy_of_a.safetensors" in caplog.text
    assert sorted(hashed) == ["a.safetensors", "copy_of_a.safetensors"]  # only files of equal size are hashed
    assert validate_config(tgmd(models=("a.safetensors", "copy_of_a.safetensors")), source=SRC).warnings == []  # no hasher: skipped


def test_plus_in_a_string_reference_is_misread_by_mergekit(files):
    shutil.copy(files / "a.safetensors", files / "a+lora.safetensors")
    text = "merge_method: tgmd\nbase_model: base.safetensors\nmodels:\n  - model: a+lora.safetensors\n"
    assert "mergekit reads 'a+lora.safetensors' as model 'a' plus LoRA 'lora.safetensors'" in error_of(text)


def test_hub_ids_are_warned_not_failed(files):
    text = "merge_method: tgmd\nbase_model: base.safetensors\nmodels:\n  - model: someone/some-model\n"
    result = validate_config(text, source=SRC)
    assert result.warnings == [f"config {SRC}: models[0] (someone/some-model) is not a local path; mergekit will look it up on the Hugging Face Hub"]


def test_vae_source_file_must_exist(files):
    message = error_of(tgmd(extra="sdxl:\n  vae: {source: vae_donor.safetensors}\n"), check_files=True)
    assert "sdxl.vae.source (vae_donor.safetensors): file not found" in message


# ----------------------------------------------------------------- sha256 pins


def _recipe(files: Path, names=("a.safetensors", "ponyXL.safetensors")) -> str:
    from mergekit_sdxl.io.hashing import autov2
    from mergekit_sdxl.io.provenance import InputInfo
    from mergekit_sdxl.workflow.recipe import METHOD_PARAMETERS, render_recipe_yaml

    def info(name: str, role: str) -> InputInfo:
        digest = sha(files / name)
        return InputInfo(path=str(files / name), size=(files / name).stat().st_size, sha256=digest, autov2=autov2(digest), role=role)

    return render_recipe_yaml(info("base.safetensors", "base"), [info(n, "model") for n in names], [("x.safetensors", "why")],
                              method="tgmd", parameters=dict(METHOD_PARAMETERS["tgmd"]))


def test_recipe_pins_round_trip(files):
    text = _recipe(files)
    result = validate_config(text, source=SRC, sha256_of=sha)
    assert [(p.role, Path(p.path).name, p.sha256, p.size) for p in result.pins] == [
        (role, name, sha(files / name), (files / name).stat().st_size)
        for role, name in [("base", "base.safetensors"), ("model", "a.safetensors"), ("model", "ponyXL.safetensors")]
    ]
    assert [p.path for p in result.pins] == [e.path for e in result.inputs]
    assert result.warnings == []


def test_built_recipe_round_trips(tmp_path, monkeypatch):
    from mergekit_sdxl.io.hashing import HashCache
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl
    from mergekit_sdxl.workflow.recipe import build_recipe

    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "models").mkdir()
    base = tmp_path / "base.safetensors"
    write_synthetic_sdxl(base, width=1 / 64, seed=0)
    for seed in (1, 2):
        write_synthetic_sdxl(tmp_path / "models" / f"m{seed}.safetensors", width=1 / 64, seed=seed, base=base)
    cache = HashCache(tmp_path / "cache")
    recipe = build_recipe(tmp_path / "models", base, cache=cache)
    result = validate_config(recipe.yaml_text, source=SRC, sha256_of=cache.sha256)
    assert len(result.pins) == 3 and result.method == "tgmd"


def test_changed_pinned_file_is_an_error(files):
    text = _recipe(files)
    old = sha(files / "ponyXL.safetensors")
    (files / "ponyXL.safetensors").write_bytes(b"\x07" * (1000 + 2))  # same size, new bytes
    message = error_of(text, check_files=True, sha256_of=sha)
    assert f"{files / 'ponyXL.safetensors'} (pinned at line " in message
    assert f"sha256 is {sha(files / 'ponyXL.safetensors')}, but the recipe pins {old}" in message
    assert message.endswith("(the file changed since the recipe was written; rerun recipe, or pass --no-verify-pins)")
    validate_config(text, source=SRC, sha256_of=sha, verify_pins=False)


def test_size_is_checked_before_any_hash(files):
    text = _recipe(files)
    (files / "ponyXL.safetensors").write_bytes(b"\x02" * 10)

    def no_hash(path: str) -> str:
        raise AssertionError("hashed before the sizes were compared")

    with pytest.raises(ConfigError, match=r"size is 10 bytes, but the recipe pins 1002"):
        check_pins(parse_pins(text), no_hash, source=SRC)


def test_missing_pinned_file(files):
    pins = parse_pins(_recipe(files))
    (files / "a.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"a\.safetensors \(pinned at line \d+\): file not found"):
        check_pins(pins, sha, source=SRC)


def test_pins_without_hasher_check_sizes_and_say_so(files):
    result = validate_config(_recipe(files), source=SRC)
    assert result.warnings == [f"config {SRC}: sha256 pins checked by size only (no hasher given)"]


def test_stray_pin_comment_is_ignored_with_a_warning():
    text = tgmd().replace("models:\n", "models:\n  # sha256: " + "ab" * 32 + "  autov2: abababab  size: 5\n  # a deleted entry\n")
    warnings: list = []
    assert parse_pins(text, SRC, warnings) == []
    assert warnings == [f"config {SRC}: the sha256 pin at line 4 is not followed by a base_model: or '- model:' line; ignored"]


def test_a_version_1_pin_with_more_than_128_inputs_is_refused_before_any_file_is_read():
    many = tuple(f"m{i:03d}.safetensors" for i in range(129))
    message = error_of(tgmd(models=many, extra="sdxl: {method_version: {tgmd: 1}}\n"))
    assert message == (
        f"config {SRC}: sdxl.method_version: tgmd: version 1 is reproduced only up to 128 inputs and this config has 129: "
        'pin tgmd: 2 (its Gram sums by adjacent pairs from 129 inputs on; docs/methods.md, "Method versions")'
    )
    validate_config(tgmd(models=many[:128], extra="sdxl: {method_version: {tgmd: 1}}\n"), source=SRC, check_files=False)
    validate_config(tgmd(models=many, extra="sdxl: {method_version: {tgmd: 2}}\n"), source=SRC, check_files=False)
