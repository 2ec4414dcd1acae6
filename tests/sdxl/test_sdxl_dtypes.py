"""The dtype table (sdxl/dtypes.py): sizes, kinds, torch mapping, and agreement with its users."""

import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from mergekit_sdxl.io import writer
from mergekit_sdxl.sdxl import dtypes
from mergekit_sdxl.sdxl.header import DTYPE_SIZES, CheckpointError, read_header

NAMES = list(dtypes.DTYPES)


def _header_file(path, dtype: str, numel: int, nbytes: int):
    """A one-tensor safetensors file written by hand (any dtype name, torch not involved)."""
    head = json.dumps({"t": {"dtype": dtype, "shape": [numel], "data_offsets": [0, nbytes]}}).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * nbytes)
    return path


def test_header_reexports_the_table():
    assert DTYPE_SIZES is dtypes.DTYPE_SIZES
    assert set(DTYPE_SIZES) == set(dtypes.DTYPES)


@pytest.mark.parametrize("name", NAMES)
def test_every_accepted_dtype_has_a_size(tmp_path, name):
    size = dtypes.dtype_size(name)
    assert size in (1, 2, 4, 8)
    h = read_header(_header_file(tmp_path / "x.safetensors", name, 3, 3 * size))
    assert h.tensors["t"].dtype == name and h.tensors["t"].nbytes == 3 * size
    # the header reader checks offsets with exactly that size
    with pytest.raises(CheckpointError, match="needs"):
        read_header(_header_file(tmp_path / "y.safetensors", name, 3, 3 * size + 1))


@pytest.mark.parametrize("name", sorted(dtypes.SUBBYTE_DTYPES) + ["F128", "float16", ""])
def test_unknown_and_subbyte_dtypes_are_refused(tmp_path, name):
    assert dtypes.dtype_size(name) is None and dtypes.dtype_kind(name) is None
    assert not dtypes.is_float(name) and dtypes.torch_dtype(name) is None
    with pytest.raises(CheckpointError, match="dtype"):
        read_header(_header_file(tmp_path / "x.safetensors", name, 1, 1))


@pytest.mark.parametrize("name", NAMES)
def test_torch_mapping_round_trips_and_sizes_agree(name):
    info = dtypes.DTYPES[name]
    dt = dtypes.torch_dtype(name)
    if dt is None:
        assert not hasattr(torch, info.torch_name) and name not in dtypes.READABLE
        pytest.skip(f"torch {torch.__version__} has no {info.torch_name}")
    assert dt is getattr(torch, info.torch_name)
    assert (name in dtypes.READABLE) == (info.kind != "complex")  # nothing here handles complex
    assert dtypes.safetensors_name(dt) == name
    assert dt.itemsize == info.size == dtypes.torch_name_size(info.torch_name)
    assert dt.is_floating_point == dtypes.is_float(name) == (info.kind == "float")
    assert dt.is_complex == (info.kind == "complex")
    assert dtypes.torch_dtype_name(name) == info.torch_name == str(dt).removeprefix("torch.")


@pytest.mark.parametrize("name", NAMES)
def test_names_agree_with_safetensors(tmp_path, name):
    """What safetensors writes for a torch dtype is the name the table gives it."""
    dt = dtypes.torch_dtype(name)
    if dt is None:
        pytest.skip(f"torch {torch.__version__} has no {dtypes.DTYPES[name].torch_name}")
    path = tmp_path / "x.safetensors"
    try:
        save_file({"t": torch.zeros(3, dtype=dt)}, str(path))
    except Exception as e:  # noqa: BLE001 - an older safetensors may not know every dtype
        pytest.skip(f"this safetensors cannot write {dt}: {e}")
    info = read_header(path).tensors["t"]
    assert info.dtype == name and info.nbytes == 3 * dtypes.dtype_size(name)


def test_safetensors_name_refuses_unstorable_dtypes():
    for dt in (torch.complex128, torch.quint8):
        with pytest.raises(ValueError, match="no safetensors equivalent"):
            dtypes.safetensors_name(dt)


def test_float_and_compute_facts():
    assert dtypes.FLOAT_DTYPE_NAMES == {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F16", "BF16", "F32", "F64"}
    assert not dtypes.is_float("C64") and not dtypes.is_float("I64") and not dtypes.is_float("BOOL")
    assert dict(dtypes.COMPUTE_DTYPE_BYTES) == {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
    for n, size in dtypes.COMPUTE_DTYPE_BYTES.items():
        assert getattr(torch, n).itemsize == size
    assert dtypes.torch_dtype_name("F8_E4M3") == "float8_e4m3fn" and dtypes.torch_dtype_name("X9") == "x9"
    assert dtypes.torch_name_size("float8_e8m0fnu") == 1 and dtypes.torch_name_size("float128") is None


def test_writer_tables_are_derived():
    assert writer.TORCH_DTYPES == dtypes.torch_dtypes()
    assert set(writer.TORCH_DTYPES) == dtypes.READABLE and "C64" not in dtypes.READABLE
    assert writer.DTYPE_NAMES == {dt: n for n, dt in writer.TORCH_DTYPES.items()}
    for n in ("F16", "BF16", "F32", "F64", "I64", "U8", "BOOL", "F8_E4M3", "F8_E5M2"):
        assert n in writer.TORCH_DTYPES


@pytest.mark.slow
def test_import_is_torch_free():
    """header.py (and the table it uses) must be importable without torch."""
    code = (
        "import sys; import mergekit_sdxl.sdxl.header, mergekit_sdxl.sdxl.dtypes as d, "
        "mergekit_sdxl.sdxl.families, mergekit_sdxl.sdxl.merge_metadata, mergekit_sdxl.sdxl.manifest; "
        "assert d.dtype_size('F16') == 2 and d.is_float('BF16'); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
