"""Read a safetensors header (8-byte little-endian length + JSON) without torch and without
touching tensor data.

:func:`read_header` is total: any file it cannot vouch for raises :class:`CheckpointError` naming
the file (and the tensor where there is one), never another exception and never a hang. It applies
the rules of safetensors' own reader (``SafeTensors::read_metadata`` / ``Metadata::validate`` in
``safetensors/src/tensor.rs``), so whatever ``safetensors.safe_open`` refuses is refused here too:

* header length <= 100,000,000 and within the file; the header is strict UTF-8 JSON whose first
  non-blank character is ``{``; no ``NaN``/``Infinity`` literals, no lone surrogate escapes;
* ``__metadata__`` (optional, may be ``null``) maps strings to strings;
* every other key is a tensor ``{"dtype", "shape", "data_offsets"}``: a dtype of
  :data:`~mergekit_sdxl.sdxl.dtypes.DTYPE_SIZES`, dims and offsets non-negative JSON integers
  below 2**64, no overflow of the element count, ``end - start`` = elements x dtype size;
* sorted by offset, the tensors tile the data section exactly: contiguous from 0, no overlap, no
  gap, the last one ending at the end of the file.

It is stricter than safetensors where a lenient reading would hide a damaged or forged file: a
duplicated key at any level (safetensors silently keeps the last tensor or metadata value), tensor
entries with extra fields, sub-byte dtypes (F4, F6_*; no SDXL checkpoint uses them) and nesting
deeper than :data:`MAX_NESTING` (checked before parsing, so hostile nesting cannot exhaust the
stack).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import sys
import threading
from collections import OrderedDict
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

from mergekit_sdxl.errors import UserError
from mergekit_sdxl.text import printable

from .dtypes import DTYPE_SIZES, SUBBYTE_DTYPES

__all__ = [
    "CheckpointError",
    "TensorInfo",
    "SafetensorsHeader",
    "read_header",
    "DTYPE_SIZES",
    "MAX_HEADER_SIZE",
    "MAX_NESTING",
]

PathLike = Union[str, "os.PathLike[str]"]

# DTYPE_SIZES (safetensors name -> bytes per element) is re-exported from .dtypes, the one table.

# Refuse absurd header lengths before allocating (safetensors' own limit).
MAX_HEADER_SIZE = 100_000_000

# A valid header nests 3 deep ({name: {shape: [...]}}); anything far deeper is hostile. Checked
# before json.loads, whose recursion would otherwise end in RecursionError.
MAX_NESTING = 64

_U64_MAX = 2**64 - 1
_MAX_INT_DIGITS = len(str(_U64_MAX))  # 20: longer integer literals cannot be valid
_ENTRY_FIELDS = ("data_offsets", "dtype", "shape")
_ENTRY_FIELD_SET = frozenset(_ENTRY_FIELDS)
_MAX_SHOWN = 200  # characters of a file-supplied string quoted in an error message

# Nesting check (on the raw bytes: UTF-8 multi-byte sequences never contain ASCII, so '"', '\\'
# and brackets mean the same as in the decoded text). Escapes go first, then strings; unterminated
# strings run to the end. Every pattern is linear, without backtracking, on any input.
_STRING_BYTES = re.compile(rb'"[^"]*(?:"|\Z)')
_BRACKETS_ONLY = bytes.maketrans(b"{}", b"[]")  # one bracket kind: depth is what matters
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _nested_within(depth: int) -> re.Pattern[bytes]:
    # Balanced brackets at most ``depth`` deep; possessive repeats: no backtracking, linear time.
    p = ""
    for _ in range(depth):
        p = r"(?:\[" + p + r"\])*+"
    return re.compile(p.encode())


_NESTED_OK = _nested_within(MAX_NESTING)
_OBJECT_START = re.compile(r"[ \t\n\r]*\{")  # JSON whitespace, then '{'
_SURROGATE = re.compile("[\ud800-\udfff]")


class CheckpointError(UserError, ValueError):
    """A checkpoint file is unreadable, corrupt or not what was expected.

    ``path`` names the file, ``key`` (optional) the tensor; ``str(err)`` names both (control
    characters in the path shown as escapes, so the message is always safe to print).
    """

    def __init__(self, path: PathLike, message: str, key: Optional[str] = None) -> None:
        self.path = os.fspath(path)
        self.key = key
        self.message = message
        where = printable(self.path) + (f" [tensor {_shown(key)}]" if key is not None else "")
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


def _shown(s: Any) -> str:
    """``repr`` of a file-supplied value, cut short (a forged name can be megabytes long)."""
    r = repr(s)
    return r if len(r) <= _MAX_SHOWN else r[: _MAX_SHOWN - 5] + "...'" + f" ({len(str(s))} chars)"


# --- parse-time helpers ----------------------------------------------------------------------


class _Syntax(ValueError):
    """Raised from inside json.loads by the hooks below."""


class _Duplicate:
    """What an object with a repeated key parses to: the caller reports it with its context."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"{{...duplicate key {_shown(self.key)}...}}"


