"""sd-mecha recipes: the ``.mecha`` parser (both formats, errors with line numbers) and the
translation of each supported method into this plugin's / mergekit's config, under both
readings of ``vote_sgn``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import pytest
import yaml

from mergekit_sdxl.errors import UsageError, UserError
from mergekit_sdxl.workflow.mecha_import import MissingInputsError, import_mecha, infer_vote_semantics, translate_recipe
from mergekit_sdxl.workflow.mecha_recipe import (
    DictNode,
    MechaRecipeError,
    MergeNode,
    ModelNode,
    ParameterNode,
    parse_recipe,
)
from mergekit_sdxl.workflow.recipe import is_our_recipe

SRC = "r.mecha"

# A TGMD recipe shaped like the published AstolfoMix-XL one: &1 is the base, &0 a model loaded
# first, the base subtracted from itself (a zero task vector) among the inputs.
TGMD_LEGACY = """\
model "raw/m0.safetensors" "sdxl" "base"
model "raw/base.safetensors" "sdxl" "base"
model "raw/m2.safetensors" "sdxl" "base"
merge "subtract" &2 &1
merge "subtract" &1 &1
merge "subtract" &0 &1
merge "ties_sum_with_dropout" &3 &4 &5 {params}
merge "add_difference" &1 &6 alpha=1.0
merge "weighted_sum" &0 &7 alpha=1.0
"""
# The same in the version 0.1.0 format (one line more: the version line).
TGMD_V010 = "version 0.1.0\n" + TGMD_LEGACY.replace('"sdxl" "base"', 'model_config="sdxl-sgm" merge_space="weight"')
REFERENCE = (
    "no_rescale=1.0 k=1.0 vote_sgn=1.0 probability=0.1 apply_median=1.0 cos_eps=1e-06 maxiter=100 eps=1e-06 "
    "ftol=1e-20 seed=240603 apply_stock=0.0"
)


def models_dir(tmp_path: Path, names: Sequence[str] = ("raw/m0", "raw/base", "raw/m2", "raw/m3")) -> Path:
    root = tmp_path / "models"
    for n in names:
        p = root / f"{n}.safetensors"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    return root


def translate(tmp_path: Path, text: str, semantics: Optional[str] = None, names: Optional[Sequence[str]] = None):
    root = models_dir(tmp_path, names) if names is not None else models_dir(tmp_path)
    imp = translate_recipe(parse_recipe(text, SRC), root, vote_semantics=semantics)
    return imp, yaml.safe_load(imp.yaml_text)


def error_of(text: str, tmp_path: Optional[Path] = None, semantics: Optional[str] = None) -> str:
    with pytest.raises(MechaRecipeError) as info:
        recipe = parse_recipe(text, SRC)
        translate_recipe(recipe, models_dir(tmp_path) if tmp_path else ".", vote_semantics=semantics)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{SRC}:")
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2
    return message


def paths(config: Dict[str, Any]) -> list:
    return [Path(m["model"]["model"]["path"]).name for m in config["models"]]


# ----------------------------------------------------------------------------- parser


def test_legacy_format_values_and_references():
    r = parse_recipe(
        'model "raw\\a.safetensors" "sdxl" "base"\n'
        "\n"
        'model "b.safetensors"\n'
        "dict in00=0.5 out08=1\n"
        'parameter "alpha" "BASE"\n'
        'merge "weighted_sum" &0 &1 alpha=&2 seed=-3 eps=1e-06 name="x y"\n',
        SRC,
    )
    assert r.version is None and not r.bool_constants and len(r.nodes) == 5
    a, b, d, p, m = r.nodes
    # legacy: a backslash is an ordinary character (old serializers wrote Windows paths as is)
    assert isinstance(a, ModelNode) and a.path == "raw\\a.safetensors" and (a.config, a.kind) == ("sdxl", "base")
    assert isinstance(b, ModelNode) and (b.config, b.kind, b.line) == (None, None, 3)
    assert isinstance(d, DictNode) and d.entries == {"in00": 0.5, "out08": 1}
    assert isinstance(p, ParameterNode) and p.name == "alpha" and p.args == ("BASE",)
    assert isinstance(m, MergeNode) and m.method == "weighted_sum" and m.args == (a, b) and m.line == 6
    assert m.kwargs["alpha"] is d and m.kwargs["seed"] == -3 and isinstance(m.kwargs["seed"], int)
    assert m.kwargs["eps"] == 1e-6 and isinstance(m.kwargs["eps"], float) and m.kwargs["name"] == "x y"
    assert r.root is m


def test_version_010_format_escapes_constants_comments_positional():
    r = parse_recipe(
        "version 0.1.0\n"
        "# a comment does not take an index\n"
        'model "raw\\\\a \\"q\\".safetensors" model_config="sdxl-sgm" merge_space="weight"\n'
        'model "b.safetensors" "sdxl-sgm"\n'
        'merge "add_difference" &0 &1 1.0 clamp=false seed=null flag=true\n',
        SRC,
    )
    assert r.version == "0.1.0" and r.bool_constants
    a, b, m = r.nodes
    assert isinstance(a, ModelNode) and a.path == 'raw\\a "q".safetensors' and (a.config, a.kind) == ("sdxl-sgm", "weight")
    assert isinstance(b, ModelNode) and b.config == "sdxl-sgm" and b.kind is None
    assert isinstance(m, MergeNode) and m.args == (a, b, 1.0) and m.line == 5
    assert m.kwargs == {"clamp": False, "seed": None, "flag": True}


@pytest.mark.parametrize(
    "text, line, what",
    [
        ('model "a"\nfrobnicate &0\n', 2, "unknown command 'frobnicate'"),
        ('model "a"\nmerge "subtract" &0 &1\n', 2, "reference &1 out of bounds (only &0..&0"),
        ('merge "n_average" &0\n', 1, "no instruction comes before this line"),
        ('model "a\n', 1, "unterminated quoted string"),
        ('model "a"\nmerge "weighted_sum" &0 &0 alpha=x1\n', 2, "argument 4 (alpha): 'x1' is not a number"),
        ('model "a"\nmerge "weighted_sum" &0 &0 alpha=1 alpha=2\n', 2, "alpha given twice"),
        ('model "a"\nmerge "weighted_sum" &0 alpha=1 &0\n', 2, "a positional value after key=value"),
        ('model "a"\nmerge &0 &0\n', 2, "the method name must come first"),
        ("model 12\n", 1, "the path must come first"),
        ('model "a" bogus="x"\n', 1, "unknown argument bogus"),
        ("version 9.9\n", 1, "unsupported recipe format version '9.9'"),
        ('model "a"\nversion 0.1.0\n', 2, "a version line must be the first line"),
        ('model "a"\nliteral 1\n', 2, "unknown command 'literal' in a legacy"),
        ('version 0.1.0\nmodel "a"\nparameter "x" "BASE"\n', 3, "unknown command 'parameter' in a version 0.1.0"),
        ('version 0.1.0\nmodel "a\\', 2, "a backslash ends the line"),
        ("\n\n", 1, "empty recipe"),
        ("version 0.1.0\n# only a comment\n", 2, "no instructions"),
    ],
)
def test_parse_errors_name_the_file_and_line(text, line, what):
    with pytest.raises(MechaRecipeError) as info:
        parse_recipe(text, SRC)
    message = str(info.value)
    assert message.startswith(f"{SRC}:{line}: ") and what in message and "\n" not in message


def test_unreadable_and_non_utf8_files(tmp_path):
    from mergekit_sdxl.workflow.mecha_recipe import read_recipe

    with pytest.raises(MechaRecipeError, match="cannot read the recipe"):
        read_recipe(tmp_path / "nope.mecha")
    bad = tmp_path / "bad.mecha"
    bad.write_bytes(b'model "a"\nmodel "\xff"\n')
    with pytest.raises(MechaRecipeError, match=r"bad.mecha:2: not UTF-8"):
        read_recipe(bad)


# ----------------------------------------------------------------------------- vote semantics


def test_inference_from_content():
    legacy = parse_recipe(TGMD_LEGACY.format(params=REFERENCE), SRC)
    assert infer_vote_semantics(legacy)[0] == "2024"
    new = parse_recipe(TGMD_V010.format(params="vote_sgn=true apply_median=true"), SRC)
    assert infer_vote_semantics(new)[0] == "2025"
    numeric = parse_recipe(TGMD_V010.format(params="vote_sgn=1.0 apply_median=1.0"), SRC)
    semantics, why = infer_vote_semantics(numeric)
    assert semantics is None and "line 8: vote_sgn=1.0" in why
    absent = parse_recipe(TGMD_V010.format(params="apply_median=1.0"), SRC)
    assert infer_vote_semantics(absent)[0] == "2025"


@pytest.mark.parametrize(
    "semantics, vote, expected",
    [
        ("2024", "vote_sgn=1.0", "count"),  # before 4b8b88d: vote_sgn > 0 = sign of the sum of signs
        ("2024", "vote_sgn=0.0", "sum"),
        ("2024", "vote_sgn=-1.0", "sum"),
        ("2024", "", "sum"),  # default 0.0
        ("2025", "vote_sgn=1.0", "sum"),  # after: vote_sgn true = sign of the sum of the deltas
        ("2025", "vote_sgn=true", "sum"),
        ("2025", "vote_sgn=false", "count"),
        ("2025", "", "count"),  # default False
    ],
)
def test_vote_sgn_under_both_semantics(tmp_path, semantics, vote, expected):
    imp, config = translate(tmp_path, TGMD_LEGACY.format(params=f"{vote} apply_median=1.0 probability=0.1 seed=1"), semantics)
    assert config["parameters"]["sign_election"] == expected
    assert imp.vote_semantics == semantics
    assert f"# vote semantics: {semantics} (given by --vote-semantics" in imp.yaml_text


def test_numeric_flags_in_a_versioned_recipe_need_the_option(tmp_path):
    text = TGMD_V010.format(params="vote_sgn=1.0 apply_median=1.0")
    message = error_of(text, tmp_path)
    assert message.startswith(f"{SRC}:8: ties_sum_with_dropout: cannot tell") and "--vote-semantics 2024 or 2025" in message
    imp, config = translate(tmp_path, text, "2024")
    assert config["parameters"]["sign_election"] == "count"


def test_an_option_against_the_content_is_recorded(tmp_path):
    imp, config = translate(tmp_path, TGMD_LEGACY.format(params=REFERENCE), "2025")
    assert config["parameters"]["sign_election"] == "sum"
    assert "given by --vote-semantics; the recipe's content suggests 2024" in imp.yaml_text
    assert "suggests" not in translate(tmp_path, TGMD_LEGACY.format(params=REFERENCE), "2024")[0].yaml_text


# ----------------------------------------------------------------------------- task-vector methods


def test_reference_tgmd_recipe(tmp_path):
    imp, config = translate(tmp_path, TGMD_LEGACY.format(params=REFERENCE))
    assert config["merge_method"] == "tgmd" and imp.method == "tgmd"
    assert Path(config["base_model"]["model"]["path"]).name == "base.safetensors"
    # ties input order; the zero task vector (base minus base) is not a model of the config
    assert paths(config) == ["m2.safetensors", "m0.safetensors"]
    assert config["parameters"] == {
        "drop_rate": 0.1, "density": 1.0, "rescale": 0.0, "sign_election": "count", "aggregate": "median",
        "eps": 1e-6, "maxiter": 100, "ftol": 1e-20, "lambda": 1.0, "seed": 240603,
    }
    assert (config["dtype"], config["out_dtype"]) == ("float64", "float16")
    text = imp.yaml_text
    assert text.startswith("# mergekit-sdxl recipe: tgmd imported from sd-mecha recipe r.mecha (legacy format")
    assert "# method_version: {tgmd: 2}\n" in text
    assert "# vote semantics: 2024 (inferred: legacy format" in text
    assert "a zero task vector among the inputs (a model minus itself, line 5" in text and "over the 2 other models" in text


def test_written_config_is_recognised_as_ours(tmp_path):
    imp, _ = translate(tmp_path, TGMD_LEGACY.format(params=REFERENCE))
    out = tmp_path / "c.yaml"
    out.write_text(imp.yaml_text)
    assert is_our_recipe(out)


def test_della_eps_makes_dgmla(tmp_path):
    params = "probability=0.1 della_eps=-0.1 rescale=0.0 k=1.0 vote_sgn=1.0 apply_median=1.0 seed=241011"
    imp, config = translate(tmp_path, TGMD_LEGACY.format(params=params))
    assert config["merge_method"] == "dgmla"
    p = config["parameters"]
    assert (p["drop_method"], p["drop_rate"], p["epsilon"], p["rescale"]) == ("della", 0.1, -0.1, 0.0)
    assert (p["sign_election"], p["aggregate"], p["seed"], p["lambda"]) == ("count", "median", 241011, 1.0)
    assert "# method_version: {dgmla: 2}" in imp.yaml_text


@pytest.mark.parametrize(
    "semantics, rescale, expected",
    [
        ("2024", "no_rescale=1.0", 0.0),
        ("2024", "no_rescale=0.0", 1.0),
        ("2024", "rescale=0.0", 0.0),
        ("2024", "rescale=0.5", 0.5),  # sd-mecha 0.0.x: survivors / (1 - p) ** rescale
        ("2024", "", 1.0),
        ("2025", "rescale=true", 1.0),
        ("2025", "rescale=false", 0.0),
        ("2025", "no_rescale=true", 0.0),
    ],
)
def test_rescale_forms(tmp_path, semantics, rescale, expected):
    _, config = translate(tmp_path, TGMD_LEGACY.format(params=f"{rescale} apply_median=1.0"), semantics)
    assert config["parameters"]["rescale"] == expected


def test_rescale_errors(tmp_path):
    assert "rescale and no_rescale both given" in error_of(TGMD_LEGACY.format(params="rescale=0.0 no_rescale=1.0 apply_median=1.0"), tmp_path)
    assert "write 0 or 1" in error_of(TGMD_LEGACY.format(params="rescale=0.5 apply_median=1.0"), tmp_path, "2025")
    assert "must be in [0, 1]" in error_of(TGMD_LEGACY.format(params="rescale=2.0 apply_median=1.0"), tmp_path)


def test_defaults_of_sd_mecha_fill_absent_parameters(tmp_path):
    imp, config = translate(tmp_path, TGMD_LEGACY.format(params="apply_median=1.0"))
    p = config["parameters"]
    # sd-mecha's ties_sum_with_dropout defaults: probability 0.9, k 0.2, rescale on, no seed
    assert (p["drop_rate"], p["density"], p["rescale"], p["seed"]) == (0.9, 0.2, 1.0, 0)
    assert "(sd-mecha's default)" in imp.yaml_text and "no seed (sd-mecha drew fresh random masks): seed: 0" in imp.yaml_text


def test_ties_sum_extended_and_ties_sum(tmp_path):
    ext = TGMD_LEGACY.format(params="").replace('"ties_sum_with_dropout" &3 &4 &5 ', '"ties_sum_extended" &3 &5 k=0.5 vote_sgn=1.0 apply_median=1.0')
    _, config = translate(tmp_path, ext)
    assert config["merge_method"] == "tgmd"
    assert {k: config["parameters"][k] for k in ("drop_rate", "density", "sign_election", "aggregate")} == {
        "drop_rate": 0.0, "density": 0.5, "sign_election": "count", "aggregate": "median"
    }
    plain = TGMD_LEGACY.format(params="").replace('"ties_sum_with_dropout" &3 &4 &5 ', '"ties_sum" &3 &5 k=1.0')
    _, config = translate(tmp_path, plain)
    assert {k: config["parameters"][k] for k in ("drop_rate", "density", "sign_election", "aggregate")} == {
        "drop_rate": 0.0, "density": 1.0, "sign_election": "sum", "aggregate": "mean"
    }
    no_k = TGMD_V010.format(params="").replace('"ties_sum_with_dropout" &3 &4 &5 ', '"ties_sum" &3 &5')
    assert "k absent, and its default changed" in error_of(no_k, tmp_path)


def test_model_stock_is_refused_in_both_semantics(tmp_path):
    stock_2024 = TGMD_LEGACY.format(params="apply_stock=1.0 apply_median=0.0")
    assert error_of(stock_2024, tmp_path).startswith(f"{SRC}:7: ties_sum_with_dropout: this applies Model Stock")
    # 2025: apply_stock=false (also the default) turns Model Stock on; true turns it off
    assert "Model Stock" in error_of(TGMD_LEGACY.format(params="apply_stock=false apply_median=false"), tmp_path)
    assert "Model Stock" in error_of(TGMD_LEGACY.format(params="apply_median=0"), tmp_path, "2025")
    _, config = translate(tmp_path, TGMD_LEGACY.format(params="apply_stock=true apply_median=false"))
    assert config["parameters"]["aggregate"] == "mean"
    _, config = translate(tmp_path, TGMD_LEGACY.format(params="apply_stock=0.0 apply_median=0.0"))
    assert config["parameters"]["aggregate"] == "mean"


def test_parameter_errors_name_the_line(tmp_path):
    assert error_of(TGMD_LEGACY.format(params="probabilty=0.1"), tmp_path).startswith(
        f"{SRC}:7: ties_sum_with_dropout: unknown parameter probabilty (known: probability,"
    )
    assert "probability=1.5 must be in [0, 1]" in error_of(TGMD_LEGACY.format(params="probability=1.5 apply_median=1.0"), tmp_path)
    assert "k=0.0 must be in (0, 1]" in error_of(TGMD_LEGACY.format(params="k=0.0 apply_median=1.0"), tmp_path)
    per_block = """\
