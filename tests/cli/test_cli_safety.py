"""A user's files are sacred: the CLI never writes over an input, never through a symlink, one
writer per output, and every refusal is one line and a non-zero exit without a traceback.

The CLI runs in-process (``cli.entry.main`` with its own argv) for speed; a few cases that
need their own process (signals, a competing merge) start the console script.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Tuple

import pytest

BIN = Path(sys.executable).parent
MERGEKIT_SDXL = str(BIN / "mergekit-sdxl")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Dict[str, Path]:
    """A folder like the demo's: base + 2 fine-tunes under models/, a recipe, cwd = the folder."""
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    models = tmp_path / "models"
    models.mkdir()
    base = tmp_path / "sdxl_base.safetensors"
    write_synthetic_sdxl(base, seed=0, width=1 / 32)
    a = models / "finetune_01.safetensors"
    b = models / "finetune_02.safetensors"
    write_synthetic_sdxl(a, seed=1, base=base, width=1 / 32)
    write_synthetic_sdxl(b, seed=2, base=base, width=1 / 32)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "merge_method: ties_soup\n"
        "base_model: {model: {path: sdxl_base.safetensors}}\n"
        "models:\n"
        "  - model: {model: {path: models/finetune_01.safetensors}}\n"
        "  - model: {model: {path: models/finetune_02.safetensors}}\n"
        "parameters: {seed: 1}\n"
        "dtype: float32\n"
        "out_dtype: float16\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    return {"root": tmp_path, "base": base, "a": a, "b": b, "recipe": recipe, "models": models}


def _hashes(ws: Dict[str, Path]) -> Dict[str, str]:
    return {name: _sha(ws[name]) for name in ("base", "a", "b")}


def _assert_refused(code: int, err: str, *names: str) -> None:
    assert code != 0, err
    assert "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)


# ------------------------------------------------------------------ output = input, every spelling


@pytest.mark.parametrize(
    "spelling",
    ["models/finetune_01.safetensors", "models/../models/finetune_01.safetensors", "sdxl_base.safetensors", "symlink", "hardlink"],
)
def test_merge_never_writes_over_an_input(workspace, monkeypatch, capsys, spelling):
    before = _hashes(workspace)
    out = spelling
    if spelling == "symlink":
        os.symlink(workspace["a"], workspace["root"] / "link.safetensors")
        out = "link.safetensors"
    elif spelling == "hardlink":
        os.link(workspace["a"], workspace["root"] / "hard.safetensors")
        out = "hard.safetensors"
    code, _, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", out)
    _assert_refused(code, err, out)
    assert _hashes(workspace) == before
    assert not list(workspace["root"].glob("**/*.partial"))


def test_merge_refuses_to_replace_a_file_it_did_not_write(workspace, monkeypatch, capsys):
    other = workspace["root"] / "mine.safetensors"
    shutil.copyfile(workspace["b"], other)
    digest = _sha(other)
    code, _, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "mine.safetensors")
    _assert_refused(code, err, "mine.safetensors", "not written by mergekit-sdxl")
    assert _sha(other) == digest


@pytest.mark.slow
def test_partial_symlink_is_never_written_through(workspace, monkeypatch, capsys):
    victim = workspace["root"] / "victim.bin"
    victim.write_bytes(b"precious" * 1000)
    os.symlink(victim, workspace["root"] / "merged.safetensors.partial")
    code, out, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "merged.safetensors")
    assert code == 0, err
    assert victim.read_bytes() == b"precious" * 1000
    merged = workspace["root"] / "merged.safetensors"
    assert f"sha256 {_sha(merged)}" in out
    assert not (workspace["root"] / "merged.safetensors.lock").exists()


