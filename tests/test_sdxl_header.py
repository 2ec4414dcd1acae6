import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from mergekit_sdxl.sdxl.header import CheckpointError, read_header


@pytest.fixture
def small_file(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file(
        {"a": torch.zeros(2, 3, dtype=torch.float16), "b": torch.arange(5, dtype=torch.int64), "s": torch.tensor(1.0)},
        str(p),
        metadata={"modelspec.title": "x"},
    )
    return p


def test_read_header(small_file):
    h = read_header(small_file)
    assert set(h.tensors) == {"a", "b", "s"}
    assert h.tensors["a"].dtype == "F16" and h.tensors["a"].shape == (2, 3)
    assert h.tensors["a"].nbytes == 12 and h.tensors["a"].numel == 6
    assert h.tensors["b"].dtype == "I64" and h.tensors["b"].shape == (5,)
    assert h.tensors["s"].shape == ()
    assert h.metadata == {"modelspec.title": "x"}
    assert h.file_size == small_file.stat().st_size
    assert h.data_start == 8 + h.header_size
    # absolute offsets point at the right bytes
    s, e = h.absolute_offsets("b")
    raw = small_file.read_bytes()[s:e]
    assert list(struct.unpack("<5q", raw)) == [0, 1, 2, 3, 4]


def test_truncated_data(small_file, tmp_path):
    data = small_file.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[:-4])
    with pytest.raises(CheckpointError) as ei:
        read_header(bad)
    assert ei.value.path == str(bad)
    assert ei.value.key is not None
    assert str(bad) in str(ei.value) and ei.value.key in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_header_length_beyond_file(tmp_path):
    bad = tmp_path / "h.safetensors"
    bad.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds file size") as ei:
        read_header(bad)
    assert str(bad) in str(ei.value)


def test_too_short(tmp_path):
    bad = tmp_path / "s.safetensors"
    bad.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        read_header(bad)


def test_bad_json(tmp_path):
    bad = tmp_path / "j.safetensors"
    body = b"{not json"
    bad.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CheckpointError, match="invalid JSON") as ei:
        read_header(bad)
    assert str(bad) in str(ei.value)


def test_bad_entry_and_size_mismatch(tmp_path):
    def write(doc, data=b""):
        body = json.dumps(doc).encode()
        p = tmp_path / "e.safetensors"
        p.write_bytes(struct.pack("<Q", len(body)) + body + data)
        return p

    p = write({"x": {"dtype": "F16", "shape": [2]}})
    with pytest.raises(CheckpointError) as ei:
        read_header(p)
    assert ei.value.key == "x"
    p = write({"x": {"dtype": "F16", "shape": [3], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CheckpointError, match="needs 6"):
        read_header(p)
    p = write({"x": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}, "__metadata__": {"k": "v"}}, b"\0" * 4)
    h = read_header(p)
    assert h.metadata == {"k": "v"} and h.tensors["x"].shape == (2,)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as ei:
        read_header(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(ei.value)


def test_pickle_roundtrip():
    import pickle

    e = CheckpointError("/x.safetensors", "boom", key="k")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.path, e2.key, str(e2)) == (e.path, e.key, str(e))
