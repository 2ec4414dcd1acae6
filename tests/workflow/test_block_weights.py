"""SuperMerger block weights (MBW) expanded into mergekit filters, without mergekit: the 20 blocks
map onto exactly the right keys of the 2515-key manifest, presets are SuperMerger's SDXL values,
and bad settings fail with a message naming the entry and the parameter."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from importlib import resources

import pytest

from mergekit_sdxl.sdxl.manifest import COMPONENT_PREFIXES, SDXL_KEYS, block_of
from mergekit_sdxl.workflow.block_weights import (
    BLOCK_FILTERS,
    MBW_BLOCKS,
    BlockWeightsError,
    block_for_key,
    block_weight_filters,
    block_weight_values,
    expand_block_weights,
)
from mergekit_sdxl.workflow.mbw_presets import PRESETS, SD1_PRESETS, sdxl_from_sd1

P = "model.diffusion_model."
# SuperMerger's BLOCKIDXLL (scripts/mergers/mergers.py, commit 0b1c491) without its unused "VAE".
SUPERMERGER_SDXL_ORDER = [
    "BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08",
    "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08",
]  # fmt: skip
# The documented differences from the manifest's sd-mecha block ids (docs/methods.md).
TIME_LABEL = re.compile(re.escape(P) + r"(time_embed|label_emb)\.")


def _first_match(key: str, conditions) -> float:
    """mergekit's rule for a filter list: the value of the first filter that is a substring."""
    for cond in conditions:
        if cond["filter"] in key:
            return cond["value"]
    raise AssertionError(f"no filter matches {key}")


def test_block_order_is_supermergers_sdxl_order():
    assert list(MBW_BLOCKS) == SUPERMERGER_SDXL_ORDER
    assert list(BLOCK_FILTERS) == SUPERMERGER_SDXL_ORDER
    for filters in BLOCK_FILTERS.values():
        assert all(f.endswith(".") for f in filters)  # anchored: input_blocks.1. never matches input_blocks.10


def test_every_manifest_key_matches_exactly_one_filter():
    for key in SDXL_KEYS:
        hits = [(block, f) for block in MBW_BLOCKS for f in BLOCK_FILTERS[block] if f in key]
        assert len(hits) == 1, (key, hits)


def test_blocks_against_the_manifest_block_ids():
    """Each of the 20 blocks holds exactly the manifest's keys of that block id, except the two
    documented SuperMerger rules: time_embed/label_emb go with IN00 and the VAE with BASE."""
    expected_blocks = {}
    for key in SDXL_KEYS:
        manifest = block_of(key)
        if manifest == "VAE":
            expected = "BASE"
        elif TIME_LABEL.match(key):
            assert manifest == "BASE"
            expected = "IN00"
        else:
            expected = manifest
        assert block_for_key(key) == expected, key
        expected_blocks.setdefault(expected, set()).add(key)
    for block in MBW_BLOCKS:
        assert {k for k in SDXL_KEYS if block_for_key(k) == block} == expected_blocks[block], block
    counts = Counter(block_for_key(k) for k in SDXL_KEYS)
    assert counts["IN00"] == 2 + 8  # input_blocks.0.0 weight/bias, time_embed.0/2 and label_emb.0.0/0.2
    assert counts["OUT08"] == Counter(block_of(k) for k in SDXL_KEYS)["OUT08"]
    assert counts["BASE"] == sum(1 for k in SDXL_KEYS if not k.startswith(P))
    assert sum(counts.values()) == len(SDXL_KEYS) == 2515


def test_blocks_against_supermergers_assignment_in_the_shared_data():
    data = json.loads(resources.files("mergekit_sdxl.sdxl.data").joinpath("sdxl_blocks.json").read_text())
    assert set(data) == set(SDXL_KEYS)
    not_merged = {k for k, v in data.items() if v["supermerger"] == "Not Merge"}
    for key, ids in data.items():
        if key not in not_merged:
            assert block_for_key(key) == ids["supermerger"], key
    # SuperMerger leaves these unmerged: names without weight/bias, and (before 2025-11-27) time/label.
    assert {k for k in not_merged if not TIME_LABEL.match(k)} == {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.logit_scale",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.text_projection",
    }
    assert {block_for_key(k) for k in not_merged if TIME_LABEL.match(k)} == {"IN00"}
    assert {block_for_key(k) for k in not_merged if not TIME_LABEL.match(k)} == {"BASE"}


def test_anchoring_on_names_sdxl_does_not_have():
    assert block_for_key(P + "input_blocks.10.0.weight") is None
    assert block_for_key(P + "output_blocks.11.1.norm.weight") is None
    assert block_for_key(P + "output_blocks.1.0.in_layers.0.weight") == "OUT01"
    assert block_for_key(P + "out.2.weight") == "OUT08"  # "out." is not a prefix of "output_blocks"
    assert block_for_key("cond_stage_model.transformer.x.weight") is None


