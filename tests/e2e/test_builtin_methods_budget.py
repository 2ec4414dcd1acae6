"""mergekit's built-in methods under ``mergekit-sdxl merge --memory-budget`` against mergekit's own
code on tiny SDXL files (base + 3 models at 1/16 width, float16).

The reference is ``mergekit-yaml`` in a child process, the plugin arriving through the ``.pth`` hook
as for any user, with the budgeted adapters turned off (``budgeted_methods.WITH_STATISTICS``
emptied): the plugin's stock path applies the same budget rules as ``mergekit-sdxl merge``, so
without that it would run the adapters too. Each key is then merged by mergekit's own method on
the whole tensors. Deterministic methods must give the same bytes (``sce`` and ``model_stock``,
whose statistics are float64 sums in a chunk-independent order: within 1e-6 relative); the random
ones draw counter-based masks, not torch's generator, and are checked by their scale against
mergekit's and by giving the same bytes whatever the chunking (in memory at 64MB, from the files
at 16MB).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

REFERENCE = (
    "import sys; import mergekit_sdxl.host.budgeted_methods as b; b.WITH_STATISTICS = frozenset(); "
    "from mergekit.scripts.run_yaml import main; sys.argv[0] = 'mergekit-yaml'; main()"
)
STOCK = "import sys; from mergekit.scripts.run_yaml import main; sys.argv[0] = 'mergekit-yaml'; main()"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    folder = tmp_path_factory.mktemp("builtin_inputs")
    write_synthetic_sdxl(folder / "base.safetensors", width=1 / 16, seed=0)
    for i in (1, 2, 3):
        write_synthetic_sdxl(folder / f"m{i}.safetensors", width=1 / 16, seed=i, base=folder / "base.safetensors")
    return folder


def _config(
    folder: Path, method: str, per_model: Dict[str, Any], shared: Dict[str, Any], models: int = 3, dtype: Optional[str] = "float32"
) -> Dict[str, Any]:
    config: Dict[str, Any] = {
        "merge_method": method,
        "base_model": {"model": {"path": str(folder / "base.safetensors")}},
        "models": [
            {"model": {"model": {"path": str(folder / f"m{i}.safetensors")}}, "parameters": dict(per_model)}
            for i in range(1, models + 1)
        ],
        "parameters": shared,
        "out_dtype": "float32" if dtype else "float16",
    }
    if dtype:
        config["dtype"] = dtype
    return config


def _child(script: str, config: Path, out_dir: Path, *extra: str) -> Path:
    done = subprocess.run(
        [sys.executable, "-c", script, str(config), str(out_dir), "--no-copy-tokenizer", *extra],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out_dir / "model.safetensors"


class _Spy:
    """What the budgeted merge did: keys split into several chunks, keys read from the files."""

    def __init__(self, monkeypatch) -> None:
        from mergekit_sdxl.host import budgeted_methods
        from mergekit_sdxl.host.tasks import MergeKeyTask

        self.chunked: List[Tuple[int, int]] = []
        self.from_files = 0
        aligned = budgeted_methods._aligned
        file_readers = MergeKeyTask._file_readers

        def spy_aligned(step: int, rows: int, cols: int) -> int:
            got = aligned(step, rows, cols)
            if got < rows:
                self.chunked.append((got, rows))
            return got

        def spy_file_readers(task: Any) -> Any:
            self.from_files += 1
            return file_readers(task)

        monkeypatch.setattr(budgeted_methods, "_aligned", spy_aligned)
        monkeypatch.setattr(MergeKeyTask, "_file_readers", spy_file_readers)


def _ours(config: Path, out: Path, budget: str, monkeypatch) -> Tuple[Path, _Spy]:
    """``mergekit-sdxl merge CONFIG OUT --memory-budget BUDGET`` in this process (to watch it)."""
    from mergekit.io.tasks import LoaderCache

    import mergekit_sdxl.cli.main as cli

    spy = _Spy(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["mergekit-sdxl", "merge", str(config), str(out), "--memory-budget", budget, "--quiet"])
    try:
        code = cli.run()
    finally:
        LoaderCache.loaders.clear()
    assert code == 0 and out.is_file()
    return out, spy


def _compare(ours: Path, reference: Path, rtol: float) -> Dict[str, int]:
    """Per tensor: bytes equal, or (rtol > 0) max |ours - reference| <= rtol * max |reference|."""
    a, b = load_file(str(reference)), load_file(str(ours))
    assert sorted(a) == sorted(b)
    differ = 0
    for name, want in a.items():
        got = b[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
            continue
        differ += 1
        scale = float(want.double().abs().max())
        error = float((got.double() - want.double()).abs().max())
        assert rtol > 0 and error <= rtol * scale, f"{name}: max error {error:.3g} vs max |value| {scale:.3g}"
    return {"tensors": len(a), "differ": differ}


def _mean_change(path: Path, base: Dict[str, torch.Tensor]) -> float:
    merged = load_file(str(path))
    total, count = 0.0, 0
    for name, value in merged.items():
        if value.is_floating_point() and name in base and "first_stage_model" not in name and value.numel() > 1:
            total += float((value.double() - base[name].double()).abs().sum())
            count += value.numel()
    return total / count


DETERMINISTIC = [
    # (method, per-model parameters, shared parameters, models, tolerance)
    ("linear", {"weight": 0.3}, {"weight": 1.0}, 3, 0.0),  # the base is an input of linear too
    pytest.param("task_arithmetic", {"weight": 0.5}, {"lambda": 0.8}, 3, 0.0, marks=pytest.mark.heavy),
    pytest.param("nearswap", {}, {"t": 0.01}, 1, 0.0, marks=pytest.mark.heavy),
    pytest.param("ties", {"weight": 0.5, "density": 0.5}, {}, 3, 0.0, marks=pytest.mark.heavy),
    pytest.param("breadcrumbs", {"weight": 0.5, "density": 0.6, "gamma": 0.05}, {}, 3, 0.0, marks=pytest.mark.heavy),
    pytest.param("breadcrumbs_ties", {"weight": 0.4, "density": 0.6}, {}, 3, 0.0, marks=pytest.mark.heavy),
    pytest.param("model_stock", {}, {"filter_wise": True}, 3, 0.0, marks=pytest.mark.heavy),
    pytest.param("model_stock", {}, {}, 3, 1e-6, marks=pytest.mark.heavy),
    pytest.param("sce", {}, {"select_topk": 0.5}, 3, 1e-6, marks=pytest.mark.heavy),
]


@pytest.mark.parametrize("method, per_model, shared, models, rtol", DETERMINISTIC, ids=lambda v: v if isinstance(v, str) else None)
def test_deterministic_builtin_under_64mb_matches_mergekit(inputs, tmp_path, monkeypatch, method, per_model, shared, models, rtol):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(inputs, method, per_model, shared, models)), encoding="utf-8")
    reference = _child(REFERENCE, config, tmp_path / "reference")
    ours, spy = _ours(config, tmp_path / "ours.safetensors", "64MB", monkeypatch)
    assert spy.chunked, "no key was merged in several chunks"
    result = _compare(ours, reference, rtol)
    assert result["tensors"] == 2515


@pytest.mark.parametrize("method", ["ties", pytest.param("sce", marks=pytest.mark.heavy)])
def test_keys_read_from_the_files_give_the_same_bytes(inputs, tmp_path, monkeypatch, method):
    """At 16MB the token embeddings' N inputs do not fit: they are read from the files in chunks."""
    shared = {"select_topk": 0.4} if method == "sce" else {}
    per = {} if method == "sce" else {"weight": 0.5, "density": 0.3}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(inputs, method, per, shared)), encoding="utf-8")
    in_memory, _ = _ours(config, tmp_path / "a" / "out.safetensors", "64MB", monkeypatch)
    from_files, spy = _ours(config, tmp_path / "b" / "out.safetensors", "16MB", monkeypatch)
    assert spy.from_files >= 2
    assert _compare(from_files, in_memory, 0.0)["differ"] == 0