model "raw/base"
model "raw/m2"
dict in00=0.1 out08=0.2
merge "subtract" &1 &0
merge "ties_sum_with_dropout" &3 probability=&2 apply_median=1.0
merge "add_difference" &0 &4 alpha=1.0
"""
    assert error_of(per_block, tmp_path) == (
        f"{SRC}:5: ties_sum_with_dropout: probability is a per-key/per-block value (line 3): not supported by the importer"
    )


def test_task_vectors_need_one_common_base(tmp_path):
    text = """\
model "raw/base.safetensors"
model "raw/m2.safetensors"
model "raw/m3.safetensors"
merge "subtract" &1 &0
merge "subtract" &2 &1
merge "ties_sum_with_dropout" &3 &4 apply_median=1.0
merge "add_difference" &0 &5 alpha=1.0
"""
    assert "task vectors relative to 2 different models" in error_of(text, tmp_path)
    not_a_delta = text.replace('"subtract" &2 &1', '"weighted_sum" &2 &1 alpha=0.5')
    assert error_of(not_a_delta, tmp_path).startswith(
        f"{SRC}:6: ties_sum_with_dropout: input 2 (line 5) is not a task vector"
    )


def test_task_vectors_added_to_another_model(tmp_path):
    text = TGMD_LEGACY.format(params=REFERENCE).replace('"add_difference" &1 &6', '"add_difference" &0 &6')
    assert "are added to another model" in error_of(text, tmp_path)


# ----------------------------------------------------------------------------- geometric median


def test_geometric_median_of_models(tmp_path):
    text = 'model "raw/m0"\nmodel "raw/m2"\nmodel "raw/m3"\nmerge "geometric_median" &0 &1 &2 eps=1e-05 maxiter=50 ftol=1e-10\n'
    imp, config = translate(tmp_path, text)
    assert config["merge_method"] == "geometric_median" and "base_model" not in config
    assert paths(config) == ["m0.safetensors", "m2.safetensors", "m3.safetensors"]
    assert config["parameters"] == {"eps": 1e-5, "maxiter": 50, "ftol": 1e-10}
    assert imp.vote_semantics is None and "vote semantics" not in imp.yaml_text


def test_geometric_median_of_task_vectors_added_back(tmp_path):
    body = """\
