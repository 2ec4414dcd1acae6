"""``merge --report``'s statistics come from the merge's own reads (host/merge_report.py): the same
bytes read as a merge without the report, the same numbers as the report pass over the inputs,
chunked from the files or whole, on lanes, and for a resumed merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # whole (tiny) merges

WIDTH = 1 / 32


def _config(method: str, params: str = "{seed: 3, drop_rate: 0.2}") -> str:
    return f"""merge_method: {method}
base_model: {{model: {{path: base.safetensors}}}}
models:
  - model: {{model: {{path: a.safetensors}}}}
  - model: {{model: {{path: b.safetensors}}}}
  - model: {{model: {{path: c.safetensors}}}}
parameters: {params}
dtype: float64
out_dtype: float16
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    folder = tmp_path_factory.mktemp("report_models")
    write_synthetic_sdxl(folder / "base.safetensors", seed=0, width=WIDTH)
    for seed, name in ((1, "a"), (2, "b"), (3, "c")):
        write_synthetic_sdxl(folder / f"{name}.safetensors", seed=seed, base=folder / "base.safetensors", width=WIDTH, noise=0.01 * seed)
    return folder


@pytest.fixture
def here(models, tmp_path, monkeypatch):
    monkeypatch.chdir(models)  # the configs name the inputs relative to their folder
    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "cache"))
    return models


def _merge(config: str, out: Path, *, budget: str = "1GB", **kw):
    from mergekit_sdxl.host.driver import run_sdxl_merge
    from mergekit_sdxl.host.mergekit_api import MergeOptions

    return run_sdxl_merge(config, str(out), MergeOptions(quiet=True), overrides={"memory_budget": budget}, **kw)


def _pass_report(config: str, merged: Path) -> dict:
    from mergekit_sdxl.host.report_pass import prepare_report, run_report

    return run_report(prepare_report(config, source="recipe.yaml", merged=str(merged)))


def _close(ours: dict, theirs: dict) -> None:
    assert ours["inputs"] == theirs["inputs"] and ours["blocks"] == theirs["blocks"] and ours["keys"] == theirs["keys"]
    for table in ("similarity", "task_vector_norm"):
        for component, value in theirs[table].items():
            torch.testing.assert_close(torch.tensor(ours[table][component]), torch.tensor(value), rtol=1e-12, atol=1e-14)
    for table in ("block_change", "sign_agreement"):
        for block, value in theirs[table].items():
            assert ours[table][block] == pytest.approx(value, rel=1e-12, abs=1e-15), (table, block)
    assert ours["elements"] == theirs["elements"]


@pytest.mark.parametrize(
    "budget", [pytest.param("1GB", marks=pytest.mark.heavy), "16MB"], ids=["whole-keys", "chunks-from-files"]
)
def test_the_merge_reads_no_more_with_the_report_and_gives_the_pass_numbers(here, tmp_path, monkeypatch, budget):
    from mergekit_sdxl.host.tasks import MergeKeyTask

    from_files = []
    real = MergeKeyTask._file_readers

    def spy(self):
        from_files.append(self.merge.output_weight.name)
        return real(self)

    monkeypatch.setattr(MergeKeyTask, "_file_readers", spy)
    config = _config("tgmd")
    plain = _merge(config, tmp_path / "plain" / "out.safetensors", budget=budget)
    recorded = _merge(config, tmp_path / "recorded" / "out.safetensors", budget=budget, collect_report=True)
    assert recorded.write.sha256 == plain.write.sha256  # the report changes nothing of the merge
    assert recorded.bytes_read == plain.bytes_read  # and reads nothing more: no pass of its own
    assert recorded.report is not None and recorded.report.reread_bytes == 0
    assert bool(from_files) == (budget == "16MB"), len(from_files)  # keys read in row chunks from the files
    ours = recorded.report.collector.build()
    assert ours["statistics_from"].startswith("the merge itself")
    _close(ours, _pass_report(config, tmp_path / "recorded" / "out.safetensors"))
    # The merge's own median weights: per block, each a convex combination of the three inputs.
    for block, weights in ours["median_weight"]["blocks"].items():
        assert len(weights) == 3 and sum(weights) == pytest.approx(1.0) and min(weights) >= 0.0, block


