"""LoRA files as mergekit models, end to end on a tiny SDXL.

The oracle for kohya LoRA / LoCon and PEFT files is diffusers itself: ``load_lora_weights`` +
``fuse_lora`` on the tiny pipeline must give the UNet and text-encoder weights of the plugin's
``task_arithmetic`` bake. LoHa, LoKr and DoRA (which diffusers does not load for SDXL) are checked
against the formulas written here; TGMD over LoRA models against TGMD over the same LoRAs baked
into checkpoints first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mergekit_sdxl.sdxl.tiny import OP_QKV, OP_T, sgm_name, tiny_shapes, write_tiny_sdxl  # noqa: E402
from mergekit_sdxl.sdxl.tiny_lora import (  # noqa: E402
    kohya_diffusers_name,
    kohya_modules,
    lora_factors,
    module_shape,
    peft_name,
    write_lora,
)

pytestmark = pytest.mark.slow  # whole merges and diffusers pipelines

BIN = Path(sys.executable).parent
U = "model.diffusion_model."
G = "conditioner.embedders.1.model."
COMPONENTS = {"unet": "unet", "text_encoder": "clip_l", "text_encoder_2": "clip_g"}


@pytest.fixture(scope="module")
def shapes() -> Dict[str, Tuple[int, ...]]:
    return {k: v[0] for k, v in tiny_shapes().items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora_base") / "base.safetensors"
    write_tiny_sdxl(path, seed=0)
    return path


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "hash-cache"))


def _merge(config: dict, out: Path) -> Dict[str, torch.Tensor]:
    from mergekit_sdxl.host.driver import run_sdxl_merge
    from mergekit_sdxl.host.mergekit_api import MergeOptions

    run_sdxl_merge(yaml.safe_dump(config, sort_keys=False), str(out), MergeOptions(quiet=True))
    return load_file(str(out))


def _lora_model(base: Path, lora: Path, weight: Optional[float] = 1.0) -> dict:
    entry: dict = {"model": {"model": {"path": str(base)}, "lora": {"path": str(lora)}}}
    if weight is not None:
        entry["parameters"] = {"weight": weight}
    return entry


def _bake_config(base: Path, loras: List[Tuple[Path, float]]) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": {"model": {"path": str(base)}},
        "models": [_lora_model(base, p, w) for p, w in loras],
        "dtype": "float32",
        "out_dtype": "float32",
    }


def _kohya_file(path: Path, shapes, *, names="sgm", rank=4, alpha=2.0, conv=True, seed=0, every=3) -> Path:
    """A kohya LoRA/LoCon over every ``every``-th module kohya's SDXL trainer adapts."""
    modules = {}
    for i, (name, target) in enumerate(kohya_modules(shapes, conv=conv)):
        if i % every:
            continue
        factors = lora_factors("lora", module_shape(target, shapes), rank, seed=seed + i, alpha=alpha)
        if names == "peft":
            modules[peft_name(name)] = {"lora_A.weight": factors["lora_down.weight"], "lora_B.weight": factors["lora_up.weight"]}
            continue
        spelled = kohya_diffusers_name(name) if names == "diffusers" and name.startswith("lora_unet_") else name
        modules[spelled or name] = factors
    return write_lora(path, modules, metadata={"ss_base_model_version": "sdxl_base_v1-0"})


def _fused_by_diffusers(base: Path, config_dir: Path, lora: Path, scale: float) -> Dict[str, Dict[str, torch.Tensor]]:
    from mergekit_sdxl.sdxl.diffusers_check import load_pipeline

    pipe = load_pipeline(base, config_dir)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return {c: getattr(pipe, c).state_dict() for c in COMPONENTS}


def _as_sgm(fused: Dict[str, Dict[str, torch.Tensor]], merged: Dict[str, torch.Tensor]):
    """(diffusers key, diffusers value, the merged file's value there) for every weight."""
    for component, state in fused.items():
        for key, value in state.items():
            if key.endswith("position_ids"):
                continue
            name, op = sgm_name(COMPONENTS[component], key)
            mine = merged[name].float()
            if op in OP_QKV:
                n = mine.shape[0] // 3
                i = OP_QKV.index(op)
                mine = mine[i * n : (i + 1) * n]
            elif op == OP_T:
                mine = mine.T
            yield f"{component}.{key}", value.float(), mine


