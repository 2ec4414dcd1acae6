"""``mergekit-sdxl report``: report.json against an independent computation on the files' tensors, the
page rendered in headless Chromium with every image loaded, safe output folders, the missing-extra
message, and the demo's report."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow  # whole merges and reports

matplotlib = pytest.importorskip("matplotlib", reason="matplotlib (the report extra) is not installed: pip install -e '.[report]'")

WIDTH = 1 / 64  # small synthetic SDXL files (6 MB): every key, tiny shapes
POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"


def _cli(monkeypatch, capsys, *args: str) -> Tuple[int, str, str]:
    """Run ``mergekit-sdxl ARGS`` in this process: (exit code, stdout, stderr)."""
    from mergekit_sdxl.cli.entry import main

    monkeypatch.setattr(sys, "argv", ["mergekit-sdxl", *args])
    previous = signal.getsignal(signal.SIGTERM)
    try:
        main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def merge(tmp_path_factory) -> Dict[str, Path]:
    """A base and four fine-tunes (c is a near-copy of a, d is the base plus rounding noise), their
    tgmd config and its merge (run with the mergekit-sdxl console script)."""
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    root = tmp_path_factory.mktemp("report")
    models = root / "models"
    models.mkdir()
    base = root / "base.safetensors"
    write_synthetic_sdxl(base, width=WIDTH, seed=0)
    paths = {"base": base}
    for name, seed, parent, noise in (("a", 1, base, 0.02), ("b", 2, base, 0.03), ("d", 4, base, 1e-4)):
        paths[name] = models / f"{name}.safetensors"
        write_synthetic_sdxl(paths[name], width=WIDTH, seed=seed, base=parent, noise=noise)
    paths["c"] = models / "c.safetensors"
    write_synthetic_sdxl(paths["c"], width=WIDTH, seed=3, base=paths["a"], noise=0.001)
    config = {
        "merge_method": "tgmd",
        "base_model": {"model": {"path": str(base)}},
        "models": [{"model": {"model": {"path": str(paths[n])}}} for n in "abcd"],
        "parameters": {"drop_rate": 0.1, "seed": 11},
        "dtype": "float32",
        "out_dtype": "float16",
    }
    paths["config"] = root / "recipe.yaml"
    paths["config"].write_text(yaml.safe_dump(config, sort_keys=False))
    paths["out"] = root / "merged.safetensors"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mergekit-sdxl"), "merge", str(paths["config"]), str(paths["out"]), "--memory-budget", "1GB"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    paths["root"] = root
    return paths


def _block(key: str) -> str:
    """The report's block of a key, written out again here (IN/M/OUT, text-encoder layers)."""
    for pattern, fmt in (
        (r"model\.diffusion_model\.input_blocks\.(\d+)\.", "IN{:02d}"),
        (r"model\.diffusion_model\.output_blocks\.(\d+)\.", "OUT{:02d}"),
        (r"conditioner\.embedders\.0\.transformer\.text_model\.encoder\.layers\.(\d+)\.", "clip_l.{:02d}"),
        (r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.", "clip_g.{:02d}"),
    ):
        m = re.match(pattern, key)
        if m:
            return fmt.format(int(m.group(1)))
    if key.startswith("model.diffusion_model.middle_block."):
        return "M00"
    if key.startswith("model.diffusion_model.out."):
        return "OUT08"
    if key.startswith("model.diffusion_model."):
        return "BASE"
    return "clip_l.other" if key.startswith("conditioner.embedders.0.") else "clip_g.other"


def _expected(paths: Dict[str, Path]):
    """Similarity, norms and block change straight from the files' tensors (numpy, float64)."""
    from safetensors.numpy import load_file

    base = load_file(paths["base"])
    models = [load_file(paths[n]) for n in "abcd"]
    merged = load_file(paths["out"])
    prefixes = {"unet": "model.diffusion_model.", "clip_l": "conditioner.embedders.0.", "clip_g": "conditioner.embedders.1."}
    keys = sorted(k for k in base if k != POSITION_IDS and not k.endswith("logit_scale") and not k.startswith("first_stage_model."))
    vectors = {c: [] for c in prefixes}
    change: Dict[str, float] = {}
    base_sq: Dict[str, float] = {}
    for key in keys:
        b = base[key].astype(np.float64).ravel()
        component = next(c for c, p in prefixes.items() if key.startswith(p))
        vectors[component].append(np.stack([m[key].astype(np.float64).ravel() - b for m in models]))
        block = _block(key)
        change[block] = change.get(block, 0.0) + float(np.sum((merged[key].astype(np.float64).ravel() - b) ** 2))
        base_sq[block] = base_sq.get(block, 0.0) + float(np.sum(b**2))
    tables = {c: np.concatenate(v, axis=1) for c, v in vectors.items()}
    tables["model"] = np.concatenate([tables[c] for c in prefixes], axis=1)
    similarity, norms = {}, {}
    for component, x in tables.items():
        n = np.linalg.norm(x, axis=1)
        norms[component] = n
        similarity[component] = (x @ x.T) / np.outer(n, n)
    return similarity, norms, {b: np.sqrt(change[b] / base_sq[b]) for b in change}


def _check_numbers(report, paths) -> None:
    similarity, norms, block_change = _expected(paths)
    assert report["inputs"] == ["a.safetensors", "b.safetensors", "c.safetensors", "d.safetensors"]
    assert set(report["similarity"]) == {"model", "unet", "clip_l", "clip_g"}
    for component in ("model", "unet", "clip_l", "clip_g"):
        np.testing.assert_allclose(report["similarity"][component], similarity[component], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(report["task_vector_norm"][component], norms[component], rtol=1e-9)
    assert set(report["block_change"]) == set(block_change)
    for block, value in block_change.items():
        assert report["block_change"][block] == pytest.approx(value, rel=1e-9), block


def test_report_numbers_match_an_independent_computation(merge, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "report"
    code, out, err = _cli(monkeypatch, capsys, "report", str(merge["config"]), "-o", str(folder), "-q", "--memory-budget", "1GB")
    assert code == 0, out + err
    assert f"report written to {folder / 'index.html'}" in out
    report = json.loads((folder / "report.json").read_text())
    # No --merged: the merge ran in memory, and its change per block is that of the merged file.
    assert report["block_change_from"].startswith("the merge, run in memory")
    _check_numbers(report, merge)
    flags = report["flags"]
    assert [f["inputs"] for f in flags["near_duplicates"]] == [["a.safetensors", "c.safetensors"]]
    assert [f["input"] for f in flags["near_base"]] == ["d.safetensors"]
    assert "near-duplicates: a.safetensors and c.safetensors" in out
    weights = report["median_weight"]["components"]["model"]
    assert len(weights) == 4 and sum(weights) == pytest.approx(1.0)
    assert set(report["median_weight"]["blocks"]) == set(report["blocks"])


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium)")


def _browser(*args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


def _images(page: Path) -> Tuple[int, int]:
    """(images loaded, images in the page) as the page's own script counts them in Chromium."""
    done = _browser("--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body[^>]*>", done.stdout)
    assert body is not None, done.stdout[:2000]
    loaded = re.search(r'data-images-loaded="(\d+)"', body.group(0))
    total = re.search(r'data-images-total="(\d+)"', body.group(0))
    assert loaded and total, f"the page's script did not run: {body.group(0)}"
    return int(loaded.group(1)), int(total.group(1))


def test_report_of_a_finished_merge_renders_in_chromium(merge, tmp_path, monkeypatch, capsys):
    from PIL import Image

    folder = tmp_path / "report"
    code, out, err = _cli(monkeypatch, capsys, "report", str(merge["config"]), "-o", str(folder), "--merged", str(merge["out"]), "-q")
    assert code == 0, out + err
    report = json.loads((folder / "report.json").read_text())
    assert report["block_change_from"] == "the finished merge merged.safetensors"
    _check_numbers(report, merge)
    page = folder / "index.html"
    in_page = len(re.findall(r"<img ", page.read_text()))
    assert in_page == len(report["files"]) - 2 == 8  # every PNG figure, nothing else
    assert _images(page) == (in_page, in_page)

    shot = tmp_path / "page.png"
    done = _browser(f"--screenshot={shot}", "--window-size=1280,2400", "--virtual-time-budget=10000", page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    image = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    ink = (np.abs(image - 255).sum(axis=2) > 60).mean()  # share of pixels that are not near-white
    colours = len(np.unique(image.reshape(-1, 3)[::7], axis=0))
    assert ink > 0.05 and colours > 200, (ink, colours)

    # The check can fail: with one figure missing, the page counts one image short.
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "block_change.png").unlink()
    assert _images(broken / "index.html") == (in_page - 1, in_page)


def test_report_refuses_an_input_or_a_folder_of_models(merge, monkeypatch, capsys):
    before = merge["a"].read_bytes()
    code, out, err = _cli(monkeypatch, capsys, "report", str(merge["config"]), "-o", str(merge["a"]), "--merged", str(merge["out"]))
    assert code == 1 and "exists and is not a folder" in err and "Traceback" not in err
    assert merge["a"].read_bytes() == before
    listing = sorted(p.name for p in (merge["root"] / "models").iterdir())
    code, out, err = _cli(monkeypatch, capsys, "report", str(merge["config"]), "-o", str(merge["root"] / "models"), "--merged", str(merge["out"]))
    assert code == 1 and "holds files that are not a mergekit-sdxl report" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (merge["root"] / "models").iterdir()) == listing


def test_report_without_matplotlib_says_how_to_install_it(merge, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    folder = tmp_path / "report"
    code, out, err = _cli(monkeypatch, capsys, "report", str(merge["config"]), "-o", str(folder))
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "pip install 'mergekit-sdxl[report]'" in err
    assert not folder.exists()


def test_demo_ends_with_the_report_of_its_merge(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    code, stdout, err = _cli(monkeypatch, capsys, "demo", str(out), "--models", "2")
    assert code == 0, stdout + err
    page = out / "report" / "index.html"
    assert stdout.rstrip().splitlines()[-1] == f"report written to {page}"
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["inputs"] == ["finetune_01.safetensors", "finetune_02.safetensors"]
    assert report["block_change_from"] == "the finished merge merged.safetensors"


def test_merge_with_report_writes_the_report_of_its_output(merge, tmp_path, monkeypatch, capsys):
    """``merge --report DIR``: the merge's file is the fixture's (same config), and the report's
    numbers are those of an independent computation over the inputs and that output."""
    out = tmp_path / "again.safetensors"
    folder = tmp_path / "merge-report"
    code, stdout, stderr = _cli(monkeypatch, capsys, "merge", str(merge["config"]), str(out), "--memory-budget", "1GB", "--report", str(folder))
    assert code == 0, stdout + stderr
    assert f"report written to {folder / 'index.html'}" in stdout
    from safetensors.numpy import load_file

    ours, theirs = load_file(out), load_file(merge["out"])
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    report = json.loads((folder / "report.json").read_text())
    assert report["statistics_from"].startswith("the merge itself")  # no pass of its own
    assert report["median_weight_from"].startswith("the merge's own Weiszfeld coefficients")
    _check_numbers(report, merge)


def test_merge_report_into_an_input_is_refused_before_the_merge(merge, tmp_path, monkeypatch, capsys):
    out = tmp_path / "never.safetensors"
    code, stdout, stderr = _cli(monkeypatch, capsys, "merge", str(merge["config"]), str(out), "--report", str(merge["base"]))
    assert code != 0
    assert str(merge["base"]) in stdout + stderr
    assert not out.exists()
