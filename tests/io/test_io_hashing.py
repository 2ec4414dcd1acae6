"""sha256 / AutoV2 helpers and the persistent hash cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest

from mergekit_sdxl.io import hashing
from mergekit_sdxl.io.hashing import HashCache, autov2, sha256_file


def _file(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("size", [0, 1, 7, 64, 1000])
def test_sha256_file_matches_hashlib_for_any_chunking(tmp_path, size):
    data = os.urandom(size)
    p = _file(tmp_path / "f.bin", data)
    assert sha256_file(p, chunk=7) == hashlib.sha256(data).hexdigest()
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_sha256_file_callback_sees_every_byte(tmp_path):
    p = _file(tmp_path / "f.bin", os.urandom(100))
    seen = []
    sha256_file(p, chunk=32, callback=seen.append)
    assert sum(seen) == 100 and len(seen) == 4


def test_autov2():
    digest = hashlib.sha256(b"abc").hexdigest()
    assert autov2(digest) == digest[:10]
    assert autov2(digest.upper()) == digest[:10]
    with pytest.raises(ValueError):
        autov2("abc")
    with pytest.raises(ValueError):
        autov2("z" * 64)


def _count_hashes(monkeypatch):
    calls = []
    real = hashing.sha256_file

    def counting(path, *a, **kw):
        calls.append(path)
        return real(path, *a, **kw)

    monkeypatch.setattr(hashing, "sha256_file", counting)
    return calls


def test_cache_hits_and_persists(tmp_path, monkeypatch):
    calls = _count_hashes(monkeypatch)
    p = _file(tmp_path / "model.safetensors", b"hello")
    cache_dir = tmp_path / "cache"
    expected = hashlib.sha256(b"hello").hexdigest()

    assert HashCache(cache_dir).sha256(p) == expected
    assert HashCache(cache_dir).sha256(p) == expected  # new instance reads the JSON file
    assert len(calls) == 1
    saved = json.loads((cache_dir / "hashes.json").read_text())
    assert saved["entries"][os.path.realpath(p)]["sha256"] == expected
    # Atomic writes leave no temp files behind.
    assert [f.name for f in cache_dir.iterdir()] == ["hashes.json"]


def test_cache_invalidates_on_size_or_mtime_change(tmp_path, monkeypatch):
    calls = _count_hashes(monkeypatch)
    p = _file(tmp_path / "m.bin", b"one")
    cache = HashCache(tmp_path / "cache")
    cache.sha256(p)
    p.write_bytes(b"three")  # size change
    assert cache.sha256(p) == hashlib.sha256(b"three").hexdigest()
    p.write_bytes(b"four!")  # same size, new mtime
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert cache.sha256(p) == hashlib.sha256(b"four!").hexdigest()
    assert len(calls) == 3


def test_cache_same_file_through_symlink_is_one_entry(tmp_path, monkeypatch):
    calls = _count_hashes(monkeypatch)
    p = _file(tmp_path / "m.bin", b"data")
    link = tmp_path / "link.bin"
    link.symlink_to(p)
    cache = HashCache(tmp_path / "cache")
    assert cache.sha256(p) == cache.sha256(link)
    assert len(calls) == 1


def test_cache_dir_from_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "envcache"))
    assert HashCache().path == tmp_path / "envcache" / "hashes.json"
    assert HashCache(tmp_path / "arg").path == tmp_path / "arg" / "hashes.json"
    monkeypatch.delenv("MERGEKIT_SDXL_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert HashCache().path == tmp_path / "home" / ".cache" / "mergekit-sdxl" / "hashes.json"


@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe", b"[1,2]", b'{"version":1,"entries":{"x":{"size":"a"}}}'])
def test_corrupt_cache_is_treated_as_empty_and_repaired(tmp_path, caplog, garbage):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "hashes.json").write_bytes(garbage)
    p = _file(tmp_path / "m.bin", b"x")
    with caplog.at_level(logging.WARNING, logger="mergekit_sdxl.io.hashing"):
        assert HashCache(cache_dir).sha256(p) == hashlib.sha256(b"x").hexdigest()
    saved = json.loads((cache_dir / "hashes.json").read_text())
    assert saved["entries"][os.path.realpath(p)]["sha256"] == hashlib.sha256(b"x").hexdigest()


def test_record_merges_with_entries_saved_by_another_process(tmp_path):
    a, b = _file(tmp_path / "a", b"a"), _file(tmp_path / "b", b"b")
    c1, c2 = HashCache(tmp_path / "cache"), HashCache(tmp_path / "cache")
    c1.sha256(a)
    c2.sha256(b)  # c2 loaded before c1 saved? it re-reads on record, so both survive
    entries = json.loads((tmp_path / "cache" / "hashes.json").read_text())["entries"]
    assert set(entries) == {os.path.realpath(a), os.path.realpath(b)}


def test_unwritable_cache_does_not_fail(tmp_path, monkeypatch, caplog):
    def boom(*a, **kw):
        raise OSError("read-only")

    monkeypatch.setattr(hashing, "atomic_write_bytes", boom)
    p = _file(tmp_path / "m.bin", b"x")
    with caplog.at_level(logging.WARNING, logger="mergekit_sdxl.io.hashing"):
        assert HashCache(tmp_path / "c").sha256(p) == hashlib.sha256(b"x").hexdigest()
    assert "could not save" in caplog.text


def test_progress_hash(tmp_path):
    p = _file(tmp_path / "m.bin", os.urandom(1000))
    assert HashCache(tmp_path / "c").sha256(p, progress=True) == hashlib.sha256(p.read_bytes()).hexdigest()
