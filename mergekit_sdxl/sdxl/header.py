"""Read a safetensors header (8-byte little-endian length + JSON) without torch and without
touching tensor data. Corrupt or truncated files raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, NamedTuple, Optional, Tuple, Union

__all__ = ["CheckpointError", "TensorInfo", "SafetensorsHeader", "read_header", "DTYPE_SIZES"]

PathLike = Union[str, "os.PathLike[str]"]

# bytes per element of each safetensors dtype
DTYPE_SIZES: Dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

# Refuse absurd header lengths before allocating (safetensors itself caps at 100 MB).
MAX_HEADER_SIZE = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt or not what was expected.

    ``path`` names the file, ``key`` (optional) the tensor; ``str(err)`` names both.
    """

    def __init__(self, path: PathLike, message: str, key: Optional[str] = None) -> None:
        self.path = os.fspath(path)
        self.key = key
        self.message = message
        where = f"{self.path}" + (f" [tensor {key!r}]" if key is not None else "")
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # picklable across processes
        return (CheckpointError, (self.path, self.message, self.key))


class TensorInfo(NamedTuple):
    dtype: str
    shape: Tuple[int, ...]
    data_offsets: Tuple[int, int]  # relative to the end of the header (byte 8 + header_size)

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class SafetensorsHeader(NamedTuple):
    tensors: Dict[str, TensorInfo]
    metadata: Dict[str, str]
    header_size: int  # length of the JSON part (excluding the 8-byte length prefix)
    file_size: int

    @property
    def data_start(self) -> int:
        """Absolute file offset where tensor data begins."""
        return 8 + self.header_size

    def absolute_offsets(self, key: str) -> Tuple[int, int]:
        s, e = self.tensors[key].data_offsets
        return (self.data_start + s, self.data_start + e)


def read_header(path: PathLike) -> SafetensorsHeader:
    """Parse and validate the header of a ``.safetensors`` file (reads only the header bytes)."""
    path = os.fspath(path)
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(path, f"truncated: {file_size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > file_size - 8:
                raise CheckpointError(
                    path, f"truncated or not safetensors: header length {n} exceeds file size {file_size}"
                )
            if n > MAX_HEADER_SIZE:
                raise CheckpointError(path, f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from e
    if len(raw) < n:
        raise CheckpointError(path, f"truncated header: read {len(raw)} of {n} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"corrupt header: invalid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise CheckpointError(path, "corrupt header: JSON is not an object")

    metadata_raw = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict):
        raise CheckpointError(path, "corrupt header: __metadata__ is not an object")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata_raw.items()}

    data_size = file_size - 8 - n
    tensors: Dict[str, TensorInfo] = {}
    for key, info in doc.items():
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(path, f"corrupt header entry ({e!r})", key=key) from e
        if start < 0 or end < start:
            raise CheckpointError(path, f"invalid data_offsets [{start}, {end}]", key=key)
        if end > data_size:
            raise CheckpointError(
                path,
                f"truncated: data_offsets end {end} beyond the {data_size} data bytes in the file",
                key=key,
            )
        if any(d < 0 for d in shape):
            raise CheckpointError(path, f"negative dimension in shape {list(shape)}", key=key)
        size = DTYPE_SIZES.get(dtype)
        if size is not None:
            numel = 1
            for d in shape:
                numel *= d
            if numel * size != end - start:
                raise CheckpointError(
                    path,
                    f"data_offsets span {end - start} bytes but {dtype}{list(shape)} needs {numel * size}",
                    key=key,
                )
        tensors[key] = TensorInfo(dtype, shape, (start, end))
    return SafetensorsHeader(tensors, metadata, n, file_size)