def test_expanded_filters_give_each_key_its_block_value():
    values = [round(0.05 * i, 2) for i in range(20)]  # a distinct value per block
    conditions = block_weight_filters(values)
    assert all(set(c) == {"filter", "value"} for c in conditions)
    assert len(conditions) == sum(len(f) for f in BLOCK_FILTERS.values()) == 25
    for key in SDXL_KEYS:
        assert _first_match(key, conditions) == values[MBW_BLOCKS.index(block_for_key(key))], key
    assert _first_match(P + "input_blocks.4.1.proj_in.weight", conditions) == values[5]
    assert _first_match(P + "middle_block.1.proj_out.bias", conditions) == values[10]
    assert _first_match(P + "time_embed.0.weight", conditions) == values[1]
    assert _first_match(COMPONENT_PREFIXES["clip_g"] + "text_projection", conditions) == values[0]


# ---------------------------------------------------------------------------------------- parsing


def test_the_three_written_forms():
    text = "0, 1,1,1,1,1,1,1,1,1, 0.5, 0,0,0,0,0,0,0,0,0"
    expected = (0.0,) + (1.0,) * 9 + (0.5,) + (0.0,) * 9
    assert block_weight_values(text) == expected
    assert block_weight_values([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0]) == expected
    assert block_weight_values(" OUT07 ") == PRESETS["OUT07"]
    assert block_weight_values("-0.5," * 19 + "1e-1")[-1] == 0.1  # any finite number, as SuperMerger reads them


@pytest.mark.parametrize(
    "value, problem",
    [
        ("1,1,0.5", "3 values; SDXL block weights take 20 (BASE, IN00-IN08, M00, OUT00-OUT08)"),
        ([1.0] * 19, "19 values; SDXL block weights take 20"),
        ([1.0] * 21, "the VAE is not one of them"),
        ("1," * 19 + "x", "value 20 ('x') is not a number"),
        ("1," * 19 + "nan", "value 20 ('nan') must be a finite number"),
        ([True] + [1.0] * 19, "value 1 is a boolean, not a number"),
        (["1"] + [1.0] * 19, "value 1 is a string ('1'), not a number"),
        ("1,,1", "an empty value in '1,,1'"),
        ("GRAD_X", "unknown block-weight preset 'GRAD_X' (did you mean 'GRAD_V' or 'GRAD_A'?)"),
        ("grad_v", "unknown block-weight preset 'grad_v' (did you mean 'GRAD_V'?)"),
        ("0.5", "'0.5' is one number, not 20 block weights"),
        (0.5, "expected 20 comma-separated numbers, a list of 20 numbers or a preset name, got a number"),
        ({"a": 1}, "got a mapping"),
    ],
)
def test_bad_values_name_the_problem(value, problem):
    with pytest.raises(ValueError) as error:
        block_weight_values(value)
    assert problem in str(error.value)


def test_an_sd1_list_is_refused_with_the_sdxl_values_supermerger_would_use():
    sd1 = [float(i) for i in range(26)]
    with pytest.raises(ValueError) as error:
        block_weight_values(sd1)
    assert str(error.value).endswith(
        "26 is SuperMerger's SD 1.x layout; for SDXL it drops IN09-IN11 and OUT09-OUT11: "
        'mbw: "0,1,2,3,4,5,6,7,8,9,13,14,15,16,17,18,19,20,21,22"'
    )


# ---------------------------------------------------------------------------------------- presets


def test_sdxl_form_of_a_preset_is_supermergers_weighttoxl():
    sd1 = list(range(26))
    # SuperMerger: base = w[0]; weights = w[1:]; xl = weights[:9] + weights[12:22]
    weights = sd1[1:]
    assert sdxl_from_sd1(sd1) == tuple([sd1[0]] + weights[:9] + weights[12:22])
    assert sdxl_from_sd1(sd1) == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22)
    with pytest.raises(ValueError):
        sdxl_from_sd1(sd1[:25])


def test_presets_are_supermergers_master_list():
    assert len(PRESETS) == len(SD1_PRESETS) == 38
    assert all(len(v) == 26 for v in SD1_PRESETS.values()) and all(len(v) == 20 for v in PRESETS.values())
    assert {"ALL_R", "ALL_U", "ALL_X"}.isdisjoint(PRESETS)  # random presets have no values
    assert PRESETS["ALL_A"] == (0.0,) * 20 and PRESETS["ALL_B"] == (1.0,) * 20
    assert PRESETS["GRAD_V"] == (
        0.0, 1.0, 0.9166666667, 0.8333333333, 0.75, 0.6666666667, 0.5833333333, 0.5, 0.4166666667, 0.3333333333,
        0.0, 0.0833333333, 0.1666666667, 0.25, 0.3333333333, 0.4166666667, 0.5, 0.5833333333, 0.6666666667, 0.75,
    )  # fmt: skip
    assert PRESETS["OUT07"] == (0.0,) * 16 + (1.0,) * 4  # SD 1.x OUT05-OUT11 are 1: SDXL keeps OUT05-OUT08
    assert PRESETS["WRAP08"] == (0.0,) + (1.0,) * 4 + (0.0,) * 14 + (1.0,)
    assert PRESETS["SMOOTHSTEP*2"][10] == 1.0  # the SD 1.x M00 peak is kept at M00