@pytest.mark.slow
def test_printed_hash_is_the_files_and_metadata_has_no_user_paths(workspace, monkeypatch, capsys):
    from safetensors import safe_open

    code, out, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "merged.safetensors")
    assert code == 0, err
    merged = workspace["root"] / "merged.safetensors"
    assert f"sha256 {_sha(merged)}" in out
    with safe_open(str(merged), framework="pt") as f:
        metadata = f.metadata()
    text = json.dumps(metadata)
    assert str(workspace["root"]) not in text
    assert "finetune_01.safetensors" in metadata["mergekit_sdxl.recipe"]
    sidecar = json.loads((workspace["root"] / "merged.safetensors.json").read_text())
    assert sidecar["sha256"] == _sha(merged)
    assert str(workspace["root"]) not in json.dumps(sidecar)
    card = (workspace["root"] / "merged.md").read_text()
    assert "mergekit-sdxl merge recipe.yaml merged.safetensors" in card
    assert str(workspace["root"]) not in card


@pytest.mark.slow
def test_keep_paths_records_the_full_paths(workspace, monkeypatch, capsys):
    from safetensors import safe_open

    out_path = workspace["root"] / "merged.safetensors"
    code, _, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", str(out_path), "--keep-paths")
    assert code == 0, err
    with safe_open(str(out_path), framework="pt") as f:
        assert "models/finetune_01.safetensors" in f.metadata()["mergekit_sdxl.recipe"]
    assert str(out_path) in (workspace["root"] / "merged.md").read_text()


# ------------------------------------------------------------------ one writer per output


@pytest.mark.slow
def test_second_merge_to_a_locked_output_is_refused_naming_the_pid(workspace, monkeypatch, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mergekit_sdxl.io.output_lock import OutputLock; "
         "l = OutputLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
         str(workspace["root"] / "merged.safetensors")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code, _, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "merged.safetensors")
        _assert_refused(code, err, "merged.safetensors", f"process {holder.pid}")
        assert not (workspace["root"] / "merged.safetensors").exists()
        assert not (workspace["root"] / "merged.safetensors.partial").exists()
    finally:
        holder.kill()
        holder.wait()


def test_lock_file_planted_as_symlink_is_refused(workspace, monkeypatch, capsys):
    victim = workspace["root"] / "victim.txt"
    victim.write_text("keep")
    os.symlink(victim, workspace["root"] / "merged.safetensors.lock")
    code, _, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "merged.safetensors")
    _assert_refused(code, err, "merged.safetensors.lock")
    assert victim.read_text() == "keep"


# ------------------------------------------------------------------ disk full, read-only, bad YAML


def test_not_enough_free_space_is_refused_before_writing(workspace, monkeypatch, capsys):
    import shutil as shutil_module

    real = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: real(p)._replace(free=1000))
    code, _, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "merged.safetensors")
    _assert_refused(code, err, "merged.safetensors", "free")
    assert not (workspace["root"] / "merged.safetensors").exists()


@pytest.mark.slow
def test_disk_full_mid_write_keeps_a_resumable_partial(workspace, monkeypatch, capsys, caplog):
    import errno

    from mergekit_sdxl.io import writer as writer_module

    code, out, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "reference.safetensors")
    assert code == 0, err

    real = writer_module._write_all
    calls = {"n": 0}

    def failing(fh, data):
        calls["n"] += 1
        if calls["n"] == 400:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, data)

    monkeypatch.setattr(writer_module, "_write_all", failing)
    code, _, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "merged.safetensors")
    _assert_refused(code, err, "no space left")
    assert not (workspace["root"] / "merged.safetensors").exists()
    assert (workspace["root"] / "merged.safetensors.partial").exists()
    monkeypatch.setattr(writer_module, "_write_all", real)
    code, out, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "merged.safetensors")
    assert code == 0, err
    assert "resuming: " in caplog.text and " of 2515 tensors done" in caplog.text
    # Same bytes as the uninterrupted run except the title (the output's stem is in the metadata).
    from safetensors.torch import load_file

    a, b = load_file("reference.safetensors"), load_file("merged.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(workspace, monkeypatch, capsys):
    locked = workspace["root"] / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "ro/merged.safetensors")
        _assert_refused(code, err, "permission denied")
    finally:
        locked.chmod(0o755)