@pytest.mark.parametrize(
    "names, scale",
    [("sgm", 1.0), ("sgm", 0.7), ("diffusers", 1.0), ("peft", 1.0)],
    ids=["kohya-sgm", "kohya-sgm-strength-0.7", "kohya-diffusers-names", "peft"],
)
def test_bake_equals_diffusers_fuse_lora(base, shapes, tiny_config_dir, tmp_path, names, scale):
    lora = _kohya_file(tmp_path / f"{names}.safetensors", shapes, names=names, alpha=None if names == "peft" else 2.0)
    merged = _merge(_bake_config(base, [(lora, scale)]), tmp_path / "baked.safetensors")
    fused = _fused_by_diffusers(base, tiny_config_dir, lora, scale)
    base_sd = load_file(str(base))
    changed = 0
    worst = 0.0
    for _key, value, mine in _as_sgm(fused, merged):
        worst = max(worst, float((value - mine).abs().max()))
    for name in merged:
        changed += not torch.equal(merged[name].float(), base_sd[name].float())
    assert worst <= 1e-5
    # every adapted module changed its key (CLIP-G's q/k/v share one): the comparison compared something
    n_keys = len({t.weight for i, (_, t) in enumerate(kohya_modules(shapes, conv=True)) if i % 3 == 0})
    assert changed == n_keys


def _whole(name: str, base_sd) -> torch.Tensor:
    return base_sd[name].float()


def test_loha_lokr_dora_bake_equals_the_formulas(base, shapes, tmp_path):
    proj = U + "input_blocks.4.1.proj_in.weight"  # [64, 64]
    conv = U + "input_blocks.1.0.in_layers.2.weight"  # [32, 32, 3, 3]
    ff = U + "middle_block.1.transformer_blocks.0.ff.net.2.weight"
    qkv = G + "transformer.resblocks.2.attn.in_proj_weight"
    attn = U + "output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight"
    specs = {
        "lora_unet_input_blocks_4_1_proj_in": ("loha", proj, dict(rank=3, alpha=1.5)),
        "lora_unet_input_blocks_1_0_in_layers_2": ("loha", conv, dict(rank=2, alpha=1.0, tucker=True)),
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2": ("lokr", ff, dict(rank=4, alpha=2.0, full_w1=True, full_w2=False)),
        "lora_te2_text_model_encoder_layers_2_self_attn_k_proj": ("lokr", qkv, dict(rank=2, alpha=8.0, full_w1=True, full_w2=True)),
        "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_q": ("lora", attn, dict(rank=4, alpha=2.0, dora="rows")),
        "lora_unet_output_blocks_0_0_in_layers_2": ("lora", U + "output_blocks.0.0.in_layers.2.weight", dict(rank=2, alpha=1.0, dora="columns")),
    }
    modules = {}
    from mergekit_sdxl.sdxl.lora_keys import target_of

    for i, (name, (kind, _key, kw)) in enumerate(specs.items()):
        target = target_of(name)
        assert target is not None
        modules[name] = lora_factors(kind, module_shape(target, shapes), seed=10 + i, **kw)
    lora = write_lora(tmp_path / "lyco.safetensors", modules, dtype=torch.float32)
    merged = _merge(_bake_config(base, [(lora, 1.0)]), tmp_path / "lyco_baked.safetensors")
    base_sd = load_file(str(base))

    def changed(name: str, key: str, whole: torch.Tensor) -> torch.Tensor:
        f = modules[name]
        kind, _, kw = specs[name]
        if kind == "loha":
            if "hada_t1" in f:
                w1 = torch.einsum("ijkl,jr,ip->prkl", f["hada_t1"], f["hada_w1_b"], f["hada_w1_a"])
                w2 = torch.einsum("ijkl,jr,ip->prkl", f["hada_t2"], f["hada_w2_b"], f["hada_w2_a"])
                delta = w1 * w2
            else:
                delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
            scale = kw["alpha"] / kw["rank"]
        elif kind == "lokr":
            w1 = f["lokr_w1"]
            w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
            delta = torch.kron(w1, w2)
            scale = 1.0 if "lokr_w2" in f else kw["alpha"] / kw["rank"]  # both factors full: scale 1
        else:
            delta = f["lora_up.weight"].flatten(1) @ f["lora_down.weight"].flatten(1)
            scale = kw["alpha"] / kw["rank"]
        new = whole + (delta * scale).reshape(whole.shape)
        if "dora_scale" in f:
            m = f["dora_scale"]
            if m.shape[0] == 1:  # per input channel
                norm = new.transpose(0, 1).reshape(new.shape[1], -1).norm(dim=1).reshape(m.shape)
            else:
                norm = new.reshape(new.shape[0], -1).norm(dim=1).reshape(m.shape)
            new = new * m / (norm + torch.finfo(torch.float32).eps)
        return new

    for name, (_kind, key, _kw) in specs.items():
        whole = _whole(key, base_sd)
        if key == qkv:
            n = whole.shape[0] // 3
            expected = whole.clone()
            expected[n : 2 * n] = changed(name, key, whole[n : 2 * n])  # k is the middle third
        else:
            expected = changed(name, key, whole)
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6, msg=name)
    untouched = [k for k in merged if k not in {s[1] for s in specs.values()}]
    assert all(torch.equal(merged[k].float(), base_sd[k].float()) for k in untouched)