model "raw/base.safetensors"
model "raw/m2.safetensors"
model "raw/m3.safetensors"
merge "subtract" &1 &0
merge "subtract" &2 &0
merge "subtract" &0 &0
merge "geometric_median" &3 &4 &5
merge "add_difference" &0 &6 alpha={alpha}
"""
    # the median commutes with the shift: GM(x_i - B) + B = GM(x_i); the zero vector is the base
    _, config = translate(tmp_path, body.format(alpha="1.0"))
    assert config["merge_method"] == "geometric_median"
    assert paths(config) == ["m2.safetensors", "m3.safetensors", "base.safetensors"]
    assert config["parameters"] == {"eps": 1e-6, "maxiter": 100, "ftol": 1e-20}
    assert error_of(body.format(alpha="0.5"), tmp_path).startswith(f"{SRC}:8: add_difference: alpha=0.5 on a geometric median")


# ----------------------------------------------------------------------------- linear methods


def test_weighted_sum_is_linear(tmp_path):
    _, config = translate(tmp_path, 'model "raw/m0"\nmodel "raw/m2"\nmerge "weighted_sum" &0 &1 alpha=0.25\n')
    assert config["merge_method"] == "linear" and config["parameters"] == {"normalize": False}
    assert [m["parameters"]["weight"] for m in config["models"]] == [0.75, 0.25]


def test_chained_weighted_sums_and_n_average_fold(tmp_path):
    text = """\