def test_every_preset_is_documented_with_its_values():
    from tests.paths import REPO

    doc = (REPO / "docs" / "methods.md").read_text()
    for name, values in PRESETS.items():
        shown = ",".join(f"{v:.4f}".rstrip("0").rstrip(".") or "0" for v in values)
        assert re.search(rf"^{re.escape(name)} +{re.escape(shown)}$", doc, re.M), name


# ---------------------------------------------------------------------------------------- configs


def _config():
    return {
        "merge_method": "linear",
        "models": [
            {"model": {"model": {"path": "/m/a.safetensors"}}, "parameters": {"weight": {"mbw": "GRAD_V"}}},
            {"model": "/m/b+lora.safetensors", "parameters": {"weight": 0.5}},  # mergekit reads: model /m/b + a LoRA
        ],
        "parameters": {"weight": {"mbw": [1] * 20}, "normalize": True},
        "modules": {"clip_l": {"parameters": {"w": {"mbw": "ALL_A"}}, "models": [{"model": "/m/c.safetensors", "parameters": {"w": {"mbw": "ALL_B"}}}]}},
        "slices": [{"parameters": {"d": {"mbw": "ALL_B"}}, "sources": [{"model": "/m/d.safetensors", "parameters": {"d": {"mbw": "ALL_A"}}}]}],
        "sdxl": {
            "components": {
                "clip_g": {
                    "parameters": {"weight": {"mbw": "FLAT_25"}},
                    "models": [{"model": "/m/a.safetensors", "parameters": {"weight": {"mbw": "FLAT_75"}}}],
                }
            }
        },
    }


def test_expansion_reaches_every_parameter_scope_and_leaves_the_input_alone():
    raw = _config()
    before = copy.deepcopy(raw)
    out = expand_block_weights(raw, source="c.yaml")
    assert raw == before
    assert out["models"][0]["parameters"]["weight"] == block_weight_filters(PRESETS["GRAD_V"])
    assert out["models"][1]["parameters"]["weight"] == 0.5
    assert out["parameters"] == {"weight": block_weight_filters([1.0] * 20), "normalize": True}
    assert out["modules"]["clip_l"]["parameters"]["w"] == block_weight_filters(PRESETS["ALL_A"])
    assert out["modules"]["clip_l"]["models"][0]["parameters"]["w"] == block_weight_filters(PRESETS["ALL_B"])
    assert out["slices"][0]["parameters"]["d"] == block_weight_filters(PRESETS["ALL_B"])
    assert out["slices"][0]["sources"][0]["parameters"]["d"] == block_weight_filters(PRESETS["ALL_A"])
    component = out["sdxl"]["components"]["clip_g"]
    assert component["parameters"]["weight"] == block_weight_filters(PRESETS["FLAT_25"])
    assert component["models"][0]["parameters"]["weight"] == block_weight_filters(PRESETS["FLAT_75"])
    plain = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": [0, 1]}}]}
    assert expand_block_weights(plain, source="c.yaml") is plain


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["models"][0]["parameters"].update(weight={"mbw": "1,2"}),
         "config c.yaml: models[0] (a.safetensors): parameter 'weight': mbw: 2 values; SDXL block weights take 20"),
        (lambda c: c["models"][1]["parameters"].update(weight={"mbw": "NOPE"}),
         "config c.yaml: models[1] (b): parameter 'weight': mbw: unknown block-weight preset 'NOPE'"),
        (lambda c: c["parameters"].update(weight={"mbw": "ALL_A", "filter": "x"}),
         "config c.yaml: parameter 'weight': mbw: a block-weight setting takes only mbw:, not 'filter'"),
        (lambda c: c["sdxl"]["components"]["clip_g"]["models"][0]["parameters"].update(weight={"mbw": [1]}),
         "config c.yaml: sdxl.components.clip_g.models[0] (a.safetensors): parameter 'weight': mbw: 1 values"),
        (lambda c: c["modules"]["clip_l"]["parameters"].update(w={"mbw": None}),
         "config c.yaml: modules.clip_l: parameter 'w': mbw: expected 20 comma-separated numbers"),
    ],
)  # fmt: skip
def test_errors_name_the_entry_and_the_parameter(edit, message):
    raw = _config()
    edit(raw)
    with pytest.raises(BlockWeightsError) as error:
        expand_block_weights(raw, source="c.yaml")
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_errors_carry_the_location_the_caller_finds():
    raw = _config()
    raw["models"][0]["parameters"]["weight"] = {"mbw": "1"}
    asked = []

    def locate(path):
        asked.append(tuple(path))
        return "line 7, column 15"

    with pytest.raises(BlockWeightsError) as error:
        expand_block_weights(raw, source="c.yaml", locate=locate)
    assert asked == [("models", 0, "parameters", "weight")]
    assert str(error.value).endswith("(line 7, column 15)")
