"""The report folder: what it writes, what it refuses to write over, and the missing-extra message."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from mergekit_sdxl.errors import OutputError
from mergekit_sdxl.io.report_figures import MissingExtraError, require_matplotlib, short_label
from mergekit_sdxl.io.report_files import is_our_report_file, prepare_report_dir, write_report
from mergekit_sdxl.workflow.report_stats import ReportCollector

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib (the report extra) is not installed: pip install -e '.[report]'",
)


def _report(median: bool = True):
    collector = ReportCollector(
        ["alpha.safetensors", "beta.safetensors", "gamma.safetensors"],
        base="base.safetensors",
        method="tgmd" if median else "ties_soup",
        statistics_from="a test",
        block_change_from="a test",
        median_weight_from="a test" if median else None,
    )
    d = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 2.0], [-1.0, 0.2, 0.0]], dtype=torch.float64)
    for block, name in (("IN00", "model.diffusion_model.input_blocks.0.0.weight"), ("clip_g.05", "conditioner.embedders.1.model.transformer.resblocks.5.ln_1.weight")):
        collector.add_key(
            name,
            block_id=block,
            component="unet" if block == "IN00" else "clip_g",
            gram=d @ d.T,
            median_coeffs=[0.5, 0.3, 0.2] if median else None,
            base_norm_sq=9.0,
            change_norm_sq=1.0,
            sign_agree_fraction=0.75,
            elements=3,
        )
    return collector.build()


def test_short_labels_keep_number_start_and_end():
    assert short_label("model.safetensors", 0) == "1 model"
    label = short_label("a" * 20 + "MIDDLE" + "z" * 20 + ".safetensors", 11, width=12)
    assert label == "12 aaaaaa\u2026zzzzz" and len(label) == 3 + 12


@needs_matplotlib
def test_write_report_writes_json_page_and_figures(tmp_path):
    folder = tmp_path / "report"
    page = write_report(folder, _report())
    assert page == folder / "index.html"
    doc = json.loads((folder / "report.json").read_text())
    assert doc["format"] == "mergekit-sdxl-report/1"
    names = set(doc["files"])
    assert {"similarity_model.png", "similarity_unet.png", "similarity_clip_l.png", "similarity_clip_g.png"} <= names
    assert {"median_weight.png", "block_change.png", "sign_agreement.png", "task_vector_norm.png"} <= names
    html = page.read_text()
    for name in names - {"report.json", "index.html"}:
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and is_our_report_file(folder / name)
        assert f'src="{name}"' in html
    assert "http://" not in html and "https://" not in html  # offline: no CDN, no remote anything
    assert "alpha.safetensors" in html and is_our_report_file(page)
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no temp file left behind


@needs_matplotlib
def test_rewriting_a_report_removes_only_its_own_stale_figures(tmp_path):
    folder = tmp_path / "report"
    write_report(folder, _report(median=True))
    notes = folder / "notes.txt"
    notes.write_text("mine")
    write_report(folder, _report(median=False))  # no median: its heat map is stale
    assert not (folder / "median_weight.png").exists()
    assert notes.read_text() == "mine"
    assert json.loads((folder / "report.json").read_text())["median_weight"] is None


def test_refuses_a_folder_of_other_files(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "my_model.safetensors").write_bytes(b"x")
    with pytest.raises(OutputError, match="not a mergekit-sdxl report .*my_model.safetensors"):
        prepare_report_dir(folder, [])


def test_refuses_an_input_file_as_the_folder(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    with pytest.raises(OutputError, match="is not a folder"):
        prepare_report_dir(model, [(model, "the input model")])
    assert model.read_bytes() == b"weights"


def test_refuses_a_symlinked_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(OutputError, match="symbolic link"):
        prepare_report_dir(link, [])


def test_refuses_to_replace_a_users_file_under_a_report_name(tmp_path):
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"format": "mergekit-sdxl-report/1"}))
    (folder / "index.html").write_text("<html>my own page</html>")
    with pytest.raises(OutputError, match="index.html: exists and was not written by mergekit-sdxl"):
        prepare_report_dir(folder, [])
    assert (folder / "index.html").read_text() == "<html>my own page</html>"


def test_refuses_a_report_name_that_is_an_input(tmp_path):
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"format": "mergekit-sdxl-report/1"}))
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    (folder / "block_change.png").symlink_to(model)
    with pytest.raises(OutputError, match="would write over the input model"):
        prepare_report_dir(folder, [(model, "the input model")])
    assert model.read_bytes() == b"weights"


def test_an_empty_or_new_folder_is_fine(tmp_path):
    prepare_report_dir(tmp_path / "new", [])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"")  # hidden files do not make a folder someone's
    prepare_report_dir(empty, [])


def test_is_our_report_file_reads_content_not_names(tmp_path):
    fake = tmp_path / "report.json"
    fake.write_text('{"format": "something else"}')
    png = tmp_path / "similarity_model.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert not is_our_report_file(fake) and not is_our_report_file(png)
    assert not is_our_report_file(tmp_path / "missing.json")


def test_missing_matplotlib_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(MissingExtraError) as caught:
        require_matplotlib()
    message = str(caught.value)
    assert "\n" not in message and "pip install 'mergekit-sdxl[report]'" in message