class _Entry(tuple):
    """A well-shaped tensor entry ``(dtype, shape, data_offsets)`` as tuples: converted while
    parsing so a huge header never holds a dict and two lists per tensor."""

    __slots__ = ()


def _object_hook(pairs: List[Tuple[str, Any]]) -> Any:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                return _Duplicate(k)
            seen.add(k)
    if len(d) == 3 and d.keys() == _ENTRY_FIELD_SET:
        dtype, shape, offsets = d["dtype"], d["shape"], d["data_offsets"]
        if type(dtype) is str and type(shape) is list and type(offsets) is list:
            return _Entry((dtype, tuple(shape), tuple(offsets)))
    return d


def _parse_constant(literal: str) -> Any:
    raise _Syntax(f"{literal} is not valid JSON (no NaN/Infinity literals in a safetensors header)")


def _parse_int(literal: str) -> int:
    # Nothing valid has more than 20 digits; a longer literal would cost int() quadratic time (or a
    # ValueError past sys.get_int_max_str_digits()).
    if len(literal) > _MAX_INT_DIGITS + 1:  # + 1: a minus sign
        raise _Syntax(f"integer literal with {len(literal.lstrip('-'))} digits (at most {_MAX_INT_DIGITS} fit in 64 bits)")
    return int(literal)


def _check_nesting(raw: bytes) -> Optional[str]:
    """Why the brackets outside strings are unusable (unbalanced or too deep), or None."""
    skeleton = raw.replace(b"\\\\", b"").replace(b'\\"', b"")  # left to right, as JSON reads escapes
    skeleton = _STRING_BYTES.sub(b"", skeleton).translate(_BRACKETS_ONLY, _NOT_BRACKETS)
    if _NESTED_OK.fullmatch(skeleton):
        return None
    return f"invalid JSON: unbalanced brackets or nested more than {MAX_NESTING} levels deep"


# --- validation ------------------------------------------------------------------------------


def _is_count(x: Any) -> bool:
    """A JSON integer that fits safetensors' usize: not a bool, not a float, 0 <= x < 2**64."""
    return type(x) is int and 0 <= x <= _U64_MAX


def _kind(x: Any) -> str:
    if isinstance(x, (dict, _Entry)):
        return "an object"
    if isinstance(x, _Duplicate):
        return f"an object with a duplicate key {_shown(x.key)}"
    return {list: "an array", tuple: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(x), type(x).__name__)


def _dict_entry_error(info: Dict[str, Any]) -> str:
    """What is wrong with a tensor entry the parse hook did not accept as well-shaped."""
    missing = [f for f in _ENTRY_FIELDS if f not in info]
    if missing:
        return f"corrupt header entry: missing field(s) {', '.join(map(repr, missing))}"
    extra = sorted(k for k in info if k not in _ENTRY_FIELD_SET)
    if extra:
        return f"corrupt header entry: unexpected field(s) {', '.join(_shown(k) for k in extra[:5])}"
    for f, want in (("dtype", "a string"), ("shape", "an array"), ("data_offsets", "an array")):
        v = info[f]
        if _kind(v) != want:
            return f"corrupt header entry: {f} is {_kind(v)}, expected {want}"
    return "corrupt header entry"


def _check_strings(path: str, doc: Dict[str, Any], metadata: Dict[str, str]) -> None:
    """Refuse lone surrogates (``"\\ud800"``): json.loads lets them through, safetensors does not,
    and such a str cannot be printed or written back as UTF-8."""
    for name in doc:
        if _SURROGATE.search(name):
            raise CheckpointError(path, "tensor name is not valid Unicode (lone surrogate escape)", key=name)
    for k, v in metadata.items():
        if _SURROGATE.search(k) or _SURROGATE.search(v):
            raise CheckpointError(path, f"__metadata__ entry {_shown(k)} is not valid Unicode (lone surrogate escape)")