def test_read_only_file_system_is_one_line(workspace, monkeypatch, capsys):
    """As root a chmod does not stop writes: simulate EROFS for every file created in ro/."""
    import errno

    (workspace["root"] / "ro").mkdir()
    folder = str(workspace["root"] / "ro")
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and os.path.abspath(os.fspath(path)).startswith(folder):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    code, _, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "ro/merged.safetensors")
    _assert_refused(code, err, "read-only", "ro/merged.safetensors")
    assert os.listdir(folder) == []


def test_yaml_syntax_error_names_line_and_column(workspace, monkeypatch, capsys):
    bad = workspace["root"] / "bad.yaml"
    bad.write_text("merge_method: tgmd\nmodels:\n  - model: {model: {path: a.safetensors}\n", encoding="utf-8")
    code, _, err = _cli(monkeypatch, capsys, "merge", "bad.yaml", "merged.safetensors")
    _assert_refused(code, err, "bad.yaml", "line")
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ recipe and run outputs


def test_recipe_output_over_the_base_or_a_folder_is_refused(workspace, monkeypatch, capsys):
    before = _hashes(workspace)
    for target in ("sdxl_base.safetensors", "models", "models/finetune_01.safetensors"):
        code, _, err = _cli(monkeypatch, capsys, "recipe", "models", "--base", "sdxl_base.safetensors", "-o", target)
        _assert_refused(code, err, target)
    assert _hashes(workspace) == before


def test_run_config_out_over_an_input_is_refused(workspace, monkeypatch, capsys):
    before = _hashes(workspace)
    code, _, err = _cli(
        monkeypatch, capsys, "run", "models", "merged.safetensors", "--base", "sdxl_base.safetensors",
        "--config-out", "models/finetune_01.safetensors",
    )
    _assert_refused(code, err, "finetune_01.safetensors")
    assert _hashes(workspace) == before


@pytest.mark.slow
def test_run_twice_into_the_scanned_folder_never_takes_its_own_output(workspace, monkeypatch, capsys):
    args = ("run", "models", "models/merged.safetensors", "--base", "sdxl_base.safetensors", "--method", "ties_soup")
    code, out, err = _cli(monkeypatch, capsys, *args)
    assert code == 0, err
    first = _sha(workspace["models"] / "merged.safetensors")
    code, out, err = _cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert _sha(workspace["models"] / "merged.safetensors") == first
    assert "2 kept" in out
    assert "merged.safetensors" in out  # listed as excluded, with the reason


# ------------------------------------------------------------------ signals and bugs


