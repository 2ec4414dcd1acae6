"""Keys merged on several lanes at once (``--multi-gpu``) give the single-lane bytes, and the
streaming merge asks the OS to read ahead the keys it is about to merge."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # whole (tiny) merges

CONFIG = """merge_method: tgmd
base_model: {model: {path: base.safetensors}}
models:
  - model: {model: {path: a.safetensors}}
  - model: {model: {path: b.safetensors}}
parameters: {seed: 3, drop_rate: 0.2}
dtype: float64
out_dtype: float16
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    folder = tmp_path_factory.mktemp("lane_models")
    write_synthetic_sdxl(folder / "base.safetensors", seed=0, width=1 / 32)
    for seed, name in ((1, "a"), (2, "b")):
        write_synthetic_sdxl(folder / f"{name}.safetensors", seed=seed, base=folder / "base.safetensors", width=1 / 32)
    return folder


def _merge(out: Path, **kw) -> str:
    from mergekit_sdxl.host.driver import run_sdxl_merge
    from mergekit_sdxl.host.mergekit_api import MergeOptions

    result = run_sdxl_merge(CONFIG, str(out), MergeOptions(quiet=True), **kw)
    assert result.write.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    return result.write.sha256


def test_lanes_give_the_single_lane_bytes(models, tmp_path, monkeypatch):
    from mergekit_sdxl.host import streaming

    monkeypatch.chdir(models)  # the configs name the inputs relative to their folder
    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "cache"))
    single = _merge(tmp_path / "one.safetensors")
    lanes_seen = set()
    run_one = streaming._run_one

    def recording(pending, device):
        lanes_seen.add(threading.current_thread().name)
        yield from run_one(pending, device)

    monkeypatch.setattr(streaming, "_run_one", recording)
    monkeypatch.setattr(streaming, "_LANE_WINDOW", 2)  # lanes really wait for each other
    # The same file name: the output's name is part of its metadata (modelspec.title).
    lanes = _merge(tmp_path / "lanes" / "one.safetensors", devices=["cpu", "cpu", "cpu"])
    assert lanes == single
    assert len(lanes_seen) == 3 and all(name.startswith("mergekit-sdxl-lane-") for name in lanes_seen)


def test_upcoming_keys_are_read_ahead(models, tmp_path, monkeypatch):
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform")
    from mergekit_sdxl.host.checkpoint import checkpoint_index

    monkeypatch.chdir(models)
    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "cache"))
    advised = []
    real = os.posix_fadvise

    def record(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            advised.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    _merge(tmp_path / "out.safetensors")
    index = checkpoint_index(str(models / "a.safetensors"))
    starts = {begin for begin, _ in index.byte_ranges.values()}
    hinted = {offset for path, offset, _ in advised if path.endswith("a.safetensors")}
    # Every merged key of input a was hinted from its first byte before it was merged.
    merged = [k for k in index.byte_ranges if not k.startswith("first_stage_model.")]
    assert len(hinted & starts) >= len(merged) - 2