def _metadata(path: str, raw: Any) -> Dict[str, str]:
    if raw is None:  # safetensors: Option<HashMap<String, String>>
        return {}
    if isinstance(raw, _Duplicate):
        raise CheckpointError(path, f"corrupt header: duplicate __metadata__ key {_shown(raw.key)}")
    if type(raw) is not dict:
        raise CheckpointError(path, f"corrupt header: __metadata__ is {_kind(raw)}, not an object of strings")
    for k, v in raw.items():
        if type(v) is not str:
            raise CheckpointError(path, f"corrupt header: __metadata__ value of {_shown(k)} is {_kind(v)}, not a string")
    return raw


def _tensor_info(
    path: str, name: str, info: Any, data_size: int, shapes: Dict[Tuple[int, ...], Tuple[int, ...]]
) -> TensorInfo:
    if isinstance(info, _Duplicate):
        raise CheckpointError(path, f"corrupt header entry: duplicate field {_shown(info.key)}", key=name)
    if type(info) is dict:
        raise CheckpointError(path, _dict_entry_error(info), key=name)
    if not isinstance(info, _Entry):
        raise CheckpointError(path, f"corrupt header entry: {_kind(info)}, expected an object", key=name)
    dtype, shape, offsets = info
    size = DTYPE_SIZES.get(dtype)
    if size is None:
        if dtype in SUBBYTE_DTYPES:
            raise CheckpointError(path, f"unsupported sub-byte dtype {dtype!r}", key=name)
        raise CheckpointError(
            path, f"unknown dtype {_shown(dtype)} (expected one of {', '.join(DTYPE_SIZES)})", key=name
        )
    numel = 1
    for d in shape:
        if not _is_count(d):
            raise CheckpointError(
                path, f"invalid shape: dimension {_shown(d)} is not a non-negative 64-bit integer", key=name
            )
        numel *= d
        if numel > _U64_MAX:  # checked per step, like safetensors' checked_mul
            raise CheckpointError(path, f"shape {_shown(list(shape))} overflows 64 bits", key=name)
    if len(offsets) != 2 or not (_is_count(offsets[0]) and _is_count(offsets[1])):
        raise CheckpointError(
            path, f"invalid data_offsets {_shown(list(offsets))}: expected [start, end], non-negative integers", key=name
        )
    start, end = offsets
    if end < start:
        raise CheckpointError(path, f"invalid data_offsets [{start}, {end}]: end before start", key=name)
    nbytes = numel * size
    if nbytes * 8 > _U64_MAX:  # safetensors counts bits
        raise CheckpointError(path, f"{dtype}{_shown(list(shape))} overflows 64 bits", key=name)
    if end > data_size:
        raise CheckpointError(
            path, f"truncated: data_offsets end {end} beyond the {data_size} data bytes in the file", key=name
        )
    if nbytes != end - start:
        raise CheckpointError(
            path, f"data_offsets span {end - start} bytes but {dtype}{_shown(list(shape))} needs {nbytes}", key=name
        )
    # One tuple per distinct shape (a checkpoint repeats a few dozen shapes thousands of times).
    return TensorInfo(sys.intern(dtype), shapes.setdefault(shape, shape), offsets)


def _check_layout(path: str, tensors: Dict[str, TensorInfo], data_size: int) -> None:
    """Sorted by offsets, the tensors must tile [0, data_size) exactly (safetensors' validate)."""
    expected = 0
    prev: Optional[str] = None
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1].data_offsets):
        start, end = info.data_offsets
        if start < expected:
            raise CheckpointError(
                path, f"data_offsets [{start}, {end}] overlap tensor {_shown(prev)} (which ends at {expected})", key=name
            )
        if start > expected:
            raise CheckpointError(
                path, f"data_offsets [{start}, {end}] leave a gap of {start - expected} bytes before this tensor", key=name
            )
        expected, prev = end, name
    if expected != data_size:
        raise CheckpointError(
            path,
            f"tensor data covers {expected} of the {data_size} data bytes ({data_size - expected} bytes unaccounted for)",
        )


# --- reading ---------------------------------------------------------------------------------


