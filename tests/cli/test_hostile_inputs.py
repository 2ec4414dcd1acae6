"""``inspect DIR`` and ``recipe DIR`` with hostile files among good ones: every bad file is a row
with its reason, the good ones are still inspected / kept, and nothing ends in a traceback."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl
from mergekit_sdxl.workflow.recipe import build_recipe

W = 1 / 64
E = '{"dtype":"U8","shape":[2],"data_offsets":[0,2]}'
EVIL_NAME = "evil\x1b[2J\u202egnp.safetensors"
UNDECODABLE = b"bad\xff.safetensors"  # not UTF-8: Python sees a lone surrogate in the name

# file name -> (header body, data bytes, what the reason must say)
HOSTILE = {
    "nested.safetensors": ('{"__metadata__":' + "[" * 200_000 + "]" * 200_000 + "}", b"", "nested more than 64"),
    "nan.safetensors": ('{"__metadata__":{"x":NaN}}', b"", "NaN"),
    "dup.safetensors": ('{"a":' + E + ',"a":' + E + "}", b"xx", "duplicate tensor name"),
    "sub/overlap.safetensors": ('{"a":' + E + ',"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"xx", "overlap"),
    "bigint.safetensors": ('{"a":{"dtype":"U8","shape":[' + "9" * 5000 + '],"data_offsets":[0,2]}}', b"xx", "5000 digits"),
    "meta_obj.safetensors": ('{"__metadata__":{"k":{"x":1}}}', b"", "not a string"),
    "badutf8.safetensors": (b'{"a\xff":' + E.encode() + b"}", b"xx", "not valid UTF-8"),
}


def _raw(path: Path, body, data: bytes = b"") -> Path:
    body = body.encode() if isinstance(body, str) else body
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    models = root / "models"
    models.mkdir()
    base = root / "base.safetensors"
    write_synthetic_sdxl(base, width=W, seed=0)
    write_synthetic_sdxl(models / "good_a.safetensors", width=W, seed=1, base=base)
    write_synthetic_sdxl(models / "zz" / "good_b.safetensors", width=W, seed=2, base=base)
    for name, (body, data, _) in HOSTILE.items():
        _raw(models / name, body, data)
    # control characters and a bidi override in the name; content fine but not SDXL
    save_file({"x": torch.zeros(2)}, str(models / EVIL_NAME), metadata={"note": "\x1b]0;pwned\x07"})
    fd = os.open(os.fsencode(models) + b"/" + UNDECODABLE, os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)  # empty: "too short"
    os.mkfifo(models / "pipe.safetensors")
    return {"root": root, "models": models, "base": base}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from mergekit_sdxl.io.hashing import HashCache

    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "hashcache"))
    return HashCache(tmp_path / "hashcache")


def _app() -> typer.Typer:
    """The real ``mergekit-sdxl`` app: its errors become messages and exit codes as in the CLI."""
    from mergekit_sdxl.cli.main import app

    return app


def _no_raw_controls(text: str) -> None:
    assert "Traceback" not in text
    for c in ("\x1b", "\u202e", "\x07", "\udcff"):
        assert c not in text, f"raw {c!r} in output"


def _unlocked_scandir(monkeypatch, locked: str) -> None:
    """Make listing the folder named ``locked`` fail as chmod 000 would (tests may run as root)."""
    import mergekit_sdxl.io.discover as disc

    real = os.scandir

    def scandir(path):
        if Path(path).name == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(disc.os, "scandir", scandir)


def test_inspect_dir_reports_each_bad_file_and_goes_on(folder, cache, monkeypatch):
    _unlocked_scandir(monkeypatch, "zz")
    r = CliRunner().invoke(_app(), ["inspect", "--no-hash", str(folder["models"])])
    out = r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), out
    assert r.exit_code == 1  # some files could not be read
    _no_raw_controls(out)
    assert "good_a.safetensors" in out and "sdxl-base" in out
    for name, (_, _, why) in HOSTILE.items():
        line = next((ln for ln in out.splitlines() if ln.startswith(name + "  error:")), None)
        assert line is not None and why in line, f"{name}: {out}"
    assert "pipe.safetensors  error: not a regular file" in out
    assert "zz  error: cannot list folder: Permission denied" in out
    assert "evil\\x1b[2J\\u202egnp.safetensors" in out  # shown, escaped (a good, non-SDXL file)
    assert "bad\\udcff.safetensors  error:" in out
    n_bad = len(HOSTILE) + 3  # + FIFO, undecodable (empty) file, unreadable folder
    assert f"{n_bad} of {n_bad + 2} files could not be read" in out


def test_inspect_json_lists_errors(folder, cache):
    r = CliRunner().invoke(_app(), ["inspect", "--no-hash", "--json", str(folder["models"])])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    by_rel = {d["relative_path"]: d for d in doc}
    for name, (_, _, why) in HOSTILE.items():
        assert why in by_rel[name]["error"]
    assert by_rel["good_a.safetensors"]["family"] == "sdxl-base"
    assert by_rel["zz/good_b.safetensors"]["family"] == "sdxl-base"
    assert "error" not in by_rel[EVIL_NAME]


def test_build_recipe_excludes_hostile_files_with_reasons(folder, cache, monkeypatch):
    res = build_recipe(folder["models"], folder["base"], "tgmd", cache=cache)
    kept = sorted(Path(i.path).name for i in res.kept)
    assert kept == ["good_a.safetensors", "good_b.safetensors"]
    reasons = {Path(p).relative_to(folder["models"]).as_posix(): r for p, r in res.excluded}
    for name, (_, _, why) in HOSTILE.items():
        assert reasons[name].startswith("unreadable:") and why in reasons[name], reasons[name]
    assert "not a regular file" in reasons["pipe.safetensors"]
    assert "not valid UTF-8" in reasons[os.fsdecode(UNDECODABLE)]
    assert "not an SDXL base-family" in reasons[EVIL_NAME]
    res.yaml_text.encode("utf-8")
    _no_raw_controls(res.yaml_text)

    # an unreadable sub-folder is an excluded row, the rest goes on
    _unlocked_scandir(monkeypatch, "zz")
    res = build_recipe(folder["models"], folder["base"], "tgmd", cache=cache)
    assert [Path(i.path).name for i in res.kept] == ["good_a.safetensors"]
    reasons = {Path(p).name: r for p, r in res.excluded}
    assert reasons["zz"] == "unreadable: cannot list folder: Permission denied"


def test_recipe_command_with_hostile_files(folder, cache, tmp_path):
    out_yaml = tmp_path / "r.yaml"
    r = CliRunner().invoke(_app(), ["recipe", str(folder["models"]), "--base", str(folder["base"]), "-o", str(out_yaml)])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    assert "2 kept" in r.output
    for name in HOSTILE:
        assert f"exclude  {name}" in r.output
    _no_raw_controls(out_yaml.read_text(encoding="utf-8"))


def test_deeply_nested_recipe_in_metadata(tmp_path, cache):
    """The header is valid (the nesting is inside a metadata string): inspect must still not crash."""
    p = tmp_path / "deep_recipe.safetensors"
    save_file({"x": torch.zeros(2)}, str(p), metadata={"sd_merge_recipe": "[" * 100_000 + "]" * 100_000})
    r = CliRunner().invoke(_app(), ["inspect", "--no-hash", str(p)])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
