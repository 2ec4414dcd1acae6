"""Resume after interruption: the resumed file is byte-identical to an uninterrupted write."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_sdxl.io.journal import read_journal
from mergekit_sdxl.io.writer import ResumeMismatch, StreamingCheckpointWriter
from tests.paths import REPO

# Shared by this process and the child processes: the same entries and tensor data.
MODEL_SRC = textwrap.dedent(
    """
    import torch
    from mergekit_sdxl.io.writer import TensorEntrySpec

    _DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.int64]

    def make_entries(n, numel=3000):
        out = []
        for i in range(n):
            shape = () if i % 7 == 3 else (0,) if i % 11 == 5 else (numel + 17 * i,)
            out.append(TensorEntrySpec(f"layer{i:03d}.weight", _DTYPES[i % 4], shape))
        return out

    def make_tensor(spec):
        g = torch.Generator().manual_seed(int(spec.name[5:8]))
        t = torch.randn(spec.shape, generator=g) * 100
        return t.to(spec.dtype)

    METADATA = {"format": "pt", "recipe": "tgmd", "note": "resume test"}
    """
)

CHILD_SRC = MODEL_SRC + textwrap.dedent(
    """
    import os, sys
    from mergekit_sdxl.io import journal as journal_mod
    from mergekit_sdxl.io.writer import StreamingCheckpointWriter

    out, n, numel, mode, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    entries = make_entries(n, numel)
    w = StreamingCheckpointWriter.open_or_resume(
        out, entries, METADATA, fingerprint="fp-1", journal_every_bytes=0, journal_every_s=0
    )
    if mode == "journal_replace":
        # Die inside the k-th journal rewrite: temp journal written, not yet renamed.
        real_replace, calls = os.replace, [0]
        def dying_replace(src, dst):
            if str(dst).endswith(".journal"):
                calls[0] += 1
                if calls[0] == k:
                    os._exit(9)
            return real_replace(src, dst)
        journal_mod.os.replace = dying_replace
    for i, spec in enumerate(entries):
        if spec.name in w.completed_names():
            continue
        if mode == "exit_after" and i == k:
            os._exit(9)  # no flush, no close, no cleanup
        if mode == "torn" and i == k:
            # Half of the tensor reaches the disk, then the process dies.
            data = make_tensor(spec).reshape(-1).view(torch.uint8).numpy().tobytes()
            w._fh.write(data[: len(data) // 2])
            w._fh.flush()
            os._exit(9)
        w.write(spec.name, make_tensor(spec))
        print(i, flush=True)  # the parent may SIGKILL us at any line
    if mode == "before_close":
        os._exit(9)
    w.close()
    """
)


@pytest.fixture
def model():
    ns: dict = {}
    exec(compile(MODEL_SRC, "<model>", "exec"), ns)
    return ns


def _reference(tmp_path: Path, model, n: int, numel: int = 3000):
    """Bytes and sha256 of an uninterrupted write (no journal)."""
    out = tmp_path / "reference" / "ref.safetensors"
    out.parent.mkdir(exist_ok=True)
    entries = model["make_entries"](n, numel)
    with StreamingCheckpointWriter(out, entries, model["METADATA"]) as w:
        for spec in entries:
            w.write(spec.name, model["make_tensor"](spec))
        res = w.close()
    return out.read_bytes(), res.sha256


def _finish(out: Path, model, n: int, numel: int = 3000, fingerprint: str = "fp-1", **kw):
    """Resume (or start) and write whatever is left; returns (writer, result)."""
    entries = model["make_entries"](n, numel)
    w = StreamingCheckpointWriter.open_or_resume(out, entries, model["METADATA"], fingerprint, **kw)
    done = set(w.completed_names())
    assert w.completed_names() == [e.name for e in entries[: len(done)]]  # always a prefix
    for spec in entries:
        if spec.name not in done:
            w.write(spec.name, model["make_tensor"](spec))
    return w, w.close()


def _assert_same(out: Path, res, ref):
    ref_bytes, ref_sha = ref
    assert out.read_bytes() == ref_bytes
    assert res.sha256 == ref_sha == hashlib.sha256(out.read_bytes()).hexdigest()
    # A finished write leaves nothing but the output.
    assert not Path(str(out) + ".partial").exists()
    assert not Path(str(out) + ".partial.journal").exists()
    assert not list(out.parent.glob(".*.tmp"))


def _start_and_drop(out: Path, model, n: int, k: int, **kw):
    """Write the first k entries, then drop the writer without close (as a crash would)."""
    entries = model["make_entries"](n)
    w = StreamingCheckpointWriter(out, entries, model["METADATA"], journal=True, fingerprint="fp-1", **kw)
    for spec in entries[:k]:
        w.write(spec.name, model["make_tensor"](spec))
    del w
    gc.collect()


N = 24


@pytest.mark.parametrize("k", [0, 1, 5, N // 2, N - 1, N])
def test_drop_writer_then_resume_is_identical(tmp_path, model, k):
    ref = _reference(tmp_path, model, N)
    out = tmp_path / "m.safetensors"
    _start_and_drop(out, model, N, k, journal_every_bytes=0, journal_every_s=0)
    assert not out.exists()
    assert read_journal(str(out) + ".partial.journal").completed == k
    w, res = _finish(out, model, N)
    assert w.resumed_from == k
    _assert_same(out, res, ref)


def test_resume_with_sparse_checkpoints(tmp_path, model):
    """Default-ish intervals: fewer journal updates, the unjournaled tail is rewritten."""
    ref = _reference(tmp_path, model, N)
    out = tmp_path / "m.safetensors"
    _start_and_drop(out, model, N, 17, journal_every_bytes=20_000, journal_every_s=3600)
    done = read_journal(str(out) + ".partial.journal").completed
    assert 0 < done < 17
    w, res = _finish(out, model, N)
    assert w.resumed_from == done
    _assert_same(out, res, ref)


def test_exception_checkpoints_progress_and_keeps_partial(tmp_path, model):
    ref = _reference(tmp_path, model, N)
    out = tmp_path / "m.safetensors"
    entries = model["make_entries"](N)
    with pytest.raises(KeyboardInterrupt):
        with StreamingCheckpointWriter(
            out, entries, model["METADATA"], journal=True, fingerprint="fp-1", journal_every_bytes=1 << 40, journal_every_s=3600
        ) as w:
            for spec in entries[:9]:
                w.write(spec.name, model["make_tensor"](spec))
            raise KeyboardInterrupt
    assert not out.exists()
    # abort() saved everything written before the interrupt, despite the huge intervals.
    assert read_journal(str(out) + ".partial.journal").completed == 9
    w, res = _finish(out, model, N)
    assert w.resumed_from == 9
    _assert_same(out, res, ref)


def test_abort_discard_removes_partial(tmp_path, model):
    out = tmp_path / "m.safetensors"
    entries = model["make_entries"](4)
    w = StreamingCheckpointWriter(out, entries, model["METADATA"], journal=True, fingerprint="fp-1")
    w.write(entries[0].name, model["make_tensor"](entries[0]))
    w.abort(discard=True)
    assert list(tmp_path.iterdir()) == []


def _run_child(out: Path, mode: str, k: int, n: int = N, numel: int = 3000, **popen_kw):
    script = out.parent / "child.py"
    script.write_text(CHILD_SRC)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, str(script), str(out), str(n), str(numel), mode, str(k)],
        cwd=str(REPO),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen_kw,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, k",
    [
        ("exit_after", 0),
        ("exit_after", 1),
        ("exit_after", 13),
        ("before_close", 0),
        ("torn", 0),
        ("torn", 6),
        ("torn", N - 1),
        ("journal_replace", 1),  # dies before the first journal exists
        ("journal_replace", 2),
        ("journal_replace", 10),
    ],
)
def test_child_process_killed_then_resumed(tmp_path, model, mode, k):
    ref = _reference(tmp_path, model, N)
    out = tmp_path / "m.safetensors"
    proc = _run_child(out, mode, k)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 9, err
    assert not out.exists()
    # A dying journal rewrite may leave its temp file; it must not confuse the resume.
    w, res = _finish(out, model, N)
    if mode in ("exit_after", "torn"):
        assert w.resumed_from == k
    _assert_same(out, res, ref)


@pytest.mark.slow
@pytest.mark.parametrize("after_lines", [1, 4, 11, 19])
def test_child_sigkilled_mid_stream_then_resumed(tmp_path, model, after_lines):
    """SIGKILL from outside at arbitrary points while ~1 MB tensors stream and journal."""
    n, numel = 24, 250_000
    ref = _reference(tmp_path, model, n, numel)
    out = tmp_path / "m.safetensors"
    proc = _run_child(out, "run", 0, n=n, numel=numel)
    for _ in range(after_lines):
        assert proc.stdout.readline(), proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists()
    w, res = _finish(out, model, n, numel)
    assert w.resumed_from >= after_lines
    _assert_same(out, res, ref)


@pytest.mark.slow
def test_child_resumes_a_child(tmp_path, model):
    """The resume path used by a real CLI: a second process picks up where the first died."""
    ref = _reference(tmp_path, model, N)
    out = tmp_path / "m.safetensors"
    first = _run_child(out, "exit_after", 8)
    first.communicate(timeout=120)
    second = _run_child(out, "run", 0)
    lines, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert lines.split()[0] == "8"  # resumed at entry 8, not from the start
    assert out.read_bytes() == ref[0]
    assert not Path(str(out) + ".partial.journal").exists()


def test_fingerprint_change_raises_and_keeps_partial(tmp_path, model):
    out = tmp_path / "m.safetensors"
    old_fp = json.dumps({"method": "tgmd", "models": ["a", "b"], "density": 0.5})
    new_fp = json.dumps({"method": "tgmd", "models": ["a", "c"], "density": 0.5})
    entries = model["make_entries"](N)
    w = StreamingCheckpointWriter(out, entries, model["METADATA"], journal=True, fingerprint=old_fp, journal_every_s=0)
    for spec in entries[:5]:
        w.write(spec.name, model["make_tensor"](spec))
    del w
    before = Path(str(out) + ".partial").read_bytes()
    with pytest.raises(ResumeMismatch, match=r"changed fields: models.*--restart"):
        StreamingCheckpointWriter.open_or_resume(out, entries, model["METADATA"], new_fp)
    # Nothing was touched by the refused resume.
    assert Path(str(out) + ".partial").read_bytes() == before
    assert read_journal(str(out) + ".partial.journal").fingerprint == old_fp
    with pytest.raises(ResumeMismatch, match=r"recorded 'opaque-1', now 'opaque-2'"):
        w2 = StreamingCheckpointWriter(out, entries, model["METADATA"], journal=True, fingerprint="opaque-1")
        w2.abort()
        StreamingCheckpointWriter.open_or_resume(out, entries, model["METADATA"], "opaque-2")


def test_restart_starts_over(tmp_path, model):
    ref = _reference(tmp_path, model, N)
    out = tmp_path / "m.safetensors"
    _start_and_drop(out, model, N, 7, journal_every_bytes=0, journal_every_s=0)
    w, res = _finish(out, model, N, fingerprint="fp-2", restart=True)
    assert w.resumed_from == 0
    _assert_same(out, res, ref)


def test_same_fingerprint_other_header_raises(tmp_path, model):
    out = tmp_path / "m.safetensors"
    _start_and_drop(out, model, N, 3, journal_every_bytes=0, journal_every_s=0)
    entries = model["make_entries"](N)
    with pytest.raises(ResumeMismatch, match=r"metadata changed: note.*--restart"):
        StreamingCheckpointWriter.open_or_resume(out, entries, {**model["METADATA"], "note": "x"}, "fp-1")
    with pytest.raises(ResumeMismatch, match=r"tensor count changed"):
        StreamingCheckpointWriter.open_or_resume(out, entries[:-1], model["METADATA"], "fp-1")
    w, _ = _finish(out, model, N, restart=True)
    assert w.resumed_from == 0


@pytest.mark.parametrize("garbage", [b"", b"{", b'{"version":1}', b'{"version":99,"completed":1}', b"\xff"])
def test_unreadable_journal_starts_fresh_with_warning(tmp_path, model, caplog, garbage):
    ref = _reference(tmp_path, model, N)
    out = tmp_path / "m.safetensors"
    _start_and_drop(out, model, N, 6, journal_every_bytes=0, journal_every_s=0)
    Path(str(out) + ".partial.journal").write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="mergekit_sdxl.io.writer"):
        w, res = _finish(out, model, N)
    assert "journal" in caplog.text and "from scratch" in caplog.text
    assert w.resumed_from == 0
    _assert_same(out, res, ref)


def test_corrupted_prefix_starts_fresh_with_warning(tmp_path, model, caplog):
    ref = _reference(tmp_path, model, N)
    out = tmp_path / "m.safetensors"
    _start_and_drop(out, model, N, 6, journal_every_bytes=0, journal_every_s=0)
    temp = Path(str(out) + ".partial")
    data = bytearray(temp.read_bytes())
    data[-10] ^= 0xFF  # bit rot inside the journaled prefix
    temp.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mergekit_sdxl.io.writer"):
        w, res = _finish(out, model, N)
    assert "prefix sha256" in caplog.text
    assert w.resumed_from == 0
    _assert_same(out, res, ref)


def test_truncated_temp_starts_fresh(tmp_path, model, caplog):
    ref = _reference(tmp_path, model, N)
    out = tmp_path / "m.safetensors"
    _start_and_drop(out, model, N, 6, journal_every_bytes=0, journal_every_s=0)
    temp = Path(str(out) + ".partial")
    temp.write_bytes(temp.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING, logger="mergekit_sdxl.io.writer"):
        w, res = _finish(out, model, N)
    assert w.resumed_from == 0
    _assert_same(out, res, ref)


def test_journal_without_temp_starts_fresh(tmp_path, model):
    ref = _reference(tmp_path, model, N)
    out = tmp_path / "m.safetensors"
    _start_and_drop(out, model, N, 6, journal_every_bytes=0, journal_every_s=0)
    Path(str(out) + ".partial").unlink()
    w, res = _finish(out, model, N)
    assert w.resumed_from == 0
    _assert_same(out, res, ref)


def test_fresh_writer_discards_stale_journal(tmp_path, model):
    """A plain constructor with journal=True never resumes; it replaces old state."""
    ref = _reference(tmp_path, model, N)
    out = tmp_path / "m.safetensors"
    _start_and_drop(out, model, N, 6, journal_every_bytes=0, journal_every_s=0)
    entries = model["make_entries"](N)
    w = StreamingCheckpointWriter(out, entries, model["METADATA"], journal=True, fingerprint="other")
    assert w.completed_names() == [] and read_journal(str(out) + ".partial.journal").completed == 0
    for spec in entries:
        w.write(spec.name, model["make_tensor"](spec))
    _assert_same(out, w.close(), ref)


def test_journal_only_claims_synced_prefix(tmp_path, model):
    """The journal's prefix hash always matches the temp file's first `offset` bytes."""
    out = tmp_path / "m.safetensors"
    entries = model["make_entries"](N)
    w = StreamingCheckpointWriter(out, entries, model["METADATA"], journal=True, fingerprint="fp", journal_every_bytes=0)
    for spec in entries[:10]:
        w.write(spec.name, model["make_tensor"](spec))
        state = read_journal(str(out) + ".partial.journal")
        prefix = Path(str(out) + ".partial").read_bytes()[: state.offset]
        assert len(prefix) == state.offset
        assert hashlib.sha256(prefix).hexdigest() == state.prefix_sha256
    w.abort(discard=True)


def test_stale_writer_kept_alive_cannot_corrupt_resumed_file(tmp_path, model):
    """A crashed writer still referenced (e.g. by a traceback) holds no unflushed bytes.

    The stale writer writes other values than the resumed one (as a nondeterministic GPU
    merge could): if it held buffered bytes, releasing it would overwrite the resumed data.
    """
    out = tmp_path / "m.safetensors"
    entries = model["make_entries"](N)
    stale = StreamingCheckpointWriter(
        out, entries, model["METADATA"], journal=True, fingerprint="fp-1", journal_every_bytes=1 << 40, journal_every_s=3600
    )
    for i, spec in enumerate(entries[:11]):  # the last one is 0-d: small enough to sit in a buffer
        stale.write(spec.name, model["make_tensor"](spec) + 1)
        if i == 5:
            stale.checkpoint()
    w, res = _finish(out, model, N)
    assert w.resumed_from == 6
    del stale
    gc.collect()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == res.sha256
    loaded = load_file(out)
    for spec in entries[w.resumed_from :]:
        assert torch.equal(loaded[spec.name], model["make_tensor"](spec)), spec.name
