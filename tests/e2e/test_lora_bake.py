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
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import yaml

pytest.importorskip("diffusers")  # the tiny SDXL is built from diffusers' model classes

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


def _peft_metadata(modules: Dict[str, dict], rank: int) -> Dict[str, str]:
    """diffusers' ``lora_adapter_metadata`` for these PEFT modules, as ``save_lora_weights`` writes
    it from each component's ``LoraConfig``: alpha 8 in the UNet with one module at alpha 2 (an
    ``alpha_pattern``), alpha 2 in CLIP-L, rsLoRA (alpha / sqrt(r)) at alpha 3 in CLIP-G."""
    from peft import LoraConfig

    settings: Dict[str, Dict[str, Any]] = {
        "unet": dict(lora_alpha=8, pattern=2.0),
        "text_encoder": dict(lora_alpha=2),
        "text_encoder_2": dict(lora_alpha=3, use_rslora=True),
    }
    flat: Dict[str, object] = {}
    for component, kw in settings.items():
        # module names as PEFT sees them (transformers 5's CLIP models have no text_model level)
        names = sorted(m[len(component) + 1 :].removeprefix("text_model.") for m in modules if m.split(".", 1)[0] == component)
        if not names:
            continue
        pattern = {names[0]: kw.pop("pattern")} if "pattern" in kw else {}
        config = LoraConfig(r=rank, target_modules=names, alpha_pattern=pattern, **kw).to_dict()
        for key, value in config.items():
            flat[f"{component}.{key}"] = sorted(value) if isinstance(value, set) else value
    return {"lora_adapter_metadata": json.dumps(flat, sort_keys=True)}


def _kohya_file(path: Path, shapes, *, names="sgm", rank=4, alpha=2.0, conv=True, seed=0, every=3) -> Path:
    """A kohya LoRA/LoCon over every ``every``-th module kohya's SDXL trainer adapts (``names``:
    kohya over the sgm UNet, kohya over the diffusers UNet, or the diffusers / PEFT layout with
    diffusers' ``lora_adapter_metadata``)."""
    modules: Dict[str, dict] = {}
    for i, (name, target) in enumerate(kohya_modules(shapes, conv=conv)):
        if i % every:
            continue
        factors = lora_factors("lora", module_shape(target, shapes), rank, seed=seed + i, alpha=alpha)
        if names == "peft":
            spelled = peft_name(name)
            assert spelled is not None, name
            spelled = spelled.replace("text_encoder_2.text_model.", "text_encoder_2.")  # both spellings diffusers reads
            modules[spelled] = {"lora_A.weight": factors["lora_down.weight"], "lora_B.weight": factors["lora_up.weight"]}
            continue
        spelled = kohya_diffusers_name(name) if names == "diffusers" and name.startswith("lora_unet_") else name
        modules[spelled or name] = factors
    metadata = _peft_metadata(modules, rank) if names == "peft" else {"ss_base_model_version": "sdxl_base_v1-0"}
    return write_lora(path, modules, metadata=metadata)


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
    [("sgm", 0.7), ("diffusers", 1.0), ("peft", 1.0)],
    ids=["kohya-locon-sgm-strength-0.7", "kohya-diffusers-names", "peft-with-adapter-metadata"],
)
def test_bake_equals_diffusers_fuse_lora(base, shapes, tiny_config_dir, tmp_path, names, scale):
    """UNet (linear and 3x3 conv modules), CLIP-L and CLIP-G weights of the plugin's bake are
    diffusers' own ``load_lora_weights`` + ``fuse_lora`` of the same file."""
    pytest.importorskip("peft")  # diffusers loads LoRAs through PEFT
    lora = _kohya_file(tmp_path / f"{names}.safetensors", shapes, names=names)
    merged = _merge(_bake_config(base, [(lora, scale)]), tmp_path / "baked.safetensors")
    fused = _fused_by_diffusers(base, tiny_config_dir, lora, scale)
    base_sd = load_file(str(base))
    compared = {c: 0 for c in COMPONENTS}
    worst = 0.0
    for key, value, mine in _as_sgm(fused, merged):
        worst = max(worst, float((value - mine).abs().max()))
        compared[key.split(".", 1)[0]] += 1
    assert worst <= 1e-5
    assert all(n > 100 for n in compared.values()), compared
    changed = {name for name in merged if not torch.equal(merged[name].float(), base_sd[name].float())}
    # every adapted module changed its key (CLIP-G's q/k/v share one): the comparison compared something
    adapted = [t for i, (_, t) in enumerate(kohya_modules(shapes, conv=True)) if i % 3 == 0]
    assert changed == {t.weight for t in adapted}
    assert any(len(shapes[t.weight]) == 4 and shapes[t.weight][2] == 3 for t in adapted)  # LoCon 3x3 convs included
    assert {t.component for t in adapted} == {"unet", "clip_l", "clip_g"}


