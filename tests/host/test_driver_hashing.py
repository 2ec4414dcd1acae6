"""``run_sdxl_merge`` hashes its inputs in the background: the merge starts before the hashes are
known, the published file still carries them (and is the same file as with a warm cache), a resume
still works and still refuses a changed input, and a failing merge stops the hashing."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest
from safetensors import safe_open

pytestmark = pytest.mark.slow  # whole (tiny) merges

CONFIG = """merge_method: ties_soup
base_model: {model: {path: base.safetensors}}
models:
  - model: {model: {path: a.safetensors}}
  - model: {model: {path: b.safetensors}}
parameters: {seed: 1}
dtype: float32
out_dtype: float16
"""
NAMES = ("base.safetensors", "a.safetensors", "b.safetensors")
HASH_THREAD = "mergekit-sdxl-hash-"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    folder = tmp_path_factory.mktemp("models")
    write_synthetic_sdxl(folder / "base.safetensors", seed=0, width=1 / 32)
    for seed, name in ((1, "a"), (2, "b")):
        write_synthetic_sdxl(folder / f"{name}.safetensors", seed=seed, base=folder / "base.safetensors", width=1 / 32)
    return folder


@pytest.fixture
def work(tmp_path, models, monkeypatch) -> Path:
    """A fresh folder with copies of the inputs (so none is in any hash cache) and an empty cache."""
    for name in NAMES:
        (tmp_path / name).write_bytes((models / name).read_bytes())
    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _merge(out: str, **kw):
    from mergekit_sdxl.host.driver import run_sdxl_merge
    from mergekit_sdxl.host.mergekit_api import MergeOptions

    return run_sdxl_merge(kw.pop("config", CONFIG), out, MergeOptions(quiet=True), **kw)


class _Probe:
    """Input hashing that may not start before the merge has written its first tensor (so it is
    provably concurrent with the merge), recording which thread hashed what."""

    def __init__(self, monkeypatch) -> None:
        from mergekit_sdxl.io import hashing, writer

        self.first_write = threading.Event()
        self.hashed: List[tuple] = []
        self.waited: List[bool] = []
        real_sha, real_write = hashing.sha256_file, writer.StreamingCheckpointWriter.write

        def slow_sha(path, *a, **kw):
            if Path(path).name in NAMES:
                self.waited.append(self.first_write.wait(60))
                self.hashed.append((Path(path).name, threading.current_thread().name))
            return real_sha(path, *a, **kw)

        def write(w, name, tensor):
            self.first_write.set()
            return real_write(w, name, tensor)

        monkeypatch.setattr(hashing, "sha256_file", slow_sha)
        monkeypatch.setattr(writer.StreamingCheckpointWriter, "write", write)


def _recorded(path: Path) -> Dict[str, str]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    inputs = json.loads(meta["mergekit_sdxl.inputs"])
    assert len(inputs) == len(NAMES)
    assert set(json.loads(meta["sd_merge_models"])) == {r["sha256"] for r in inputs}
    return {r["name"]: r["sha256"] for r in inputs}


def test_cold_cache_merge_hashes_in_the_background_and_publishes_the_real_hashes(work, monkeypatch, tmp_path_factory):
    probe = _Probe(monkeypatch)
    (work / "cold").mkdir()
    result = _merge("cold/m.safetensors")
    out = work / "cold" / "m.safetensors"
    data = out.read_bytes()
    # The returned (printed) hash is the file's, and the header carries every input's sha256.
    assert result.write.sha256 == hashlib.sha256(data).hexdigest() and result.write.autov2 == result.write.sha256[:10]
    assert _recorded(out) == {name: _sha(work / name) for name in NAMES}
    # Hashed by a background thread, each after the merge had written its first tensor.
    assert sorted(n for n, _ in probe.hashed) == sorted(NAMES)
    assert all(thread.startswith(HASH_THREAD) for _, thread in probe.hashed), probe.hashed
    assert probe.waited == [True] * len(NAMES)
    assert b"pending-sha256" not in data
    sidecar = json.loads((work / "cold" / "m.safetensors.json").read_text())
    assert sidecar["sha256"] == result.write.sha256
    assert {r["name"]: r["sha256"] for r in sidecar["inputs"]} == _recorded(out)
    assert sidecar["metadata"] == safe_open(str(out), "pt").metadata()
    card = (work / "cold" / "m.md").read_text()
    assert all(_sha(work / name) in card for name in NAMES) and result.write.sha256 in card
    # Recorded in the cache as before: a second merge (same output name, another folder) hashes
    # nothing, writes the final header at once, and gives the very same file.
    probe.hashed.clear()
    (work / "warm").mkdir()
    again = _merge("warm/m.safetensors")
    assert probe.hashed == []
    assert (work / "warm" / "m.safetensors").read_bytes() == data and again.write.sha256 == result.write.sha256
    assert (work / "warm" / "m.md").read_text() == card


def test_copies_are_still_found_before_the_merge_and_recorded_once(work, caplog):
    (work / "b.safetensors").write_bytes((work / "a.safetensors").read_bytes())  # a copy of a under b's name
    caplog.set_level(logging.WARNING, "mergekit_sdxl")
    _merge("m.safetensors")
    assert any("has the same content as" in r.getMessage() for r in caplog.records)
    recorded = _recorded(work / "m.safetensors")
    assert recorded == {name: _sha(work / name) for name in NAMES}
    assert recorded["a.safetensors"] == recorded["b.safetensors"]


def _interrupt_after(monkeypatch, writes: int) -> None:
    from mergekit_sdxl.io import writer

    real = writer.StreamingCheckpointWriter.write
    count = [0]

    def write(w, name, tensor):
        count[0] += 1
        if count[0] > writes:
            raise KeyboardInterrupt  # Ctrl-C between two tensors
        return real(w, name, tensor)

    monkeypatch.setattr(writer.StreamingCheckpointWriter, "write", write)


def test_interrupted_merge_resumes_to_the_same_file_and_refuses_a_changed_input(work, monkeypatch, caplog):
    from mergekit_sdxl.io.writer import ResumeMismatch

    (work / "ref").mkdir()
    reference = _merge("ref/m.safetensors")
    ref = (work / "ref" / "m.safetensors").read_bytes()
    (work / "cache").joinpath("hashes.json").unlink()  # cold again: the partial gets placeholders

    with monkeypatch.context() as m:
        _Probe(m)
        _interrupt_after(m, 200)
        with pytest.raises(KeyboardInterrupt):
            _merge("m.safetensors")
    partial = work / "m.safetensors.partial"
    assert partial.exists() and not (work / "m.safetensors").exists()
    assert b"pending-sha256" in partial.read_bytes()[:20000]
    assert not [t for t in threading.enumerate() if t.name.startswith(HASH_THREAD)]

    caplog.set_level(logging.WARNING, "mergekit_sdxl")
    result = _merge("m.safetensors")
    assert any(r.getMessage().startswith("resuming: 200 of") for r in caplog.records)
    assert (work / "m.safetensors").read_bytes() == ref and result.write.sha256 == reference.write.sha256

    # Interrupted again; then b is rewritten with other bytes of the same size: refused, naming it.
    (work / "m.safetensors").unlink()
    with monkeypatch.context() as m:
        _interrupt_after(m, 100)
        with pytest.raises(KeyboardInterrupt):
            _merge("m.safetensors")
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    size = (work / "b.safetensors").stat().st_size
    write_synthetic_sdxl(work / "b.safetensors", seed=99, base=work / "base.safetensors", width=1 / 32)
    assert (work / "b.safetensors").stat().st_size == size
    with pytest.raises(ResumeMismatch, match="input b.safetensors"):
        _merge("m.safetensors")
    assert partial.exists() and not (work / "m.safetensors").exists()


def test_an_error_in_the_merge_stops_the_hashing_at_once(work, monkeypatch):
    from mergekit_sdxl.host import driver
    from mergekit_sdxl.io import hashing
    from mergekit_sdxl.io.hashing import HashingCancelled

    started = threading.Event()
    real = hashing.sha256_file

    def endless(path, chunk=hashing.DEFAULT_CHUNK, callback=None, stop=None):
        if Path(path).name not in NAMES:
            return real(path, chunk, callback, stop)
        started.set()
        while not stop.is_set():  # an input of hundreds of GB: chunk after chunk until told to stop
            time.sleep(0.01)
        raise HashingCancelled(str(path))

    def failing_merge(writer, *a, **kw):
        assert started.wait(30)
        raise RuntimeError("the merge failed")

    monkeypatch.setattr(hashing, "sha256_file", endless)
    monkeypatch.setattr(driver, "stream_merge", failing_merge)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="the merge failed"):
        _merge("m.safetensors")
    assert time.monotonic() - t0 < 60
    assert not [t for t in threading.enumerate() if t.name.startswith(HASH_THREAD)]
    assert not (work / "m.safetensors").exists()
    assert not (work / "m.safetensors.json").exists() and not (work / "m.md").exists()
    assert not (work / "cache" / "hashes.json").exists()  # nothing half-hashed was recorded