@pytest.mark.heavy
def test_ties_without_dtype_computes_in_float16_like_mergekit(inputs, tmp_path, monkeypatch):
    """No ``dtype:``: mergekit merges fp16 inputs in fp16; so do the chunks."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(inputs, "ties", {"weight": 0.5, "density": 0.5}, {}, dtype=None)), encoding="utf-8")
    reference = _child(REFERENCE, config, tmp_path / "reference")
    ours, _ = _ours(config, tmp_path / "ours.safetensors", "16MB", monkeypatch)
    assert _compare(ours, reference, 0.0)["differ"] == 0


RANDOM = [
    ("dare_ties", {"weight": 0.5, "density": 0.7}),
    pytest.param("dare_linear", {"weight": 0.5, "density": 0.7}, marks=pytest.mark.heavy),
    pytest.param("della", {"weight": 0.5, "density": 0.6, "epsilon": 0.15}, marks=pytest.mark.heavy),
    pytest.param("della_linear", {"weight": 0.5, "density": 0.6, "epsilon": 0.15}, marks=pytest.mark.heavy),
]


@pytest.mark.parametrize("method, per_model", RANDOM, ids=lambda v: v if isinstance(v, str) else None)
def test_random_builtin_is_chunk_independent_and_on_mergekits_scale(inputs, tmp_path, monkeypatch, method, per_model):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(inputs, method, per_model, {})), encoding="utf-8")
    in_memory, spy = _ours(config, tmp_path / "a" / "out.safetensors", "64MB", monkeypatch)
    assert spy.chunked
    from_files, spy = _ours(config, tmp_path / "b" / "out.safetensors", "16MB", monkeypatch)
    assert spy.from_files >= 2
    assert _compare(from_files, in_memory, 0.0)["differ"] == 0
    reference = _child(REFERENCE, config, tmp_path / "reference")
    base = load_file(str(inputs / "base.safetensors"))
    ours_change, theirs_change = _mean_change(in_memory, base), _mean_change(reference, base)
    # Other draws, same method: the mean change from the base agrees to a few percent over 20 M elements.
    assert abs(ours_change / theirs_change - 1) < 0.03, (ours_change, theirs_change)


def test_stock_mergekit_yaml_with_the_plugin_gives_the_same_counter_based_bytes(inputs, tmp_path, monkeypatch):
    """The plugin's stock path runs the same adapters: dare_ties is reproducible there too."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(inputs, "dare_ties", {"weight": 0.5, "density": 0.7}, {})), encoding="utf-8")
    stock = _child(STOCK, config, tmp_path / "stock")
    ours, _ = _ours(config, tmp_path / "ours.safetensors", "64MB", monkeypatch)
    assert _compare(ours, stock, 0.0)["differ"] == 0