U_PROJ = U + "input_blocks.4.1.proj_in.weight"  # [64, 64]
_LYCO: Dict[str, Tuple[str, str, Dict[str, Any]]] = {  # module -> (kind, the key it changes, lora_factors arguments)
    "lora_unet_input_blocks_4_1_proj_in": ("loha", U_PROJ, dict(rank=3, alpha=1.5)),
    "lora_unet_input_blocks_1_0_in_layers_2": ("loha", U + "input_blocks.1.0.in_layers.2.weight", dict(rank=2, alpha=1.0, tucker=True)),
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2": (
        "lokr", U + "middle_block.1.transformer_blocks.0.ff.net.2.weight", dict(rank=4, alpha=2.0, full_w1=True, full_w2=False),
    ),
    "lora_unet_input_blocks_5_1_proj_out": ("lokr", U + "input_blocks.5.1.proj_out.weight", dict(rank=2, alpha=3.0, full_w1=False, full_w2=True)),
    "lora_unet_input_blocks_2_0_in_layers_2": (
        "lokr", U + "input_blocks.2.0.in_layers.2.weight", dict(rank=3, alpha=1.0, full_w1=True, full_w2=False, tucker=True),
    ),
    "lora_te2_text_model_encoder_layers_2_self_attn_k_proj": (
        "lokr", G + "transformer.resblocks.2.attn.in_proj_weight", dict(rank=2, alpha=8.0, full_w1=True, full_w2=True),
    ),
    "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_q": (
        "lora", U + "output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight", dict(rank=4, alpha=2.0, dora="rows"),
    ),
    "lora_unet_output_blocks_0_0_in_layers_2": ("lora", U + "output_blocks.0.0.in_layers.2.weight", dict(rank=2, alpha=1.0, dora="columns")),
    "lora_unet_input_blocks_4_1_proj_out": ("loha", U + "input_blocks.4.1.proj_out.weight", dict(rank=2, alpha=4.0, dora="rows")),
}
# The diffusers pitfalls: CLIP q/k/v adapted without out_proj, alphas that differ between modules.
_QKV_ALPHAS = {"q": 1.0, "k": 4.0, "v": 0.5}
for _x, _alpha in _QKV_ALPHAS.items():
    _LYCO[f"lora_te1_text_model_encoder_layers_7_self_attn_{_x}_proj"] = (
        "lora", f"conditioner.embedders.0.transformer.text_model.encoder.layers.7.self_attn.{_x}_proj.weight", dict(rank=4, alpha=_alpha),
    )
    _LYCO[f"lora_te2_text_model_encoder_layers_7_self_attn_{_x}_proj"] = (
        "lora", G + "transformer.resblocks.7.attn.in_proj_weight", dict(rank=4, alpha=_alpha),
    )


@pytest.fixture(scope="module")
def lyco_bake(base, shapes, tmp_path_factory):
    """One LyCORIS-style file (LoHa, LoKr, DoRA, plain LoRA) baked once: (factors, merged, base)."""
    from mergekit_sdxl.sdxl.lora_keys import target_of

    folder = tmp_path_factory.mktemp("lyco")
    modules = {}
    for i, (name, (kind, _key, kw)) in enumerate(_LYCO.items()):
        target = target_of(name)
        assert target is not None, name
        modules[name] = lora_factors(kind, module_shape(target, shapes), seed=10 + i, **kw)
    lora = write_lora(folder / "lyco.safetensors", modules, dtype=torch.float32)
    merged = _merge(_bake_config(base, [(lora, 1.0)]), folder / "lyco_baked.safetensors")
    return modules, merged, load_file(str(base))