@pytest.mark.slow
def test_signals_during_startup_exit_cleanly_without_traceback(workspace):
    """Ctrl-C / SIGTERM while torch and mergekit are being imported: 130 / 143, one line."""
    for delay, sig, expected in (
        (0.2, signal.SIGINT, 130), (0.7, signal.SIGTERM, 143), (1.3, signal.SIGINT, 130),
        (2.0, signal.SIGINT, 130), (3.0, signal.SIGTERM, 143), (4.5, signal.SIGINT, 130),
    ):
        proc = subprocess.Popen(
            [MERGEKIT_SDXL, "merge", "recipe.yaml", "merged.safetensors"],
            cwd=workspace["root"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            continue  # finished before the signal: nothing to check
        assert proc.returncode == expected, (delay, sig, err)
        assert "Traceback" not in err, err
        assert not (workspace["root"] / "merged.safetensors").exists()


def test_a_bug_shows_the_traceback_and_asks_for_a_report(monkeypatch, capsys):
    import mergekit_sdxl.cli.main as cli_main

    def broken() -> int:
        raise AttributeError("a programming mistake")

    monkeypatch.setattr(cli_main, "run", broken)
    code, _, err = _cli(monkeypatch, capsys)
    assert code == 70
    assert "Traceback" in err and "AttributeError" in err and "report" in err


def test_files_list_every_path_a_merge_writes():
    from mergekit_sdxl.io.output_guard import merge_output_paths

    names = [p.name for p in merge_output_paths(Path("d/merged.safetensors"))]
    assert names == [
        "merged.safetensors",
        "merged.safetensors.partial",
        "merged.safetensors.partial.journal",
        "merged.safetensors.lock",
        "merged.safetensors.json",
        "merged.md",
    ]


def test_clash_check_names_both_files(tmp_path):
    from mergekit_sdxl.errors import OutputError
    from mergekit_sdxl.io.output_guard import check_writes_do_not_clash

    a = tmp_path / "a.safetensors"
    a.write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputError, match="a.safetensors.*the base model .*a.safetensors"):
        check_writes_do_not_clash([tmp_path / "sub" / ".." / "a.safetensors"], [(a, "the base model")])
    check_writes_do_not_clash([tmp_path / "b.safetensors"], [(a, "the base model")])


@pytest.mark.slow
def test_users_own_notes_beside_the_output_are_never_overwritten(workspace, monkeypatch, capsys):
    notes = workspace["root"] / "merged.md"
    notes.write_text("my notes about this merge\n")
    code, _, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "merged.safetensors")
    _assert_refused(code, err, "merged.md", "not a model card")
    assert notes.read_text() == "my notes about this merge\n"
    notes.unlink()
    code, _, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "merged.safetensors")
    assert code == 0, err
    code, _, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "merged.safetensors")
    assert code == 0, err  # our own card and sidecar are replaced


def test_a_hand_written_config_is_never_overwritten_by_recipe(workspace, monkeypatch, capsys):
    mine = workspace["root"] / "mine.yaml"
    mine.write_text("merge_method: linear\n")
    code, _, err = _cli(monkeypatch, capsys, "recipe", "models", "--base", "sdxl_base.safetensors", "-o", "mine.yaml")
    _assert_refused(code, err, "mine.yaml", "not a recipe")
    assert mine.read_text() == "merge_method: linear\n"
    code, _, err = _cli(monkeypatch, capsys, "recipe", "models", "--base", "sdxl_base.safetensors", "-o", "new.yaml")
    assert code == 0, err
    code, _, err = _cli(monkeypatch, capsys, "recipe", "models", "--base", "sdxl_base.safetensors", "-o", "new.yaml")
    assert code == 0, err  # a recipe of ours is rewritten


@pytest.mark.slow
def test_an_input_replaced_after_recipe_is_refused_by_its_pin(workspace, monkeypatch, capsys):
    code, _, err = _cli(monkeypatch, capsys, "recipe", "models", "--base", "sdxl_base.safetensors", "-o", "pinned.yaml")
    assert code == 0, err
    b = workspace["b"]
    shutil.copyfile(workspace["a"], b)  # same size, other bytes: only the sha256 pin can tell
    code, _, err = _cli(monkeypatch, capsys, "merge", "pinned.yaml", "merged.safetensors")
    _assert_refused(code, err, "finetune_02.safetensors", "pins")
    assert not (workspace["root"] / "merged.safetensors").exists()
    code, _, err = _cli(monkeypatch, capsys, "merge", "pinned.yaml", "merged.safetensors", "--no-verify-pins")
    assert code == 0, err


@pytest.mark.slow
def test_a_bad_header_is_reported_before_any_input_is_hashed(workspace, monkeypatch, capsys):
    from mergekit_sdxl.io import hashing

    hashed = []
    real = hashing.HashCache.sha256
    monkeypatch.setattr(hashing.HashCache, "sha256", lambda self, p, progress=False: hashed.append(p) or real(self, p, progress))
    with open(workspace["b"], "r+b") as f:
        f.write(b"\xff" * 8)  # header length beyond the file
    code, _, err = _cli(monkeypatch, capsys, "merge", "recipe.yaml", "merged.safetensors")
    _assert_refused(code, err, "finetune_02.safetensors")
    assert hashed == []