def test_text_encoder_qkv_without_out_proj_and_mixed_alphas(base, shapes, tmp_path):
    """The two diffusers pitfalls: CLIP q/k/v adapted without out_proj, and alphas that differ
    between modules. Each module keeps its own alpha and lands in its own rows."""
    from mergekit_sdxl.sdxl.lora_keys import target_of

    alphas = {"q": 1.0, "k": 4.0, "v": 0.5}
    modules = {}
    for x, alpha in alphas.items():
        for te in ("te1", "te2"):
            name = f"lora_{te}_text_model_encoder_layers_7_self_attn_{x}_proj"
            modules[name] = lora_factors("lora", module_shape(target_of(name), shapes), 4, seed=len(modules), alpha=alpha)
    lora = write_lora(tmp_path / "qkv.safetensors", modules, dtype=torch.float32)
    merged = _merge(_bake_config(base, [(lora, 1.0)]), tmp_path / "qkv_baked.safetensors")
    base_sd = load_file(str(base))
    for name, f in modules.items():
        target = target_of(name)
        alpha = float(f["alpha"])
        whole = _whole(target.weight, base_sd)
        rows = slice(None) if target.block is None else slice(target.block * whole.shape[0] // 3, (target.block + 1) * whole.shape[0] // 3)
        expected = whole[rows] + f["lora_up.weight"] @ f["lora_down.weight"] * (alpha / 4)
        torch.testing.assert_close(merged[target.weight][rows], expected, rtol=1e-5, atol=1e-6, msg=name)


def _subset_lora(path: Path, shapes, start: int, seed: int) -> Path:
    """A LoRA over every 4th kohya module from ``start``: different LoRAs touch different keys."""
    modules = {
        name: lora_factors("lora", module_shape(t, shapes), 2, seed=seed + i, alpha=1.0, std=0.1)
        for i, (name, t) in enumerate(kohya_modules(shapes, conv=False))
        if i % 4 in (start, (start + 1) % 4)
    }
    return write_lora(path, modules)


def test_tgmd_over_lora_models_equals_tgmd_over_the_baked_loras(base, shapes, tmp_path):
    loras = [_subset_lora(tmp_path / f"l{i}.safetensors", shapes, i, 100 * i) for i in range(3)]
    finetune = tmp_path / "finetune.safetensors"
    write_tiny_sdxl(finetune, seed=9, base=base, noise=0.01)
    baked = []
    for i, lora in enumerate(loras):
        out = tmp_path / f"baked{i}.safetensors"
        _merge(_bake_config(base, [(lora, 1.0)]), out)
        baked.append(out)
    params = {"drop_rate": 0.0, "seed": 7}  # masks name their model: compare with no DROP
    common = {"merge_method": "tgmd", "base_model": {"model": {"path": str(base)}}, "dtype": "float64", "out_dtype": "float32", "parameters": params}
    virtual = _merge(
        {**common, "models": [_lora_model(base, p, None) for p in loras] + [{"model": {"model": {"path": str(finetune)}}}]},
        tmp_path / "tgmd_loras.safetensors",
    )
    reference = _merge(
        {**common, "models": [{"model": {"model": {"path": str(p)}}} for p in baked + [finetune]]},
        tmp_path / "tgmd_baked.safetensors",
    )
    for key in reference:
        torch.testing.assert_close(virtual[key], reference[key], rtol=1e-6, atol=1e-7, msg=key)
    # LoRAs alone: a key no LoRA changes is the base, exactly
    only = _merge({**common, "models": [_lora_model(base, p, None) for p in loras]}, tmp_path / "tgmd_only.safetensors")
    base_sd = load_file(str(base))
    norm = U + "input_blocks.4.1.norm.weight"
    assert torch.equal(only[norm], base_sd[norm].float())
    touched = U + "input_blocks.4.1.proj_in.weight"
    assert not torch.equal(only[touched], base_sd[touched].float())


@pytest.mark.parametrize("method", ["ties_soup", "dgmla", "linear"])
def test_other_methods_run_on_lora_models(base, shapes, tmp_path, method):
    from mergekit_sdxl.host.mergekit_api import registered_methods

    if method not in {m.spec.name for m in registered_methods()}:
        pytest.skip(f"{method} is not registered in this checkout")
    loras = [_subset_lora(tmp_path / f"m{i}.safetensors", shapes, i, 7 * i) for i in range(2)]
    config = {
        "merge_method": method,
        "base_model": {"model": {"path": str(base)}},
        "models": [_lora_model(base, p, None) for p in loras],
        "dtype": "float32",
        "out_dtype": "float32",
    }
    if method == "linear":
        config["parameters"] = {"weight": 1.0}
    merged = _merge(config, tmp_path / f"{method}.safetensors")
    base_sd = load_file(str(base))
    touched = U + "input_blocks.4.1.proj_in.weight"
    assert not torch.equal(merged[touched], base_sd[touched].float())
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([str(BIN / "mergekit-sdxl"), *args], capture_output=True, text=True, env=env, cwd=cwd)


def _sd1_lora(path: Path) -> Path:
    modules = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": lora_factors("lora", (768, 768), 4, alpha=4.0),
        "lora_unet_down_blocks_0_attentions_0_proj_in": lora_factors("lora", (320, 320), 4, alpha=4.0),
    }
    return write_lora(path, modules, metadata={"ss_base_model_version": "sd_v1"})