def _read_prefix_and_header(path: str) -> Tuple[bytes, int]:
    """(header bytes, file size) of a regular file; CheckpointError for anything else."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise CheckpointError(path, "file not found") from e
    except IsADirectoryError as e:
        raise CheckpointError(path, "is a directory, not a .safetensors file") from e
    except OSError as e:
        raise CheckpointError(path, f"cannot open: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise CheckpointError(path, "is a directory, not a .safetensors file")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(path, "not a regular file (FIFO, socket or device)")
        file_size = st.st_size
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            prefix = _read_exact(f, 8)
            if len(prefix) < 8:
                raise CheckpointError(path, f"truncated: {file_size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n == 0:
                raise CheckpointError(path, "corrupt header: header length is 0")
            if n > file_size - 8:
                raise CheckpointError(
                    path, f"truncated or not safetensors: header length {n} exceeds file size {file_size}"
                )
            if n > MAX_HEADER_SIZE:
                raise CheckpointError(path, f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit")
            raw = _read_exact(f, n)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if len(raw) < n:
        raise CheckpointError(path, f"truncated header: read {len(raw)} of {n} bytes")
    return raw, file_size


def _read_exact(f: Any, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at end of file (a raw read may return short)."""
    data = f.read(n)
    if data is None or len(data) == n or not data:
        return data or b""
    parts = [data]
    got = len(data)
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_header(path: PathLike) -> SafetensorsHeader:
    """Parse and validate the header of a ``.safetensors`` file (reads only the header bytes).

    Raises :class:`CheckpointError` for every problem (see the module docstring). The result holds
    only the compact per-tensor tuples and the metadata strings: neither the raw header nor the
    parsed JSON outlives the call.
    """
    path = os.fspath(path)
    raw, file_size = _read_prefix_and_header(path)
    # The parse is a pure function of the header bytes and the file size, and a merge reads each
    # input's header several times (preflight, planning, loading): parse each distinct header once.
    key = (file_size, hashlib.blake2b(raw, digest_size=16).digest())
    with _PARSED_LOCK:
        cached = _PARSED.get(key)
        if cached is not None:
            _PARSED.move_to_end(key)
            return cached
    n = len(raw)
    problem = _check_nesting(raw)
    if problem is not None:
        raise CheckpointError(path, f"corrupt header: {problem}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f"corrupt header: not valid UTF-8 (byte {e.start})") from None
    del raw  # only one copy of a large header at a time
    if not _OBJECT_START.match(text):
        raise CheckpointError(path, "corrupt header: does not start with '{' (not a JSON object)")
    has_escapes = "\\u" in text  # lone surrogates can only come from \u escapes
    try:
        doc = json.loads(text, object_pairs_hook=_object_hook, parse_constant=_parse_constant, parse_int=_parse_int)
    except _Syntax as e:
        raise CheckpointError(path, f"corrupt header: {e}") from None
    except RecursionError:  # backstop; _check_nesting should have refused first
        raise CheckpointError(path, "corrupt header: nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError and anything the decoder raises for bad input
        raise CheckpointError(path, f"corrupt header: invalid JSON ({e})") from None
    del text

    if isinstance(doc, _Duplicate):
        what = "__metadata__ object" if doc.key == "__metadata__" else f"tensor name {_shown(doc.key)}"
        raise CheckpointError(path, f"corrupt header: duplicate {what}")
    if isinstance(doc, _Entry) or type(doc) is not dict:
        raise CheckpointError(path, "corrupt header: JSON is not an object of tensor entries")
    metadata = _metadata(path, doc.pop("__metadata__", None))
    if has_escapes:
        _check_strings(path, doc, metadata)

    data_size = file_size - 8 - n
    tensors: Dict[str, TensorInfo] = {}
    shapes: Dict[Tuple[int, ...], Tuple[int, ...]] = {}
    for name, info in doc.items():
        tensors[name] = _tensor_info(path, name, info, data_size, shapes)
    del doc  # the parse tree: only the TensorInfo tuples stay
    _check_layout(path, tensors, data_size)
    parsed = SafetensorsHeader(tensors, metadata, n, file_size)
    with _PARSED_LOCK:
        _PARSED[key] = parsed
        if len(_PARSED) > _PARSED_MAX:
            _PARSED.popitem(last=False)
    return parsed


# Parsed headers by (file size, digest of the header bytes); callers never mutate a header.
_PARSED: OrderedDict[Tuple[int, bytes], SafetensorsHeader] = OrderedDict()
_PARSED_MAX = 256
_PARSED_LOCK = threading.Lock()
