"""Counter-based DROP masks: a pure function of (seed, tensor name, model key, element index).

Element ``i`` of a flattened tensor is kept iff ``u < keep_prob`` where ``u`` is the top 53 bits
of ``splitmix64(key + i * GAMMA)`` scaled to [0, 1), and ``key`` mixes the seed with
blake2b hashes of the tensor name and the model key. No generator state is involved, so the
mask does not depend on chunking, thread count, device or the order in which keys run.

torch has no general uint64 arithmetic, so the mixing runs on int64: multiplication wraps
modulo 2^64 (two's complement) identically on CPU and CUDA, and logical right shifts are
arithmetic shifts with the sign-extended high bits masked off.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

import torch

__all__ = [
    "keep_mask",
    "keep_masks",
    "uniform_bits",
    "uniform_bits_at",
    "stable_hash",
    "mask_key",
    "splitmix64_int",
    "U_BITS",
]

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
U_BITS = 53  # bits of u: float64-exact uniform on a 2^-53 grid
_INT64_MIN = -(1 << 63)
# keep_masks hashes this many elements (all rows together) per pass of its ~13 int64 ops, so the
# working set stays in cache instead of streaming [N, count] int64 through memory 13 times.
_HASH_BLOCK = 1 << 17


def _signed(x: int) -> int:
    """Reinterpret an unsigned 64-bit integer as int64."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def splitmix64_int(x: int) -> int:
    """splitmix64 finaliser on Python ints (the reference for the tensor version)."""
    z = x & _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def stable_hash(text: str) -> int:
    """64-bit unsigned hash of a string, stable across processes (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def mask_key(seed: int, tensor_name: str, model_key: str) -> int:
    """Unsigned 64-bit stream key for one (seed, tensor, model)."""
    k = splitmix64_int(seed & _MASK64)
    k = splitmix64_int(k ^ stable_hash(tensor_name))
    return splitmix64_int(k ^ stable_hash(model_key))


def _xor_srl_(z: torch.Tensor, s: int, tmp: torch.Tensor) -> None:
    """In place: z ^= z >>> s (logical shift of int64 viewed as uint64)."""
    torch.bitwise_right_shift(z, s, out=tmp)
    tmp.bitwise_and_((1 << (64 - s)) - 1)
    z.bitwise_xor_(tmp)


def keep_mask(
    seed: int,
    tensor_name: str,
    model_key: str,
    start: int,
    count: int,
    keep_prob: float,
    device: Optional[torch.device | str] = None,
) -> torch.Tensor:
    """Bool mask [count]: keep flags for flattened elements ``start .. start+count-1``.

    Each element is kept with probability ``keep_prob`` (1 -> all kept, 0 -> none).
    """
    if not 0.0 <= keep_prob <= 1.0 or math.isnan(keep_prob):
        raise ValueError(f"keep_prob must be in [0, 1], got {keep_prob}")
    if start < 0 or count < 0:
        raise ValueError("start and count must be >= 0")
    if keep_prob >= 1.0:
        return torch.ones(count, dtype=torch.bool, device=device)
    if keep_prob <= 0.0:
        return torch.zeros(count, dtype=torch.bool, device=device)
    # u < p  <=>  top53 < p * 2^53  <=>  top53 < ceil(p * 2^53): an exact integer compare,
    # so no float64 is needed on the device.
    threshold = math.ceil(keep_prob * (1 << U_BITS))
    key = mask_key(seed, tensor_name, model_key)
    z = torch.arange(start, start + count, dtype=torch.int64, device=device)
    tmp = torch.empty_like(z)
    # In-place ops with one scratch buffer: fresh 8-byte-per-element temporaries cost
    # more than the arithmetic.
    z.mul_(_signed(_GAMMA)).add_(_signed(key))
    _xor_srl_(z, 30, tmp)
    z.mul_(_signed(_M1))
    _xor_srl_(z, 27, tmp)
    z.mul_(_signed(_M2))
    _xor_srl_(z, 31, tmp)
    torch.bitwise_right_shift(z, 64 - U_BITS, out=tmp)
    tmp.bitwise_and_((1 << U_BITS) - 1)
    return tmp < threshold


def _check_keep_prob(keep_prob: float) -> None:
    if not 0.0 <= keep_prob <= 1.0 or math.isnan(keep_prob):
        raise ValueError(f"keep_prob must be in [0, 1], got {keep_prob}")


def keep_masks(
    seed: int,
    tensor_name: str,
    model_keys: Sequence[str],
    start: int,
    count: int,
    keep_probs: Sequence[float],
    device: Optional[torch.device | str] = None,
) -> torch.Tensor:
    """Bool [N, count]: row j is ``keep_mask(seed, tensor_name, model_keys[j], start, count,
    keep_probs[j], device)``, bit for bit, computed for all N models at once.

    The per-model stream keys form an int64 column broadcast against the element-index row, so
    every element goes through exactly the same integer operations as in :func:`keep_mask`.
    """
    n = len(model_keys)
    if len(keep_probs) != n:
        raise ValueError(f"{n} model keys but {len(keep_probs)} keep probabilities")
    for p in keep_probs:
        _check_keep_prob(p)
    if start < 0 or count < 0:
        raise ValueError("start and count must be >= 0")
    out = torch.empty(n, count, dtype=torch.bool, device=device)
    hashed = []
    for j, p in enumerate(keep_probs):
        if p >= 1.0:
            out[j].fill_(True)
        elif p <= 0.0:
            out[j].fill_(False)
        else:
            hashed.append(j)
    if not hashed or count == 0:
        return out
    m = len(hashed)
    keys = torch.tensor(
        [_signed(mask_key(seed, tensor_name, model_keys[j])) for j in hashed], dtype=torch.int64, device=device
    )[:, None]
    # top53 < ceil(p 2^53)  <=>  z < ceil(p 2^53) 2^11 as unsigned 64-bit integers (ceil(p 2^53) < 2^53
    # here, so no overflow); unsigned order = signed order after flipping the sign bit.
    limits = torch.tensor(
        [(math.ceil(keep_probs[j] * (1 << U_BITS)) << (64 - U_BITS)) + _INT64_MIN for j in hashed],
        dtype=torch.int64,
        device=device,
    )[:, None]
    dst = out if m == n else torch.empty(m, count, dtype=torch.bool, device=device)
    step = max(1, _HASH_BLOCK // m) if device is None or torch.device(device).type == "cpu" else count
    width = min(step, count)
    zbuf = torch.empty(m, width, dtype=torch.int64, device=device)
    tbuf = torch.empty_like(zbuf)
    for c0 in range(0, count, step):
        c1 = min(count, c0 + step)
        z = zbuf[:, : c1 - c0]
        tmp = tbuf[:, : c1 - c0]
        idx = torch.arange(start + c0, start + c1, dtype=torch.int64, device=device).mul_(_signed(_GAMMA))
        torch.add(idx, keys, out=z)
        _xor_srl_(z, 30, tmp)
        z.mul_(_signed(_M1))
        _xor_srl_(z, 27, tmp)
        z.mul_(_signed(_M2))
        _xor_srl_(z, 31, tmp)
        z.bitwise_xor_(_INT64_MIN)
        torch.lt(z, limits, out=dst[:, c0:c1])
    if dst is not out:
        out[hashed] = dst
    return out


def _top_bits_(z: torch.Tensor, key: int, tmp: torch.Tensor) -> torch.Tensor:
    """In place: element indices ``z`` (int64) -> the top :data:`U_BITS` bits of their hash
    under stream ``key``, exactly the bits :func:`keep_mask` compares."""
    z.mul_(_signed(_GAMMA)).add_(_signed(key))
    _xor_srl_(z, 30, tmp)
    z.mul_(_signed(_M1))
    _xor_srl_(z, 27, tmp)
    z.mul_(_signed(_M2))
    _xor_srl_(z, 31, tmp)
    torch.bitwise_right_shift(z, 64 - U_BITS, out=tmp)
    tmp.bitwise_and_((1 << U_BITS) - 1)
    z.copy_(tmp)
    return z


def uniform_bits(
    seed: int, tensor_name: str, model_key: str, start: int, count: int, device: Optional[torch.device | str] = None
) -> torch.Tensor:
    """int64 [count]: the draws ``u * 2^53`` of elements ``start .. start+count-1`` (``u`` uniform
    on [0, 1)), the very numbers :func:`keep_mask` compares: it keeps an element iff
    ``uniform_bits * 2^-53 < keep_prob``. For keep probabilities that differ per element (DELLA)."""
    if start < 0 or count < 0:
        raise ValueError("start and count must be >= 0")
    z = torch.arange(start, start + count, dtype=torch.int64, device=device)
    return _top_bits_(z, mask_key(seed, tensor_name, model_key), torch.empty_like(z))


def uniform_bits_at(seed: int, tensor_name: str, model_key: str, index: torch.Tensor) -> torch.Tensor:
    """:func:`uniform_bits` of arbitrary element indices (int64 tensor, any order, on its device)."""
    z = index.to(torch.int64).clone()
    if z.numel() and bool((z < 0).any()):
        raise ValueError("element indices must be >= 0")
    return _top_bits_(z, mask_key(seed, tensor_name, model_key), torch.empty_like(z))