model "raw/m0"
model "raw/m2"
model "raw/m3"
merge "weighted_sum" &0 &1 alpha=0.5
merge "weighted_sum" &3 &2 alpha=0.25
merge "n_average" &4 &0
"""
    _, config = translate(tmp_path, text)
    weights = {Path(m["model"]["model"]["path"]).name: m["parameters"]["weight"] for m in config["models"]}
    # &4 = 0.375 m0 + 0.375 m2 + 0.25 m3; &5 = (&4 + m0) / 2
    assert weights == pytest.approx({"m0.safetensors": 0.6875, "m2.safetensors": 0.1875, "m3.safetensors": 0.125})
    assert config["merge_method"] == "linear"


def test_add_difference_of_a_subtraction_is_task_arithmetic(tmp_path):
    text = """\
model "raw/base"
model "raw/m2"
model "raw/m3"
merge "subtract" &2 &0
merge "add_difference" &1 &3 alpha=0.7
"""
    imp, config = translate(tmp_path, text)
    assert config["merge_method"] == "task_arithmetic"
    assert Path(config["base_model"]["model"]["path"]).name == "base.safetensors"
    # m2 + 0.7 (m3 - base) = base + 1.0 (m2 - base) + 0.7 (m3 - base)
    assert [(Path(m["model"]["model"]["path"]).name, m["parameters"]["weight"]) for m in config["models"]] == [
        ("m2.safetensors", 1.0),
        ("m3.safetensors", 0.7),
    ]
    assert config["parameters"] == {"normalize": False, "lambda": 1.0}
    assert "# method_version: {task_arithmetic: 1}" in imp.yaml_text


def test_weighted_sum_at_alpha_one_drops_the_other_side_unread(tmp_path):
    # the dropped side uses a method the importer does not know: it is never needed
    text = TGMD_LEGACY.format(params=REFERENCE).replace(
        'merge "weighted_sum" &0 &7 alpha=1.0', 'merge "slerp" &0 &1 alpha=0.3\nmerge "weighted_sum" &8 &7 alpha=1.0'
    )
    _, config = translate(tmp_path, text)
    assert config["merge_method"] == "tgmd"
    assert error_of(text.replace("&8 &7 alpha=1.0", "&8 &7 alpha=0.0"), tmp_path).startswith(
        f"{SRC}:9: merge method 'slerp' cannot be imported (supported: subtract,"
    )


def test_results_that_are_not_a_checkpoint(tmp_path):
    assert "is a difference of models (a delta)" in error_of('model "raw/m0"\nmodel "raw/m2"\nmerge "subtract" &0 &1\n', tmp_path)
    assert "is the model 'raw/m0' itself" in error_of('model "raw/m0"\nmodel "raw/m2"\nmerge "weighted_sum" &0 &1 alpha=0.0\n', tmp_path)
    text = TGMD_LEGACY.format(params=REFERENCE).split('merge "add_difference"')[0]
    assert "is a task vector (a difference)" in error_of(text, tmp_path)


def test_add_difference_without_alpha(tmp_path):
    legacy = 'model "raw/m0"\nmodel "raw/m2"\nmodel "raw/m3"\nmerge "subtract" &1 &0\nmerge "add_difference" &2 &3\n'
    assert "alpha absent, and its default changed" in error_of(legacy, tmp_path)
    _, config = translate(tmp_path, "version 0.1.0\n" + legacy)
    assert [m["parameters"]["weight"] for m in config["models"]] == [1.0, 1.0]  # 2025 default alpha 1.0


def test_non_sdxl_models_are_refused(tmp_path):
    assert 'only full SDXL checkpoints ("sdxl" "base")' in error_of('model "a" "sd1" "base"\nmodel "b"\nmerge "weighted_sum" &0 &1\n', tmp_path)
    text = 'version 0.1.0\nmodel "a" model_config="sdxl-kohya_kohya_lora" merge_space="delta"\n'
    assert error_of(text, tmp_path).startswith(f"{SRC}:2: model 'a' has model_config=sdxl-kohya_kohya_lora")


def test_vae_from_a_model(tmp_path):
    text = TGMD_V010.format(params="vote_sgn=true apply_median=true seed=5").replace(
        'merge "weighted_sum" &0 &7 alpha=1.0', 'merge "pick_component" &2 "vae"\nmerge "fallback" &8 &7'
    )
    imp, config = translate(tmp_path, text)
    assert config["merge_method"] == "tgmd" and config["parameters"]["sign_election"] == "sum"
    assert Path(config["sdxl"]["vae"]["source"]).name == "m2.safetensors"
    bad = text.replace('"vae"', '"clip_l"')
    assert 'only the VAE of one model ("vae")' in error_of(bad, tmp_path)


# ----------------------------------------------------------------------------- model files


def test_models_are_matched_by_file_name(tmp_path):
    text = 'model "C:\\\\downloads\\\\M0"\nmodel "other/M2.safetensors"\nmerge "weighted_sum" &0 &1 alpha=0.5\n'
    root = tmp_path / "models"
    (root / "deep" / "er").mkdir(parents=True)
    (root / "deep" / "er" / "M0.safetensors").write_bytes(b"")  # by name, with the extension added
    (root / "m2.SAFETENSORS").write_bytes(b"")  # by name, case folded
    imp = translate_recipe(parse_recipe("version 0.1.0\n" + text, SRC), root)
    assert [m.path for m in imp.models] == [str(root / "deep/er/M0.safetensors"), str(root / "m2.SAFETENSORS")]
    assert all(m.found for m in imp.models) and not imp.missing


def test_relative_path_wins_over_a_same_name_elsewhere_and_ambiguity_is_an_error(tmp_path):
    root = models_dir(tmp_path, ("raw/m0", "raw/m2", "old/m2"))
    text = 'model "raw/m0"\nmodel "raw/m2"\nmerge "weighted_sum" &0 &1 alpha=0.5\n'
    imp = translate_recipe(parse_recipe(text, SRC), root)
    assert imp.models[1].path == str(root / "raw/m2.safetensors")
    with pytest.raises(MechaRecipeError) as info:
        translate_recipe(parse_recipe(text.replace("raw/m2", "m2"), SRC), root)
    assert str(info.value).startswith(f"{SRC}:2: model 'm2' matches 2 files under") and "old/m2.safetensors" in str(info.value)


def test_two_inputs_matched_to_one_file_are_refused(tmp_path):
    root = models_dir(tmp_path, ("raw/m0", "raw/m2"))
    text = 'model "raw/m0"\nmodel "old/m0.safetensors"\nmodel "raw/m2"\nmerge "n_average" &0 &1 &2\n'
    with pytest.raises(MechaRecipeError) as info:
        translate_recipe(parse_recipe(text, SRC), root)
    assert str(info.value).startswith(f"{SRC}:2: model 'old/m0.safetensors' is the same file as 'raw/m0' (line 1)")


def test_missing_inputs_are_listed(tmp_path):
    recipe = tmp_path / "r.mecha"
    recipe.write_text(TGMD_LEGACY.format(params=REFERENCE))
    root = models_dir(tmp_path, ("raw/base", "raw/m0"))
    with pytest.raises(MissingInputsError) as info:
        import_mecha(recipe, root)
    assert [(m.written, m.line) for m in info.value.missing] == [("raw/m2.safetensors", 3)]
    assert "1 of 3 inputs not found under" in str(info.value) and "--allow-missing" in str(info.value)
    assert isinstance(info.value, UserError)
    imp = import_mecha(recipe, root, allow_missing=True)
    assert "# NOT FOUND (1 of 3; written as placeholders, --allow-missing):\n#   line 3: raw/m2.safetensors" in imp.yaml_text
    assert yaml.safe_load(imp.yaml_text)["models"][0]["model"]["model"]["path"] == str(root.resolve() / "raw/m2.safetensors")


def test_models_dir_must_exist(tmp_path):
    with pytest.raises(UserError, match="--models-dir .*: not a directory"):
        translate_recipe(parse_recipe('model "a"\nmodel "b"\nmerge "weighted_sum" &0 &1\n', SRC), tmp_path / "none")


def test_unknown_vote_semantics(tmp_path):
    with pytest.raises(UserError, match="expected 2024 or 2025"):
        translate_recipe(parse_recipe(TGMD_LEGACY.format(params=REFERENCE), SRC), tmp_path, vote_semantics="2023")