def _expected(name: str, f: Dict[str, torch.Tensor], whole: torch.Tensor) -> torch.Tensor:
    """The module's weight after the change, by the LyCORIS / A1111 formulas."""
    kind, _, kw = _LYCO[name]
    rank = kw["rank"]
    if kind == "loha":
        if "hada_t1" in f:
            w1 = torch.einsum("ijkl,jr,ip->prkl", f["hada_t1"], f["hada_w1_b"], f["hada_w1_a"])
            w2 = torch.einsum("ijkl,jr,ip->prkl", f["hada_t2"], f["hada_w2_b"], f["hada_w2_a"])
        else:
            w1, w2 = f["hada_w1_a"] @ f["hada_w1_b"], f["hada_w2_a"] @ f["hada_w2_b"]
        delta, scale = w1 * w2, kw["alpha"] / rank  # rank: of hada_w1_b
    elif kind == "lokr":
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_t2" in f:
            w2 = torch.einsum("ijkl,ip,jr->prkl", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
        w1 = w1.reshape(w1.shape + (1,) * (w2.ndim - 2))
        delta = torch.kron(w1.contiguous(), w2.contiguous())  # kron wants contiguous factors
        # alpha / the rank of the factorised factor (w2 first, as A1111's network_lokr); 1 when both are full
        scale = 1.0 if ("lokr_w1" in f and "lokr_w2" in f) else kw["alpha"] / rank
    else:
        delta, scale = f["lora_up.weight"].flatten(1) @ f["lora_down.weight"].flatten(1), kw["alpha"] / rank
    new = whole + (delta * scale).reshape(whole.shape)
    if "dora_scale" in f:  # LyCORIS apply_weight_decompose
        m = f["dora_scale"]
        if m.shape[0] == 1:  # one magnitude per input channel (wd_on_out=False)
            norm = new.transpose(0, 1).reshape(new.shape[1], -1).norm(dim=1).reshape(m.shape)
        else:
            norm = new.reshape(new.shape[0], -1).norm(dim=1).reshape(m.shape)
        new = new * m / (norm + torch.finfo(torch.float32).eps)
    return new


def test_loha_lokr_dora_bake_equals_the_formulas(lyco_bake):
    modules, merged, base_sd = lyco_bake
    from mergekit_sdxl.sdxl.lora_keys import target_of

    expected = {key: base_sd[key].float().clone() for _, key, _ in _LYCO.values()}
    for name, (_kind, key, _kw) in _LYCO.items():
        target = target_of(name)
        assert target is not None and target.weight == key
        whole = expected[key]
        if target.block is not None:  # CLIP-G q/k/v: a third of the stacked in_proj
            n = whole.shape[0] // 3
            rows = slice(target.block * n, (target.block + 1) * n)
            whole[rows] = _expected(name, modules[name], whole[rows].clone())
        else:
            expected[key] = _expected(name, modules[name], whole)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6, msg=key)
        assert not torch.equal(merged[key], base_sd[key].float())
    untouched = [k for k in merged if k not in expected]
    assert all(torch.equal(merged[k].float(), base_sd[k].float()) for k in untouched)


def test_text_encoder_qkv_without_out_proj_keep_their_own_alphas(lyco_bake):
    """Each of q/k/v keeps its own alpha and lands in its own rows, with no out_proj adapted."""
    modules, merged, base_sd = lyco_bake
    from mergekit_sdxl.sdxl.lora_keys import target_of

    for x, alpha in _QKV_ALPHAS.items():
        for te in ("te1", "te2"):
            name = f"lora_{te}_text_model_encoder_layers_7_self_attn_{x}_proj"
            target, f = target_of(name), modules[name]
            assert target is not None
            whole = base_sd[target.weight].float()
            n = whole.shape[0] // 3
            rows = slice(None) if target.block is None else slice(target.block * n, (target.block + 1) * n)
            change = f["lora_up.weight"] @ f["lora_down.weight"] * (alpha / 4)
            torch.testing.assert_close(merged[target.weight][rows], whole[rows] + change, rtol=1e-5, atol=1e-6, msg=name)
    out_proj = "conditioner.embedders.0.transformer.text_model.encoder.layers.7.self_attn.out_proj.weight"
    assert torch.equal(merged[out_proj].float(), base_sd[out_proj].float())


def _subset_lora(path: Path, shapes, start: int, seed: int) -> Path:
    """A LoRA over every 4th kohya module from ``start``: different LoRAs touch different keys."""
    modules = {
        name: lora_factors("lora", module_shape(t, shapes), 2, seed=seed + i, alpha=1.0, std=0.1)
        for i, (name, t) in enumerate(kohya_modules(shapes, conv=False))
        if i % 4 in (start, (start + 1) % 4)
    }
    return write_lora(path, modules)


def _changes(lora: Path) -> Dict[str, List[Tuple[slice, torch.Tensor]]]:
    """key -> (rows, change) of a kohya LoRA file, by the formula (alpha / rank) * up @ down."""
    from mergekit_sdxl.sdxl.lora_keys import parse_lora

    sd = load_file(str(lora))
    out: Dict[str, List[Tuple[slice, torch.Tensor]]] = {}
    for module in parse_lora(sd).modules.values():
        c = module.components
        up, down = sd[c["up"]].float().flatten(1), sd[c["down"]].float().flatten(1)
        change = up @ down * (float(sd[c["alpha"]]) / down.shape[0])
        n = change.shape[0]
        rows = slice(None) if module.target.block is None else slice(module.target.block * n, (module.target.block + 1) * n)
        out.setdefault(module.target.weight, []).append((rows, change))
    return out


