"""The one dtype table of the package: safetensors dtype names, their sizes and torch equivalents.

Every other module asks this one: the header reader (which names are valid, bytes per element),
detection (which dtypes are floating point), the writer and the loader (name <-> ``torch.dtype``),
preflight (what this torch can read, bytes of a compute dtype).

Importing it is torch-free, so :mod:`mergekit_sdxl.sdxl.header` stays torch-free: only
:func:`torch_dtype`, :func:`safetensors_name`, :func:`torch_dtypes` and :data:`READABLE` import
torch, on first use.
"""

from __future__ import annotations

from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Dict, FrozenSet, Literal, Mapping, NamedTuple, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is imported lazily
    import torch

__all__ = [
    "DtypeKind",
    "DtypeInfo",
    "DTYPES",
    "DTYPE_SIZES",
    "FLOAT_DTYPE_NAMES",
    "SUBBYTE_DTYPES",
    "COMPUTE_DTYPES",
    "COMPUTE_DTYPE_BYTES",
    "READABLE",
    "dtype_size",
    "dtype_kind",
    "is_float",
    "torch_dtype_name",
    "torch_name_size",
    "torch_dtype",
    "torch_dtypes",
    "safetensors_name",
]

DtypeKind = Literal["float", "int", "uint", "bool", "complex"]


class DtypeInfo(NamedTuple):
    """One safetensors dtype: bytes per element, kind, and the ``torch`` attribute naming it."""

    size: int
    kind: DtypeKind
    torch_name: str


# Names as in safetensors' ``Dtype`` enum, torch names as safetensors.torch maps them
# (F8_E4M3 is torch's ``float8_e4m3fn``, F8_E8M0 its ``float8_e8m0fnu``). Sub-byte F4/F6_* are left
# out: their elements do not fill a byte, and no SDXL checkpoint uses them.
DTYPES: Mapping[str, DtypeInfo] = MappingProxyType(
    {
        "BOOL": DtypeInfo(1, "bool", "bool"),
        "U8": DtypeInfo(1, "uint", "uint8"),
        "I8": DtypeInfo(1, "int", "int8"),
        "F8_E4M3": DtypeInfo(1, "float", "float8_e4m3fn"),
        "F8_E5M2": DtypeInfo(1, "float", "float8_e5m2"),
        "F8_E8M0": DtypeInfo(1, "float", "float8_e8m0fnu"),
        "F8_E4M3FNUZ": DtypeInfo(1, "float", "float8_e4m3fnuz"),
        "F8_E5M2FNUZ": DtypeInfo(1, "float", "float8_e5m2fnuz"),
        "I16": DtypeInfo(2, "int", "int16"),
        "U16": DtypeInfo(2, "uint", "uint16"),
        "F16": DtypeInfo(2, "float", "float16"),
        "BF16": DtypeInfo(2, "float", "bfloat16"),
        "I32": DtypeInfo(4, "int", "int32"),
        "U32": DtypeInfo(4, "uint", "uint32"),
        "F32": DtypeInfo(4, "float", "float32"),
        "I64": DtypeInfo(8, "int", "int64"),
        "U64": DtypeInfo(8, "uint", "uint64"),
        "F64": DtypeInfo(8, "float", "float64"),
        "C64": DtypeInfo(8, "complex", "complex64"),
    }
)

# Bytes per element by safetensors name (what the header reader validates offsets with).
DTYPE_SIZES: Mapping[str, int] = MappingProxyType({name: info.size for name, info in DTYPES.items()})

FLOAT_DTYPE_NAMES: FrozenSet[str] = frozenset(name for name, info in DTYPES.items() if info.kind == "float")

# Names safetensors knows but this package refuses (only to word the header reader's error).
SUBBYTE_DTYPES: FrozenSet[str] = frozenset({"F4", "F6_E2M3", "F6_E3M2"})

_TORCH_NAME_SIZES: Dict[str, int] = {info.torch_name: info.size for info in DTYPES.values()}

# The dtypes a merge may compute in or write (mergekit names), widest first.
COMPUTE_DTYPES: Tuple[str, ...] = ("float64", "float32", "bfloat16", "float16")
COMPUTE_DTYPE_BYTES: Mapping[str, int] = MappingProxyType({n: _TORCH_NAME_SIZES[n] for n in COMPUTE_DTYPES})


def dtype_size(name: str) -> Optional[int]:
    """Bytes per element of a safetensors dtype (``"F16"`` -> 2), None for a name not in the table."""
    info = DTYPES.get(name)
    return info.size if info is not None else None


def dtype_kind(name: str) -> Optional[DtypeKind]:
    """``"float" | "int" | "uint" | "bool" | "complex"`` of a safetensors dtype, None if unknown."""
    info = DTYPES.get(name)
    return info.kind if info is not None else None


def is_float(name: str) -> bool:
    """True for the real floating-point safetensors dtypes (F8_*, F16, BF16, F32, F64; not C64)."""
    return name in FLOAT_DTYPE_NAMES


def torch_dtype_name(name: str) -> str:
    """The torch attribute name of a safetensors dtype, without importing torch: ``"F16"`` ->
    ``"float16"``. A name outside the table is returned lower-cased (it is only ever displayed)."""
    info = DTYPES.get(name)
    return info.torch_name if info is not None else name.lower()


def torch_name_size(torch_name: str) -> Optional[int]:
    """Bytes per element of a dtype given by its torch name (``"float64"`` -> 8), None if unknown."""
    return _TORCH_NAME_SIZES.get(torch_name)


@lru_cache(maxsize=1)
def _torch_tables() -> Tuple[Mapping[str, torch.dtype], Mapping[torch.dtype, str]]:
    # Built once, on first use; the float8/uint16+ dtypes exist only in newer torch releases.
    import torch

    by_name = {name: getattr(torch, info.torch_name) for name, info in DTYPES.items() if hasattr(torch, info.torch_name)}
    by_torch = {dt: name for name, dt in by_name.items()}
    return MappingProxyType(by_name), MappingProxyType(by_torch)


def torch_dtype(name: str) -> Optional[torch.dtype]:
    """The ``torch.dtype`` of a safetensors dtype name, or None (unknown name, or this torch lacks it)."""
    return _torch_tables()[0].get(name)


def torch_dtypes() -> Dict[str, torch.dtype]:
    """Safetensors name -> ``torch.dtype`` of every dtype this package loads and writes with this
    torch (a new dict, table order): all of the table that torch has, less complex C64 (nothing
    here handles complex tensors; a merge casts to a real float and would drop the imaginary part).
    """
    return {name: dt for name, dt in _torch_tables()[0].items() if DTYPES[name].kind != "complex"}


def safetensors_name(dtype: torch.dtype) -> str:
    """The safetensors name of a ``torch.dtype`` (``torch.float16`` -> ``"F16"``).

    Raises ValueError for a dtype safetensors cannot store (``torch.complex128``, ``torch.quint8``).
    """
    name = _torch_tables()[1].get(dtype)
    if name is None:
        raise ValueError(f"dtype {dtype} has no safetensors equivalent")
    return name


@lru_cache(maxsize=1)
def _readable() -> FrozenSet[str]:
    return frozenset(torch_dtypes())


def __getattr__(attr: str):
    # READABLE needs torch; computed on first access so that importing this module stays torch-free.
    if attr == "READABLE":
        return _readable()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


if TYPE_CHECKING:  # pragma: no cover
    READABLE: FrozenSet[str]  # the names of torch_dtypes(): what the loader can read (see __getattr__)