def test_an_sd1_lora_is_refused_by_name(base, tmp_path):
    sd1 = _sd1_lora(tmp_path / "sd15_detail.safetensors")
    config = tmp_path / "bake.yaml"
    config.write_text(yaml.safe_dump(_bake_config(base, [(sd1, 1.0)])))
    result = _cli("merge", str(config), str(tmp_path / "out.safetensors"), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "sd15_detail.safetensors" in result.stderr and "a LoRA for SD 1.x" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_a_lora_key_that_maps_to_no_sdxl_key_is_an_error_naming_it(base, shapes, tmp_path):
    from mergekit_sdxl.errors import UserError

    good = lora_factors("lora", shapes[U + "input_blocks.4.1.proj_in.weight"], 2)
    lora = write_lora(
        tmp_path / "odd.safetensors",
        {"lora_unet_input_blocks_4_1_proj_in": good, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn3_to_q": good},
    )
    with pytest.raises(UserError, match=r"odd\.safetensors.*lora_unet_input_blocks_4_1_transformer_blocks_0_attn3_to_q"):
        _merge(_bake_config(base, [(lora, 1.0)]), tmp_path / "odd_out.safetensors")


def test_recipe_loras_writes_a_bake_in_config_with_provenance(base, shapes, tmp_path):
    folder = tmp_path / "loras"
    a = _kohya_file(folder / "a_style.safetensors", shapes, every=5, seed=1)
    b = _kohya_file(folder / "b_detail.safetensors", shapes, every=7, seed=2, conv=False)
    _sd1_lora(folder / "old_sd15.safetensors")
    write_tiny_sdxl(folder / "a_checkpoint.safetensors", seed=4)
    out_yaml = tmp_path / "bake.yaml"
    result = _cli("recipe", "--loras", str(folder), "--base", str(base), "-o", str(out_yaml), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = out_yaml.read_text()
    config = yaml.safe_load(text)
    assert config["merge_method"] == "task_arithmetic"
    assert [m["model"]["lora"]["path"] for m in config["models"]] == [str(a), str(b)]
    assert "old_sd15.safetensors: a LoRA for SD 1.x" in text and "a_checkpoint.safetensors: not a LoRA file" in text
    # the LoRAs are inputs: pinned, hashed into the output's metadata, and never written over
    from mergekit_sdxl.errors import OutputError
    from mergekit_sdxl.host.driver import run_sdxl_merge
    from mergekit_sdxl.host.mergekit_api import MergeOptions

    with pytest.raises(OutputError):
        run_sdxl_merge(text, str(a), MergeOptions(quiet=True))
    out = tmp_path / "baked.safetensors"
    run_sdxl_merge(text, str(out), MergeOptions(quiet=True), source=str(out_yaml))
    with safe_open(str(out), "pt") as handle:
        inputs = json.loads(handle.metadata()["mergekit_sdxl.inputs"])
    from mergekit_sdxl.io.hashing import sha256_file

    assert [(i["name"], i["role"]) for i in inputs] == [("base.safetensors", "base"), ("a_style.safetensors", "lora"), ("b_detail.safetensors", "lora")]
    assert inputs[1]["sha256"] == sha256_file(a) and inputs[1]["autov2"] == inputs[1]["sha256"][:10]