def _baked(base_sd: Dict[str, torch.Tensor], lora: Path, weight: float = 1.0) -> Dict[str, torch.Tensor]:
    """base + weight * the LoRA's change, every key float32 (a checkpoint the LoRA was baked into)."""
    out = {k: v.float().clone() for k, v in base_sd.items()}
    for key, parts in _changes(lora).items():
        for rows, change in parts:
            out[key][rows] += weight * change.reshape(out[key][rows].shape)
    return out


def test_tgmd_over_lora_models_and_a_checkpoint_equals_tgmd_over_the_baked_loras(base, shapes, tmp_path):
    """LoRA models mixed with a full checkpoint: TGMD gives what it gives over checkpoints the
    LoRAs were baked into; a key that no input changes is the base's exactly."""
    from safetensors.torch import save_file

    loras = [_subset_lora(tmp_path / f"l{i}.safetensors", shapes, i, 100 * i) for i in range(3)]
    base_sd = load_file(str(base))
    baked = []
    for i, lora in enumerate(loras):
        save_file(_baked(base_sd, lora), str(tmp_path / f"baked{i}.safetensors"))
        baked.append(tmp_path / f"baked{i}.safetensors")
    # a fine-tune that changes the UNet's linear weights only
    g = torch.Generator().manual_seed(9)
    tuned = {k: (v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype)) if k.startswith(U) and v.ndim == 2 else v for k, v in base_sd.items()}
    finetune = tmp_path / "finetune.safetensors"
    save_file(tuned, str(finetune))
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
    untouched = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
    assert torch.equal(virtual[untouched], base_sd[untouched].float())
    te_only = [k for k in _changes(loras[0]) if not k.startswith(U)]  # changed by LoRAs alone
    assert te_only and all(not torch.equal(virtual[k], base_sd[k].float()) for k in te_only)


@pytest.mark.parametrize("method", ["ties_soup", "dgmla"])
def test_task_vector_methods_run_on_lora_models(base, shapes, tmp_path, method):
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
    merged = _merge(config, tmp_path / f"{method}.safetensors")
    base_sd = load_file(str(base))
    touched = set(_changes(loras[0])) | set(_changes(loras[1]))
    assert all(not torch.equal(merged[k], base_sd[k].float()) for k in touched)
    assert all(torch.equal(merged[k], base_sd[k].float()) for k in merged if k not in touched)  # no input changed them
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())


def test_linear_over_lora_models_averages_the_baked_weights(base, shapes, tmp_path):
    """mergekit's ``linear`` (normalised weights) over two LoRA models: base + (dW1 + dW2) / 2."""
    loras = [_subset_lora(tmp_path / f"n{i}.safetensors", shapes, i, 3 * i) for i in range(2)]
    config = {
        "merge_method": "linear",
        "models": [_lora_model(base, p, 1.0) for p in loras],
        "dtype": "float32",
        "out_dtype": "float32",
    }
    merged = _merge(config, tmp_path / "linear.safetensors")
    base_sd = load_file(str(base))
    a, b = _baked(base_sd, loras[0]), _baked(base_sd, loras[1])
    floats = [k for k, v in merged.items() if v.is_floating_point()]
    assert len(floats) > 2000
    for key in floats:
        torch.testing.assert_close(merged[key], (a[key] + b[key]) / 2, rtol=1e-5, atol=1e-6, msg=key)


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


def test_recipe_of_a_checkpoint_folder_leaves_a_lora_out_and_says_why(base, shapes, tmp_path):
    folder = tmp_path / "models"
    _kohya_file(folder / "style.safetensors", shapes, every=5, seed=1)
    write_tiny_sdxl(folder / "a.safetensors", seed=4)
    write_tiny_sdxl(folder / "b.safetensors", seed=5)
    out_yaml = tmp_path / "merge.yaml"
    result = _cli("recipe", str(folder), "--base", str(base), "-o", str(out_yaml), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = out_yaml.read_text()
    assert "style.safetensors: a LoRA file (" in text and "recipe --loras DIR" in text
    paths = [m["model"]["model"]["path"] for m in yaml.safe_load(text)["models"]]
    assert sorted(os.path.basename(p) for p in paths) == ["a.safetensors", "b.safetensors"]
