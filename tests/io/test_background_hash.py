"""Background hashing of a merge's inputs: threads, the cache, asking for one hash now, stopping."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import pytest

from mergekit_sdxl.io import hashing
from mergekit_sdxl.io.background_hash import BackgroundHasher
from mergekit_sdxl.io.hashing import SAMPLE_PREFIX, HashCache, HashingCancelled, sample_digest


def _files(tmp_path, n=3, size=200_000):
    paths = []
    for i in range(n):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(os.urandom(size))
        paths.append(p)
    return paths


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _recording(monkeypatch, gate=None):
    """sha256_file that records (file name, thread name) and, with ``gate``, waits for it first."""
    calls = []
    real = hashing.sha256_file

    def recorded(path, *a, **kw):
        if gate is not None:
            assert gate.wait(30)
        calls.append((os.path.basename(path), threading.current_thread().name))
        return real(path, *a, **kw)

    monkeypatch.setattr(hashing, "sha256_file", recorded)
    return calls


def test_hashes_in_threads_through_the_cache(tmp_path, monkeypatch):
    paths = _files(tmp_path)
    calls = _recording(monkeypatch)
    cache = HashCache(tmp_path / "cache")
    with BackgroundHasher(cache, [str(p) for p in paths], threads=2) as hasher:
        deadline = time.monotonic() + 30
        while not hasher.all_known() and time.monotonic() < deadline:
            time.sleep(0.01)  # not wait_all: that would hash what is left in this thread
        got = hasher.wait_all()
    assert got == {str(p): _sha(p) for p in paths}
    assert sorted(name for name, _ in calls) == ["f0.bin", "f1.bin", "f2.bin"]
    assert all(thread.startswith("mergekit-sdxl-hash-") for _, thread in calls), calls
    # Recorded as before: a new cache (a later merge) hashes nothing.
    calls.clear()
    with BackgroundHasher(HashCache(tmp_path / "cache"), [str(p) for p in paths]) as hasher:
        assert hasher.wait_all() == got
    assert calls == []


def test_a_file_reached_twice_is_hashed_once(tmp_path, monkeypatch):
    (p,) = _files(tmp_path, 1)
    link = tmp_path / "link.bin"
    link.symlink_to(p)
    calls = _recording(monkeypatch)
    with BackgroundHasher(HashCache(tmp_path / "cache"), [str(p), str(link)]) as hasher:
        assert hasher.sha256(str(link)) == hasher.sha256(str(p)) == _sha(p)
    assert len(calls) == 1


def test_asking_for_a_file_no_thread_started_hashes_it_at_once(tmp_path, monkeypatch):
    paths = _files(tmp_path)
    gate = threading.Event()
    real = hashing.sha256_file
    calls = []

    def first_blocks(path, *a, **kw):
        if os.path.basename(path) == "f0.bin":
            assert gate.wait(30)  # the thread is stuck on the first file
        calls.append((os.path.basename(path), threading.current_thread().name))
        return real(path, *a, **kw)

    monkeypatch.setattr(hashing, "sha256_file", first_blocks)
    with BackgroundHasher(HashCache(tmp_path / "cache"), [str(p) for p in paths], threads=1) as hasher:
        time.sleep(0.05)
        assert hasher.known(str(paths[0])) is None
        assert hasher.sha256(str(paths[2])) == _sha(paths[2])  # a pin, say: not behind f0
        assert calls == [("f2.bin", threading.main_thread().name)]
        gate.set()
        assert hasher.sha256(str(paths[0])) == _sha(paths[0])  # waited for the thread


def test_stop_ends_a_long_hash_promptly(tmp_path, monkeypatch):
    paths = _files(tmp_path, 2)
    started = threading.Event()

    def endless(path, chunk=0, callback=None, stop=None):
        started.set()
        while not stop.is_set():  # a huge file: one chunk after another until told to stop
            time.sleep(0.01)
        raise HashingCancelled(str(path))

    monkeypatch.setattr(hashing, "sha256_file", endless)
    hasher = BackgroundHasher(HashCache(tmp_path / "cache"), [str(p) for p in paths], threads=2).start()
    assert started.wait(10)
    t0 = time.monotonic()
    hasher.stop()
    assert time.monotonic() - t0 < 2
    assert not [t for t in threading.enumerate() if t.name.startswith("mergekit-sdxl-hash-")]
    assert not (tmp_path / "cache" / "hashes.json").exists()  # nothing half-hashed is cached


def test_stop_on_an_exception_in_the_with_block(tmp_path, monkeypatch):
    paths = _files(tmp_path, 1)
    started = threading.Event()

    def endless(path, chunk=0, callback=None, stop=None):
        started.set()
        while not stop.is_set():
            time.sleep(0.01)
        raise HashingCancelled(str(path))

    monkeypatch.setattr(hashing, "sha256_file", endless)
    with pytest.raises(KeyboardInterrupt):
        with BackgroundHasher(HashCache(tmp_path / "cache"), [str(p) for p in paths]):
            assert started.wait(10)
            raise KeyboardInterrupt
    assert not [t for t in threading.enumerate() if t.name.startswith("mergekit-sdxl-hash-")]


def test_an_error_is_raised_to_whoever_asks(tmp_path):
    (p,) = _files(tmp_path, 1)
    missing = tmp_path / "gone.bin"
    with BackgroundHasher(HashCache(tmp_path / "cache"), [str(p), str(missing)]) as hasher:
        with pytest.raises(FileNotFoundError):
            hasher.sha256(str(missing))
        assert hasher.sha256(str(p)) == _sha(p)
        with pytest.raises(FileNotFoundError):
            hasher.wait_all()
        with pytest.raises(KeyError):
            hasher.sha256(str(tmp_path / "not-an-input.bin"))


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_hashing_threads_never_take_ctrl_c(tmp_path, monkeypatch):
    (p,) = _files(tmp_path, 1)
    masks = []
    real = hashing.sha256_file

    def record_mask(path, *a, **kw):
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return real(path, *a, **kw)

    monkeypatch.setattr(hashing, "sha256_file", record_mask)
    with BackgroundHasher(HashCache(tmp_path / "cache"), [str(p)]) as hasher:
        hasher.wait_all()
    assert len(masks) == 1 and {signal.SIGINT, signal.SIGTERM} <= masks[0]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the main thread's is as it was


def test_sample_digest_tells_different_files_apart_cheaply(tmp_path):
    data = bytearray(os.urandom(5_000_000))
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(data)
    b.write_bytes(data)
    data[-1] ^= 1  # the last byte is always sampled
    c.write_bytes(data)
    assert sample_digest(a) == sample_digest(b) != sample_digest(c)
    assert sample_digest(a).startswith(SAMPLE_PREFIX) and len(sample_digest(a)) != 64
    small = tmp_path / "small"
    small.write_bytes(b"xy")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sample_digest(small) != sample_digest(empty)
