"""StreamingCheckpointWriter: format, determinism, errors, atomicity, memory."""

from __future__ import annotations

import hashlib
import json
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_sdxl.io.hashing import sha256_file
from mergekit_sdxl.io.writer import StreamingCheckpointWriter, TensorEntrySpec, WriteResult, build_header


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.f16": torch.randn(3, 5, generator=g).half(),
        "model.bf16": torch.randn(4, 2, generator=g).bfloat16(),
        "model.f32": torch.randn(7, generator=g),
        "model.f64": torch.randn(2, 2, generator=g).double(),
        "model.i64": torch.arange(-3, 6, dtype=torch.int64),
        "model.i32": torch.arange(5, dtype=torch.int32),
        "model.u8": torch.arange(9, dtype=torch.uint8),
        "model.bool": torch.tensor([True, False, True]),
        "scalar.f32": torch.tensor(3.25),
        "scalar.bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty.f16": torch.empty(0, dtype=torch.float16),
        "empty.2d": torch.empty(3, 0),
    }


def _specs(tensors):
    return [TensorEntrySpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def _write(path, tensors, metadata=None, **kw) -> WriteResult:
    with StreamingCheckpointWriter(path, _specs(tensors), metadata or {}, **kw) as w:
        for k, v in tensors.items():
            w.write(k, v)
        return w.close()


def test_round_trip_all_dtypes(tmp_path):
    tensors = _tensors()
    out = tmp_path / "m.safetensors"
    res = _write(out, tensors)
    loaded = load_file(out)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
        assert torch.equal(loaded[k], v), k
    assert res.path == out
    assert not (tmp_path / "m.safetensors.partial").exists()


def test_sha256_autov2_size_match_final_file(tmp_path):
    out = tmp_path / "m.safetensors"
    res = _write(out, _tensors())
    data = out.read_bytes()
    assert res.sha256 == hashlib.sha256(data).hexdigest()
    assert res.autov2 == res.sha256[:10]
    assert res.size == len(data)


def test_header_layout_and_metadata(tmp_path):
    tensors = _tensors()
    meta = {"modelspec.title": "Mérge", "a": "1", "recipe": json.dumps({"x": [1, 2]})}
    out = tmp_path / "m.safetensors"
    _write(out, tensors, meta)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == meta
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    text = raw[8 : 8 + n].decode("utf-8")
    body = text.rstrip(" ")
    header = json.loads(body)
    # Compact JSON: the only spaces are the padding and those inside string values.
    assert body == json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    # __metadata__ first (sorted keys), then entries in the given order with contiguous offsets.
    assert list(header) == ["__metadata__", *tensors]
    assert list(header["__metadata__"]) == sorted(meta)
    offset = 0
    for k, v in tensors.items():
        start, end = header[k]["data_offsets"]
        assert start == offset and end - start == v.numel() * v.element_size()
        offset = end
    assert len(raw) == 8 + n + offset
    assert raw[:8 + n] == build_header(_specs(tensors), meta)


def test_no_metadata_means_no_metadata_key(tmp_path):
    out = tmp_path / "m.safetensors"
    _write(out, {"w": torch.ones(2)})
    n = int.from_bytes(out.read_bytes()[:8], "little")
    assert "__metadata__" not in json.loads(out.read_bytes()[8 : 8 + n])


def test_identical_inputs_give_identical_bytes(tmp_path):
    t = _tensors()
    a = _write(tmp_path / "a.safetensors", t, {"x": "1", "y": "2"})
    # Same content, metadata given in another insertion order, tensors as fresh copies.
    b = _write(tmp_path / "b.safetensors", {k: v.clone() for k, v in t.items()}, {"y": "2", "x": "1"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a.sha256 == b.sha256


def test_non_contiguous_tensor(tmp_path):
    base = torch.randn(4, 6)
    t = base.t()  # non-contiguous view
    out = tmp_path / "m.safetensors"
    _write(out, {"t": t, "s": base[:, ::2]})
    loaded = load_file(out)
    assert torch.equal(loaded["t"], t) and torch.equal(loaded["s"], base[:, ::2])


def test_wrong_order_names_expected_and_got(tmp_path):
    out = tmp_path / "m.safetensors"
    specs = [TensorEntrySpec("first", torch.float32, (2,)), TensorEntrySpec("second", torch.float32, (2,))]
    with pytest.raises(ValueError, match=r"expected 'first'.*got 'second'"):
        with StreamingCheckpointWriter(out, specs, {}) as w:
            w.write("second", torch.ones(2))
    assert not out.exists() and not (tmp_path / "m.safetensors.partial").exists()


@pytest.mark.parametrize(
    "tensor, pattern",
    [
        (torch.ones(3, 2), r"unet\.w: shape \(3, 2\) does not match the declared \(2, 3\)"),
        (torch.ones(2, 3, dtype=torch.float16), r"unet\.w: dtype torch.float16"),
    ],
)
def test_wrong_shape_or_dtype_names_key(tmp_path, tensor, pattern):
    out = tmp_path / "m.safetensors"
    w = StreamingCheckpointWriter(out, [TensorEntrySpec("unet.w", torch.float32, (2, 3))], {})
    with pytest.raises(ValueError, match=pattern):
        w.write("unet.w", tensor)
    w.abort()
    assert not out.exists() and not (tmp_path / "m.safetensors.partial").exists()


def test_extra_and_missing_entries(tmp_path):
    out = tmp_path / "m.safetensors"
    specs = [TensorEntrySpec("a", torch.float32, (1,)), TensorEntrySpec("b", torch.float32, (1,))]
    w = StreamingCheckpointWriter(out, specs, {})
    w.write("a", torch.ones(1))
    with pytest.raises(ValueError, match=r"1 of 2 entries not written \(next: 'b'\)"):
        w.close()
    assert not out.exists() and not (tmp_path / "m.safetensors.partial").exists()

    w = StreamingCheckpointWriter(out, specs[:1], {})
    w.write("a", torch.ones(1))
    with pytest.raises(ValueError, match="unexpected tensor 'b'"):
        w.write("b", torch.ones(1))
    w.close()
    assert out.exists()


def test_invalid_specs_rejected(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        StreamingCheckpointWriter(tmp_path / "m", [TensorEntrySpec("a", torch.float32, (1,))] * 2, {})
    with pytest.raises(ValueError, match="complex64"):
        StreamingCheckpointWriter(tmp_path / "m", [TensorEntrySpec("a", torch.complex64, (1,))], {})
    with pytest.raises(TypeError, match="metadata"):
        StreamingCheckpointWriter(tmp_path / "m", [TensorEntrySpec("a", torch.float32, (1,))], {"k": 1})


def test_exception_midway_leaves_no_output(tmp_path):
    tensors = _tensors()
    out = tmp_path / "m.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with StreamingCheckpointWriter(out, _specs(tensors), {}) as w:
            for i, (k, v) in enumerate(tensors.items()):
                if i == 4:
                    raise RuntimeError("boom")
                w.write(k, v)
    assert list(tmp_path.iterdir()) == []


def test_exception_keeps_previous_output_untouched(tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"previous")
    w = StreamingCheckpointWriter(out, _specs({"a": torch.ones(1)}), {})
    w.abort()
    assert out.read_bytes() == b"previous"


def test_context_manager_closes_on_clean_exit(tmp_path):
    out = tmp_path / "m.safetensors"
    with StreamingCheckpointWriter(out, [TensorEntrySpec("a", torch.float32, (2,))], {}) as w:
        w.write("a", torch.ones(2))
    assert w.result is not None and w.result.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert w.close() == w.result  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        w.write("a", torch.ones(2))


def test_custom_temp_path(tmp_path):
    out = tmp_path / "m.safetensors"
    tmp = tmp_path / "scratch" / "m.tmp"
    tmp.parent.mkdir()
    res = _write(out, {"a": torch.ones(3)}, temp_path=tmp)
    assert res.path == out and not tmp.exists()


def test_writer_retains_no_tensors(tmp_path):
    """50 x 8 MB tensors: each one is garbage as soon as write() returns."""
    n, numel = 50, 2 * 1024 * 1024  # float32: 8 MB each
    specs = [TensorEntrySpec(f"t{i}", torch.float32, (numel,)) for i in range(n)]
    out = tmp_path / "big.safetensors"
    refs = []
    with StreamingCheckpointWriter(out, specs, {}) as w:
        for i in range(n):
            t = torch.full((numel,), float(i))
            w.write(f"t{i}", t)
            refs.append(weakref.ref(t))
            del t
            # No gc.collect(): refcounting frees at once unless something (writer, cycle) holds it.
            assert refs[-1]() is None, f"writer kept t{i} alive"
        assert not any(isinstance(v, torch.Tensor) for v in vars(w).values())
        res = w.close()
    assert res.size == out.stat().st_size
    assert res.sha256 == sha256_file(out)
    with safe_open(str(out), framework="pt") as f:
        assert torch.equal(f.get_tensor("t49")[:4], torch.full((4,), 49.0))