def test_median_weights_are_the_merges_own(here, tmp_path):
    """geometric_median (the base one more point): per block, the element-weighted mean of each
    key's Weiszfeld weights of the inputs, renormalised without the base's share, recomputed here
    by the direct iteration on the files' tensors. tgmd: the weights of its masked task vectors,
    not those of the raw ones that the report pass computes."""
    from safetensors.torch import load_file

    from mergekit_sdxl.kernels.geomedian import weiszfeld

    result = _merge(_config("geometric_median", "{eps: 1e-6}"), tmp_path / "g.safetensors", collect_report=True)
    ours = result.report.collector.build()["median_weight"]["blocks"]
    files = [load_file(name) for name in ("base.safetensors", "a.safetensors", "b.safetensors", "c.safetensors")]
    prefix = "conditioner.embedders.0.transformer.text_model.encoder.layers.0."
    total, elements = torch.zeros(3, dtype=torch.float64), 0
    for key in sorted(k for k in files[0] if k.startswith(prefix)):
        points = torch.stack([f[key].reshape(-1).double() for f in files])
        coeffs = weiszfeld(points, eps=1e-6).coeffs
        total += coeffs[1:] / coeffs[1:].sum() * points.shape[1]
        elements += points.shape[1]
    torch.testing.assert_close(torch.tensor(ours["clip_l.00"], dtype=torch.float64), total / elements, rtol=1e-5, atol=1e-8)

    from mergekit_sdxl.host.report_pass import prepare_report, run_report

    config = _config("tgmd", "{seed: 3, drop_rate: 0.5}")
    result = _merge(config, tmp_path / "t.safetensors", collect_report=True)
    ours = result.report.collector.build()["median_weight"]["blocks"]
    theirs = run_report(prepare_report(config, source="recipe.yaml", merged=str(tmp_path / "t.safetensors")))["median_weight"]["blocks"]
    assert set(ours) == set(theirs)
    assert any(ours[b] != pytest.approx(theirs[b], rel=1e-3) for b in ours)
    assert all(sum(w) == pytest.approx(1.0) for w in ours.values())


@pytest.mark.parametrize(
    "method", [pytest.param("ties_soup", marks=pytest.mark.heavy), "linear", pytest.param("geometric_median", marks=pytest.mark.heavy)]
)
def test_other_methods_report_from_the_merge(here, tmp_path, method):
    params = {"ties_soup": "{seed: 3}", "linear": "{weight: 1.0}", "geometric_median": "{eps: 1e-6}"}[method]
    config = _config(method, params)
    result = _merge(config, tmp_path / "out.safetensors", collect_report=True)
    ours = result.report.collector.build()
    _close(ours, _pass_report(config, tmp_path / "out.safetensors"))
    assert (ours["median_weight"] is not None) == (method == "geometric_median")
    assert result.report.reread_bytes == 0  # every row came from the merge's own reads


@pytest.mark.heavy
def test_lanes_report_the_same_numbers(here, tmp_path):
    config = _config("tgmd")
    one = _merge(config, tmp_path / "one" / "out.safetensors", collect_report=True)
    lanes = _merge(config, tmp_path / "lanes" / "out.safetensors", collect_report=True, devices=["cpu", "cpu"])
    assert lanes.write.sha256 == one.write.sha256
    _close(lanes.report.collector.build(), one.report.collector.build())


def test_a_resumed_merge_reports_the_keys_of_its_earlier_run(here, tmp_path, monkeypatch, capsys):
    """The keys an interrupted run wrote are added by a pass over them; the report equals the pass's."""
    import sys

    from mergekit_sdxl.cli.entry import main
    from mergekit_sdxl.host import streaming
    from mergekit_sdxl.host.tasks import MergeKeyTask

    config = _config("tgmd")
    (tmp_path / "recipe.yaml").write_text(config)
    out = tmp_path / "out.safetensors"
    calls = {"n": 0}
    real = MergeKeyTask.execute

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 400:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    folder = tmp_path / "report"
    args = ["mergekit-sdxl", "merge", str(tmp_path / "recipe.yaml"), str(out), "--memory-budget", "1GB", "--report", str(folder)]
    monkeypatch.setattr(sys, "argv", args)

    def run() -> object:
        try:
            main()
        except SystemExit as done:
            return done.code
        return 0

    monkeypatch.setattr(MergeKeyTask, "execute", interrupted)
    assert run() not in (0, None)
    assert not out.exists() and not folder.exists()
    monkeypatch.setattr(MergeKeyTask, "execute", real)
    resumed_keys = []
    note = streaming.active_recorder

    def spy():
        recorder = note()
        if recorder is not None:
            resumed_keys.append(recorder)
        return recorder

    monkeypatch.setattr(streaming, "active_recorder", spy)
    assert run() in (0, None), capsys.readouterr()
    assert resumed_keys and len(resumed_keys[0].resumed) >= 300  # the earlier run's keys
    ours = json.loads((folder / "report.json").read_text())
    assert "keys written by an earlier run of this resumed merge" in ours["statistics_from"]
    _close(ours, _pass_report(config, out))


