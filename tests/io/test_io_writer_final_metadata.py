"""Metadata known only at the end: a header written with same-length placeholders and completed in
place by ``close(final_metadata=...)``, resumable from either header, never publishing wrong bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors import safe_open

from mergekit_sdxl.errors import OutputError
from mergekit_sdxl.io.journal import read_journal
from mergekit_sdxl.io.writer import ResumeMismatch, StreamingCheckpointWriter, TensorEntrySpec, build_header

REAL = hashlib.sha256(b"the input").hexdigest()
PENDING = "pending-sha256-of-input-" + "0" * 40
FINAL = {"inputs": f'[{{"sha256":"{REAL}"}}]', "recipe": "tgmd"}
PLACEHOLDERS = {"inputs": f'[{{"sha256":"{PENDING}"}}]', "recipe": "tgmd"}


def _entries(n: int = 12) -> List[TensorEntrySpec]:
    return [TensorEntrySpec(f"layer{i:02d}.weight", torch.float16, (500 + 37 * i,)) for i in range(n)]


def _tensor(spec: TensorEntrySpec) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(spec.name[5:7]))
    return (torch.randn(spec.shape, generator=g) * 10).to(spec.dtype)


def _write(w: StreamingCheckpointWriter, stop: int = 10**9) -> None:
    for i, spec in enumerate(w.entries):
        if spec.name in w.completed_names():
            continue
        if i == stop:
            raise KeyboardInterrupt  # as a Ctrl-C between two tensors
        w.write(spec.name, _tensor(spec))


def _reference(tmp_path: Path) -> bytes:
    """The file written with the final metadata from the start."""
    out = tmp_path / "reference" / "m.safetensors"
    out.parent.mkdir()
    with StreamingCheckpointWriter(out, _entries(), FINAL) as w:
        _write(w)
    return out.read_bytes()


def _open(out: Path, metadata: Dict[str, str], alternate=None) -> StreamingCheckpointWriter:
    return StreamingCheckpointWriter.open_or_resume(
        out, _entries(), metadata, "fp", journal_every_bytes=0, journal_every_s=0, alternate_metadata=alternate
    )


def test_placeholders_completed_at_close_give_the_final_file(tmp_path):
    assert len(build_header(_entries(), FINAL)) == len(build_header(_entries(), PLACEHOLDERS))
    ref = _reference(tmp_path)
    out = tmp_path / "m.safetensors"
    w = _open(out, PLACEHOLDERS)
    _write(w)
    with open(w.temp_path, "rb") as fh:
        assert PENDING.encode() in fh.read(4096)  # the partial holds the placeholders until close
    seen = []
    result = w.close(before_publish=lambda r: seen.append(out.exists()), final_metadata=FINAL)
    data = out.read_bytes()
    assert data == ref
    assert result.sha256 == hashlib.sha256(data).hexdigest() == hashlib.sha256(ref).hexdigest()
    assert result.autov2 == result.sha256[:10] and result.size == len(data)
    assert seen == [False]  # sidecars are written before the output appears
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == FINAL


def test_a_final_header_of_another_length_is_refused_before_anything_changes(tmp_path):
    out = tmp_path / "m.safetensors"
    w = _open(out, PLACEHOLDERS)
    _write(w)
    longer = dict(FINAL, recipe="tgmd, but longer")
    with pytest.raises(ValueError, match="same length|keep every value's length"):
        w.close(final_metadata=longer)
    assert not out.exists()
    assert w.temp_path.exists()  # journaled: kept for a resume
    with open(w.temp_path, "rb") as fh:
        assert PENDING.encode() in fh.read(4096)


def test_data_changed_on_disk_before_close_is_caught_with_a_patched_header(tmp_path):
    out = tmp_path / "m.safetensors"
    w = _open(out, PLACEHOLDERS)
    _write(w)
    w._fh.flush()
    size = w.temp_path.stat().st_size
    with open(w.temp_path, "r+b") as fh:  # another program flips a data byte
        fh.seek(size - 100)
        byte = fh.read(1)
        fh.seek(size - 100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(OutputError, match="differ from the bytes written"):
        w.close(final_metadata=FINAL)
    assert not out.exists()


def test_resume_of_a_placeholder_partial_once_the_final_metadata_is_known(tmp_path):
    ref = _reference(tmp_path)
    out = tmp_path / "m.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with _open(out, PLACEHOLDERS) as w:
            _write(w, stop=5)
    assert read_journal(str(w.temp_path) + ".journal").completed == 5
    # The rerun knows the hashes (the cache has them now): it opens with the final metadata and
    # is told the placeholder version, with which the partial was started.
    asked = []
    w = _open(out, FINAL, alternate=lambda: asked.append(1) or PLACEHOLDERS)
    assert w.resumed_from == 5 and asked == [1]
    _write(w)
    result = w.close(final_metadata=FINAL)
    assert out.read_bytes() == ref and result.sha256 == hashlib.sha256(ref).hexdigest()


def test_the_alternate_is_not_asked_for_when_the_partial_has_our_header(tmp_path):
    ref = _reference(tmp_path)
    out = tmp_path / "m.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with _open(out, FINAL) as w:
            _write(w, stop=4)

    def never():
        raise AssertionError("the alternate metadata (which may wait for hashes) was computed")

    w = _open(out, FINAL, alternate=never)
    assert w.resumed_from == 4
    _write(w)
    w.close(final_metadata=FINAL)
    assert out.read_bytes() == ref


def test_killed_after_the_final_header_was_written_resumes(tmp_path):
    ref = _reference(tmp_path)
    out = tmp_path / "m.safetensors"
    w = _open(out, PLACEHOLDERS)
    _write(w)

    def die(result):
        raise KeyboardInterrupt  # after the header was completed and verified, before the rename

    with pytest.raises(KeyboardInterrupt):
        w.close(before_publish=die, final_metadata=FINAL)
    assert not out.exists()
    with open(w.temp_path, "rb") as fh:
        assert REAL.encode() in fh.read(4096)  # the final header is on disk, the journal says otherwise
    # A rerun that does not know the hashes yet puts the journaled header back and goes on.
    w = _open(out, PLACEHOLDERS, alternate=lambda: FINAL)
    assert w.resumed_from == len(_entries())
    result = w.close(final_metadata=FINAL)
    assert out.read_bytes() == ref and result.sha256 == hashlib.sha256(ref).hexdigest()


def test_a_partial_with_other_metadata_is_still_refused(tmp_path):
    out = tmp_path / "m.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with _open(out, dict(PLACEHOLDERS, recipe="ties")) as w:
            _write(w, stop=3)
    with pytest.raises(ResumeMismatch, match="metadata changed: recipe"):
        _open(out, PLACEHOLDERS, alternate=lambda: FINAL)
