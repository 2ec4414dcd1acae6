"""read_header (sdxl/header.py): valid files, and every kind of hostile header as a CheckpointError."""

import json
import os
import re
import stat
import struct
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_sdxl.sdxl.header import MAX_HEADER_SIZE, MAX_NESTING, CheckpointError, read_header


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


# --- hostile headers ---------------------------------------------------------------------------
# Each case: (body, data) written as <u64 len><body><data>; expected message pattern; the tensor the
# error must name (or None). read_header must raise CheckpointError naming the file, never anything
# else, and finish quickly.

E = '{"dtype":"U8","shape":[2],"data_offsets":[0,2]}'  # a valid 2-byte tensor entry


def _raw(path, body, data=b""):
    body = body.encode() if isinstance(body, str) else body
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


HOSTILE = {
    # id: (body, data, message regex, key)
    "nested_200k": ('{"__metadata__":' + "[" * 200_000 + "]" * 200_000 + "}", b"", "nested more than 64", None),
    "nested_unbalanced": ("{" + "[" * 200_000, b"", "unbalanced", None),
    "nested_65": ('{"a":' + "[" * 65 + "]" * 65 + "}", b"", "nested more than 64", None),
    "nan_metadata": ('{"__metadata__":{"x":NaN}}', b"", "NaN is not valid JSON", None),
    "infinity_offset": ('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,Infinity]}}', b"xx", "Infinity", None),
    "minus_infinity_dim": ('{"a":{"dtype":"U8","shape":[-Infinity],"data_offsets":[0,2]}}', b"xx", "-Infinity", None),
    "float_offset": ('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2.0]}}', b"xx", "invalid data_offsets", "a"),
    "float_dim": ('{"a":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}}', b"xx", "dimension 2.0", "a"),
    "bool_dim": ('{"a":{"dtype":"U8","shape":[true, 2],"data_offsets":[0,2]}}', b"xx", "dimension True", "a"),
    "negative_dim": ('{"a":{"dtype":"U8","shape":[-2],"data_offsets":[0,2]}}', b"xx", "dimension -2", "a"),
    "string_dim": ('{"a":{"dtype":"U8","shape":["2"],"data_offsets":[0,2]}}', b"xx", "dimension '2'", "a"),
    "int_5000_digits": ('{"a":{"dtype":"U8","shape":[' + "9" * 5000 + '],"data_offsets":[0,2]}}', b"xx", "5000 digits", None),
    "dim_2_64": ('{"a":{"dtype":"U8","shape":[18446744073709551616,0],"data_offsets":[0,0]}}', b"", "18446744073709551616", "a"),
    "offset_2_64": ('{"a":{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551616,18446744073709551616]}}', b"", "invalid data_offsets", "a"),
    "offset_beyond_file": ('{"a":{"dtype":"U8","shape":[2000],"data_offsets":[0,2000]}}', b"xx", "truncated", "a"),
    "shape_overflow": ('{"a":{"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', b"", "overflows 64 bits", "a"),
    "bytes_overflow": ('{"a":{"dtype":"F64","shape":[4294967296,1073741824],"data_offsets":[0,0]}}', b"", "overflows 64 bits", "a"),
    "overlap": ('{"a":' + E + ',"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"xx", "overlap tensor 'a'", "b"),
    "same_offsets": ('{"a":' + E + ',"b":' + E + "}", b"xx", "overlap", "b"),
    "gap": ('{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"xx", "gap of 1 bytes", "a"),
    "trailing_bytes": ('{"a":' + E + "}", b"xxx", "1 bytes unaccounted", None),
    "data_without_tensors": ("{}", b"x", "unaccounted", None),
    "end_before_start": ('{"a":{"dtype":"U8","shape":[0],"data_offsets":[2,0]}}', b"xx", "end before start", "a"),
    "size_mismatch": ('{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,2]}}', b"xx", "needs 4", "a"),
    "duplicate_tensor": ('{"a":' + E + ',"a":' + E + "}", b"xx", "duplicate tensor name 'a'", None),
    "duplicate_field": ('{"a":{"dtype":"U8","dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"xx", "duplicate field 'dtype'", "a"),
    "duplicate_metadata_key": ('{"__metadata__":{"k":"v","k":"w"}}', b"", "duplicate __metadata__ key 'k'", None),
    "duplicate_metadata_object": ('{"__metadata__":{"k":"v"},"__metadata__":{"k":"w"}}', b"", "duplicate __metadata__ object", None),
    "metadata_int": ('{"__metadata__":{"k":1}}', b"", "value of 'k' is an integer", None),
    "metadata_object": ('{"__metadata__":{"k":{"x":"y"}}}', b"", "value of 'k' is an object", None),
    "metadata_null_value": ('{"__metadata__":{"k":null}}', b"", "value of 'k' is null", None),
    "metadata_list": ('{"__metadata__":["k"]}', b"", "__metadata__ is an array", None),
    "unknown_dtype": ('{"a":{"dtype":"X9","shape":[2],"data_offsets":[0,2]}}', b"xx", "unknown dtype 'X9'", "a"),
    "lowercase_dtype": ('{"a":{"dtype":"f16","shape":[1],"data_offsets":[0,2]}}', b"xx", "unknown dtype 'f16'", "a"),
    "dtype_not_string": ('{"a":{"dtype":7,"shape":[2],"data_offsets":[0,2]}}', b"xx", "dtype is an integer", "a"),
    "extra_field": ('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"foo":1}}', b"xx", "unexpected field.*'foo'", "a"),
    "missing_field": ('{"a":{"dtype":"U8","shape":[2]}}', b"xx", "missing field.*'data_offsets'", "a"),
    "three_offsets": ('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2,2]}}', b"xx", "invalid data_offsets", "a"),
    "entry_not_object": ('{"a":1}', b"", "an integer, expected an object", "a"),
    "not_utf8": (b'{"a\xff":' + E.encode() + b"}", b"xx", "not valid UTF-8", None),
    "lone_surrogate": ('{"a\\ud800":' + E + "}", b"xx", "lone surrogate", "a\ud800"),
    "utf8_bom": ("\ufeff{}".encode(), b"", "does not start with '{'", None),
    "json_array": ("[]", b"", "does not start with '{'", None),
    "invalid_json": ("{not json", b"", "invalid JSON", None),
    "trailing_garbage": ("{}\0\0", b"", "invalid JSON", None),
    "control_char_in_string": (b'{"a\x01":' + E.encode() + b"}", b"xx", "invalid JSON", None),
    "header_length_0": ("", b"", "header length is 0", None),
}

# Unusual but valid: safetensors reads them, so must we.
VALID = {
    "leading_whitespace": (" \n{" + '"a":' + E + "}", b"xx"),
    "trailing_padding": ('{"a":' + E + "}    ", b"xx"),
    "empty": ("{}", b""),
    "metadata_null": ('{"__metadata__":null}', b""),
    "zero_size_tensors": ('{"z":{"dtype":"U8","shape":[0],"data_offsets":[2,2]},"a":' + E + ',"y":{"dtype":"F32","shape":[0,7],"data_offsets":[0,0]}}', b"xx"),
    "scalar": ('{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}', b"xxxx"),
    "brackets_in_strings": ('{"__metadata__":{"r":"' + "[{" * 1000 + '\\"}]\\\\"},"a":' + E + "}", b"xx"),
    "escaped_quote_key": ('{"a\\"[":' + E + "}", b"xx"),
    "surrogate_pair": ('{"\\ud83d\\ude00":' + E + "}", b"xx"),
    "unicode_names": ('{"名前":' + E + ',"__metadata__":{"ключ":"значение"}}', b"xx"),
    "u64_max_dim": ('{"a":{"dtype":"U8","shape":[18446744073709551615,0],"data_offsets":[0,0]}}', b""),
    "metadata_empty": ('{"__metadata__":{},"x":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}', b""),
    "f8_e8m0": ('{"a":{"dtype":"F8_E8M0","shape":[2],"data_offsets":[0,2]}}', b"xx"),
    "c64": ('{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', b"x" * 8),
}

# Where we are deliberately stricter than safetensors (it accepts these): a repeated key silently
# drops a tensor or a metadata value; extra fields and sub-byte dtypes have no place in SDXL files.
STRICTER = {"duplicate_tensor", "duplicate_metadata_key", "extra_field", "f4"}
HOSTILE["f4"] = ('{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}', b"xx", "sub-byte dtype 'F4'", "a")


def _read_in_time(path, seconds: float = 60.0):
    """read_header in a thread: a hang fails the test instead of stalling the suite."""
    out = {}

    def run():
        try:
            out["result"] = read_header(path)
        except BaseException as e:  # noqa: BLE001 - the test inspects whatever came out
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"read_header({path}) did not return within {seconds}s"
    return out


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_is_a_checkpoint_error(tmp_path, case):
    body, data, pattern, key = HOSTILE[case]
    p = _raw(tmp_path / f"{case}.safetensors", body, data)
    out = _read_in_time(p)
    err = out.get("error")
    assert isinstance(err, CheckpointError), f"{case}: expected CheckpointError, got {out}"
    assert err.path == str(p) and str(p) in str(err)
    assert re.search(pattern, str(err)), f"{case}: {err}"
    assert err.key == key
    if key is not None:
        assert repr(key) in str(err)
    str(err).encode("utf-8")  # always printable as UTF-8 (lone surrogates escaped)


@pytest.mark.parametrize("case", sorted(VALID))
def test_unusual_valid_headers(tmp_path, case):
    body, data = VALID[case]
    h = read_header(_raw(tmp_path / f"{case}.safetensors", body, data))
    assert sum(t.nbytes for t in h.tensors.values()) == len(data)


def _safe_open_accepts(path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
            f.metadata()
        return True
    except Exception:  # noqa: BLE001 - any refusal counts
        return False


@pytest.mark.parametrize("case", sorted(HOSTILE) + sorted(VALID))
def test_safe_open_oracle(tmp_path, case):
    """Whatever safetensors refuses we refuse; what it reads we read, except the STRICTER cases."""
    body, data = (HOSTILE[case][:2] if case in HOSTILE else VALID[case])
    p = _raw(tmp_path / f"{case}.safetensors", body, data)
    theirs = _safe_open_accepts(p)
    ours = "result" in _read_in_time(p)
    if not theirs:
        assert not ours, f"{case}: safetensors refuses it, read_header accepted it"
    elif case in STRICTER:
        assert not ours
    else:
        assert ours, f"{case}: safetensors reads it, read_header refused it"


def test_header_length_limit(tmp_path):
    p = tmp_path / "big.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_SIZE + 1))
        f.truncate(8 + MAX_HEADER_SIZE + 1)  # sparse: no 100 MB written
    with pytest.raises(CheckpointError, match="100000000-byte limit") as ei:
        read_header(p)
    assert str(p) in str(ei.value)


def test_nesting_limit_is_exact():
    from mergekit_sdxl.sdxl.header import _check_nesting

    assert _check_nesting(b"{" + b"[" * (MAX_NESTING - 1) + b"]" * (MAX_NESTING - 1) + b"}") is None
    assert _check_nesting(b"{" + b"[" * MAX_NESTING + b"]" * MAX_NESTING + b"}") is not None
    # brackets inside strings (escaped quotes and backslashes included) do not count
    assert _check_nesting(b'{"k":"\\\\\\"' + b"[" * 500 + b'"}') is None


def test_directory_is_a_clear_error(tmp_path):
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    with pytest.raises(CheckpointError, match="is a directory") as ei:
        read_header(d)
    assert str(d) in str(ei.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_does_not_hang(tmp_path):
    f = tmp_path / "pipe.safetensors"
    os.mkfifo(f)
    err = _read_in_time(f, 20).get("error")
    assert isinstance(err, CheckpointError) and "not a regular file" in str(err) and str(f) in str(err)


def test_unreadable_file(tmp_path):
    p = _raw(tmp_path / "locked.safetensors", "{}")
    p.chmod(0)
    try:
        try:
            open(p, "rb").close()
        except PermissionError:
            pass
        else:
            pytest.skip("permissions are not enforced here (running as root?)")
        with pytest.raises(CheckpointError, match="Permission denied") as ei:
            read_header(p)
        assert str(p) in str(ei.value)
    finally:
        p.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_control_characters_in_path_are_escaped(tmp_path):
    p = tmp_path / "evil\x1b[2J\u202e.safetensors"
    _raw(p, "{not json")
    with pytest.raises(CheckpointError) as ei:
        read_header(p)
    s = str(ei.value)
    assert "\x1b" not in s and "\u202e" not in s and "\\x1b[2J\\u202e" in s
    assert ei.value.path == str(p)  # the real path stays available


def test_long_keys_are_cut_short_in_messages(tmp_path):
    name = "k" * 100_000
    p = _raw(tmp_path / "long.safetensors", '{"' + name + '":{"dtype":"X","shape":[0],"data_offsets":[0,0]}}')
    with pytest.raises(CheckpointError) as ei:
        read_header(p)
    assert ei.value.key == name and len(str(ei.value)) < 1000


def test_metadata_values_stay_strings(tmp_path):
    body = '{"__metadata__":{"a":"1","b":"{\\"x\\": [1, 2]}"},"t":' + E + "}"
    h = read_header(_raw(tmp_path / "m.safetensors", body, b"xx"))
    assert h.metadata == {"a": "1", "b": '{"x": [1, 2]}'}
    assert type(h.tensors["t"].shape) is tuple and type(h.tensors["t"].data_offsets) is tuple


def _big_header_file(path, n_tensors: int, meta_bytes: int):
    entries = ",".join(
        f'"model.diffusion_model.block.{i}.weight":{{"dtype":"F16","shape":[0,{i}],"data_offsets":[0,0]}}'
        for i in range(n_tensors)
    )
    body = '{"__metadata__":{"notes":"' + "x" * meta_bytes + '"},' + entries + "}"
    return _raw(path, body)


def test_header_memory_is_not_retained(tmp_path):
    """Reading many files with multi-MB headers in a loop: RSS stays flat (the raw header, the
    decoded text and the parse tree are all gone when read_header returns)."""
    import gc

    import psutil

    files = [_big_header_file(tmp_path / f"h{i}.safetensors", 10_000, 4_000_000) for i in range(20)]
    total = sum(f.stat().st_size for f in files)
    assert total > 20 * 4_500_000
    proc = psutil.Process()
    read_header(files[0])  # warm up the allocator
    gc.collect()
    before = proc.memory_info().rss
    for f in files:
        h = read_header(f)
        assert len(h.tensors) == 10_000
        del h
    gc.collect()
    growth = proc.memory_info().rss - before
    assert growth < total / 4, f"RSS grew {growth / 1e6:.1f} MB over {total / 1e6:.0f} MB of headers"


def test_retained_header_is_compact(tmp_path):
    """What a SafetensorsHeader keeps is small next to the header text (tuples, shared shapes)."""
    import tracemalloc

    p = _big_header_file(tmp_path / "h.safetensors", 20_000, 0)
    size = p.stat().st_size
    read_header(p)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        h = read_header(p)
        kept = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(h.tensors) == 20_000
    assert kept < 4 * size, f"{kept} bytes kept for a {size}-byte header"


def test_a_rewritten_file_is_parsed_again_not_served_from_the_cache(tmp_path):
    """Parsed headers are reused by content: a file rewritten in place (new tensors, new metadata,
    or corrupted) never gets the header it had before."""
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2, 3)}, str(path), metadata={"v": "1"})
    first = read_header(path)
    assert read_header(path) is first  # the same bytes: parsed once
    save_file({"a": torch.zeros(2, 3)}, str(path), metadata={"v": "2"})
    assert read_header(path).metadata == {"v": "2"}
    save_file({"b": torch.zeros(4)}, str(path))
    assert list(read_header(path).tensors) == ["b"]
    raw = path.read_bytes()
    path.write_bytes(raw[:8] + b"[" + raw[9:])  # same size, corrupt JSON
    with pytest.raises(CheckpointError, match="corrupt header"):
        read_header(path)
