"""Preflight validation of merge inputs (workflow/preflight.py)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_sdxl.sdxl.header import read_header
from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl
from mergekit_sdxl.workflow.preflight import PreflightError, inspect_file, preflight, scan_nonfinite

W = 1 / 64
U = "model.diffusion_model."
NAN_KEY = U + "out.2.weight"
VAE_KEY = "first_stage_model.decoder.conv_out.bias"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("preflight")
    base = d / "base.safetensors"
    write_synthetic_sdxl(base, width=W, seed=0)
    f = {"base": base}
    for i in (1, 2):
        f[f"m{i}"] = d / f"m{i}.safetensors"
        write_synthetic_sdxl(f[f"m{i}"], width=W, seed=i, base=base)
    f["vpred"] = d / "vpred.safetensors"
    write_synthetic_sdxl(f["vpred"], width=W, seed=3, base=base, extra_keys={"v_pred": torch.tensor([])})
    f["sd15"] = d / "sd15.safetensors"
    save_file(
        {
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(16, 8),
            U + "input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
        },
        str(f["sd15"]),
    )
    f["pruned"] = d / "pruned.safetensors"
    write_synthetic_sdxl(f["pruned"], width=W, seed=4, base=base, drop_keys=[U + "out.2.bias", U + "out.0.weight"],
                         extra_keys={"model_ema.decay": torch.tensor(0.99)})
    f["nan"] = d / "nan.safetensors"
    sd = load_file(str(f["m1"]))
    sd[NAN_KEY] = sd[NAN_KEY].clone()
    sd[NAN_KEY].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=sd[NAN_KEY].dtype)
    sd[VAE_KEY] = sd[VAE_KEY].clone()
    sd[VAE_KEY].view(-1)[0] = float("nan")
    save_file(sd, str(f["nan"]))
    f["trunc"] = d / "trunc.safetensors"
    shutil.copy(f["m2"], f["trunc"])
    with open(f["trunc"], "r+b") as fh:
        fh.truncate(os.path.getsize(f["trunc"]) - 4096)
    f["wide"] = d / "wide.safetensors"  # another width: every shape differs from the base
    write_synthetic_sdxl(f["wide"], width=1 / 32, seed=5)
    return f


def test_clean_inputs_pass_with_estimates(files):
    rep = preflight([files["m1"], files["m2"]], base=files["base"])
    assert rep.files == [str(files["base"]), str(files["m1"]), str(files["m2"])]
    assert rep.family == "sdxl-base" and set(rep.families.values()) == {"sdxl-base"}
    assert rep.prediction_type == "epsilon"
    assert rep.missing_keys == {} and rep.problems == []
    expected = sum(i.nbytes for p in (files["base"], files["m1"], files["m2"]) for i in read_header(p).tensors.values())
    assert rep.bytes_to_read == expected
    # largest tensor: the CLIP-G token embedding (49408 rows are never scaled)
    assert rep.largest_tensor[0] == "conditioner.embedders.1.model.token_embedding.weight"
    L = rep.largest_tensor[1]
    assert rep.estimated_peak_bytes() == L * 7 * 8 + L * 2
    assert rep.estimated_peak_bytes(memory_budget=1000) == 1000 + L * 2
    assert "3 inputs" in rep.summary()


def test_base_listed_among_inputs_counts_once(files):
    rep = preflight([files["base"], files["m1"]], base=files["base"])
    assert rep.n_inputs == 2


def test_sd15_in_sdxl_merge_is_refused_naming_the_file(files):
    with pytest.raises(PreflightError) as ei:
        preflight([files["m1"], files["sd15"]], base=files["base"])
    msg = str(ei.value)
    assert str(files["sd15"]) in msg and "SD 1.x" in msg and "sd1" in msg
    assert len(ei.value.problems) == 1
    assert isinstance(ei.value, ValueError)


def test_vpred_mix_refused_unless_allowed(files):
    with pytest.raises(PreflightError) as ei:
        preflight([files["m1"], files["vpred"]], base=files["base"])
    assert str(files["vpred"]) in str(ei.value) and "v-prediction" in str(ei.value) and "--allow-vpred-mix" in str(ei.value)
    rep = preflight([files["m1"], files["vpred"]], base=files["base"], allow_vpred_mix=True)
    assert any(str(files["vpred"]) in w for w in rep.warnings)
    assert rep.prediction_type == "epsilon"
    # without a base, the first input is the reference
    with pytest.raises(PreflightError):
        preflight([files["vpred"], files["m1"]], base=None)


def test_missing_keys_listed_per_file_with_names(files):
    with pytest.raises(PreflightError) as ei:
        preflight([files["pruned"]], base=files["base"])
    msg = str(ei.value)
    assert str(files["pruned"]) in msg and U + "out.2.bias" in msg and U + "out.0.weight" in msg
    rep = preflight([files["pruned"]], base=files["base"], require_keys=False)
    assert list(rep.missing_keys) == [str(files["pruned"])]
    assert set(rep.missing_keys[str(files["pruned"])]) == {U + "out.0.weight", U + "out.2.bias"}
    assert rep.extra_keys == {str(files["pruned"]): ["model_ema.decay"]}
    assert any("model_ema.decay" in w for w in rep.warnings)


def test_unreadable_and_missing_files(files, tmp_path):
    ghost = tmp_path / "nope.safetensors"
    with pytest.raises(PreflightError) as ei:
        preflight([files["trunc"], ghost, files["m1"]], base=files["base"])
    probs = ei.value.problems
    assert len(probs) == 2
    assert str(files["trunc"]) in probs[0] and "truncated" in probs[0]
    assert str(ghost) in probs[1] and "not found" in probs[1]
    with pytest.raises(PreflightError) as ei:
        preflight([files["m1"]], base=tmp_path / "nobase.safetensors")
    assert "base model file not found" in str(ei.value)
    with pytest.raises(PreflightError):
        preflight([tmp_path], base=None)
    with pytest.raises(PreflightError):
        preflight([], base=None)


def test_every_problem_is_listed(files):
    with pytest.raises(PreflightError) as ei:
        preflight([files["sd15"], files["vpred"], files["pruned"], files["trunc"]], base=files["base"])
    msg = str(ei.value)
    for k in ("sd15", "vpred", "pruned", "trunc"):
        assert str(files[k]) in msg, k
    assert msg.startswith("preflight found 4 problems")


def test_shape_mismatch_against_base(files):
    with pytest.raises(PreflightError) as ei:
        preflight([files["m1"], files["wide"]], base=files["base"])
    assert str(files["wide"]) in str(ei.value) and "shape" in str(ei.value)
    assert str(files["m1"]) not in str(ei.value).split("\n", 1)[1]


def test_scan_reports_nonfinite_per_file_and_key(files):
    res = scan_nonfinite(files["nan"])
    assert res.per_component["unet"] == 3 and res.per_component["vae"] == 1 and res.total == 4
    assert res.per_key == {NAN_KEY: 3, VAE_KEY: 1}
    assert scan_nonfinite(files["m1"]).total == 0
    rep = preflight([files["m1"], files["nan"]], base=files["base"], scan=True)
    assert rep.nonfinite[str(files["nan"])].total == 4
    assert any(str(files["nan"]) in w and NAN_KEY in w for w in rep.warnings)
    with pytest.raises(PreflightError) as ei:
        preflight([files["m1"], files["nan"]], base=files["base"], scan=True, nonfinite_is_error=True)
    assert NAN_KEY in str(ei.value)
    # without scan nothing is read
    assert preflight([files["nan"]], base=files["base"]).nonfinite == {}


def test_inspect_file_reports_errors_not_exceptions(files, tmp_path):
    from mergekit_sdxl.io.hashing import HashCache

    cache = HashCache(tmp_path / "c")
    r = inspect_file(files["trunc"], cache=cache)
    assert not r.ok and "truncated" in r.error and r.detection is None
    r = inspect_file(tmp_path / "ghost.safetensors", cache=cache)
    assert r.error == "file not found"
    r = inspect_file(files["m1"], cache=cache, scan=True)
    assert r.ok and r.detection.family == "sdxl-base" and r.autov2 == r.sha256[:10] and r.scan.total == 0
    d = r.to_dict()
    assert d["n_missing"] == 0 and d["nonfinite"]["total"] == 0 and d["family"] == "sdxl-base"


def test_inpaint_is_refused_by_default_like_the_loader(files, tmp_path):
    from mergekit_sdxl.sdxl.families import MERGEABLE_FAMILIES

    assert MERGEABLE_FAMILIES == ("sdxl-base",)
    in0 = U + "input_blocks.0.0.weight"
    shape = read_header(files["base"]).tensors[in0].shape
    inpaint = tmp_path / "inpaint.safetensors"
    write_synthetic_sdxl(inpaint, width=W, seed=6, extra_keys={in0: torch.zeros(shape[0], 9, *shape[2:], dtype=torch.float16)})
    with pytest.raises(PreflightError) as ei:
        preflight([files["m1"], inpaint], base=files["base"])
    assert len(ei.value.problems) == 1
    assert str(inpaint) in ei.value.problems[0] and "SDXL inpainting" in ei.value.problems[0]
    # callers that do handle inpainting can still ask for it
    rep = preflight([inpaint], families=("sdxl-inpaint",))
    assert rep.family == "sdxl-inpaint"


def test_scan_reads_every_float8_kind(tmp_path):
    p = tmp_path / "f8.safetensors"
    tensors = {
        "e4m3": torch.tensor([float("nan"), 1.0]).to(torch.float8_e4m3fn),
        "e5m2": torch.tensor([float("inf"), 1.0]).to(torch.float8_e5m2),
        "ids": torch.arange(4),
    }
    if hasattr(torch, "float8_e8m0fnu"):  # torch >= 2.7: finite in F8_E8M0, inf if scanned as float16
        tensors["e8m0"] = torch.tensor([2.0**100, 1.0]).to(torch.float8_e8m0fnu)
    save_file(tensors, str(p))
    res = scan_nonfinite(p)
    assert res.per_key == {"e4m3": 1, "e5m2": 1} and res.tensors_read == len(tensors) - 1