def test_a_lora_bake_in_reports_each_lora_by_its_file(here, tmp_path):
    """LoRA models ({model: base, lora: file}), which the report command cannot read: the inputs
    are the LoRA files, and a LoRA's task vector is its change (zero on the keys it leaves alone),
    checked against the change computed here from its factors (scale alpha / rank = 0.5)."""
    from mergekit_sdxl.host.checkpoint import checkpoint_index
    from mergekit_sdxl.sdxl.manifest import component_of
    from mergekit_sdxl.sdxl.tiny_lora import kohya_modules, lora_factors, module_shape, write_lora

    shapes = dict(checkpoint_index(str(here / "base.safetensors")).shapes)
    plain = [(name, t) for name, t in kohya_modules(shapes, conv=False) if t.block is None and not t.transpose]
    modules: list = []
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        modules += [m for m in plain if m[0].startswith(prefix)][:3]
    assert len(modules) == 9
    changes = []
    for n in range(2):
        files, change = {}, {}
        for i, (name, target) in enumerate(modules[n:]):  # the second LoRA leaves the first module alone
            factors = lora_factors("lora", module_shape(target, shapes), 2, seed=10 * n + i, alpha=1.0)
            files[name] = factors
            up, down = factors["lora_up.weight"].half().double(), factors["lora_down.weight"].half().double()
            change[target.weight] = (0.5 * up @ down).reshape(-1)
        write_lora(tmp_path / f"style_{n}.safetensors", files, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
        changes.append(change)
    entries = "".join(
        f"  - model: {{model: {{path: base.safetensors}}, lora: {{path: {tmp_path / f'style_{n}.safetensors'}}}}}\n"
        for n in range(2)
    )
    config = f"merge_method: task_arithmetic\nbase_model: {{model: {{path: base.safetensors}}}}\nmodels:\n{entries}"
    config += "parameters: {weight: 1.0}\ndtype: float32\nout_dtype: float16\n"
    result = _merge(config, tmp_path / "baked.safetensors", collect_report=True)
    report = result.report.collector.build()
    assert report["inputs"] == ["style_0.safetensors", "style_1.safetensors"]
    vectors = {}
    for component in ("unet", "clip_l", "clip_g"):
        for n in range(2):
            parts = [changes[n].get(k, torch.zeros(changes[0][k].numel(), dtype=torch.float64))
                     for k in sorted(changes[0]) if component_of(k) == component]
            vectors[(component, n)] = torch.cat(parts)
        for n in range(2):
            assert report["task_vector_norm"][component][n] == pytest.approx(float(vectors[(component, n)].norm()), rel=1e-4)
    a, b = (torch.cat([vectors[(c, n)] for c in ("unet", "clip_l", "clip_g")]) for n in range(2))
    assert report["similarity"]["model"][0][1] == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-4, abs=1e-6)


def test_the_report_command_points_a_lora_bake_in_to_merge_report(here, tmp_path):
    from mergekit_sdxl.errors import UsageError
    from mergekit_sdxl.host.report_pass import prepare_report

    config = (
        "merge_method: task_arithmetic\nbase_model: {model: {path: base.safetensors}}\nmodels:\n"
        "  - model: {model: {path: base.safetensors}, lora: {path: a.safetensors}}\n"
        "parameters: {weight: 1.0}\n"
    )
    with pytest.raises(UsageError, match=r"config recipe.yaml: its models are LoRAs on a base .* --report DIR`$"):
        prepare_report(config, source="recipe.yaml")
