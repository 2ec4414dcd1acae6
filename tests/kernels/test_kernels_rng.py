"""DROP masks: a pure function of (seed, tensor name, model key, element index)."""

import math

import pytest
import torch

from mergekit_sdxl.kernels.rng import keep_mask, keep_masks, mask_key, splitmix64_int, stable_hash

GAMMA = 0x9E3779B97F4A7C15


def reference_mask(seed, name, key, start, count, p):
    """Python big-int reference: proves the int64 torch mixing wraps exactly like uint64."""
    k = mask_key(seed, name, key)
    thr = math.ceil(p * 2**53)
    return torch.tensor([(splitmix64_int(k + i * GAMMA) >> 11) < thr for i in range(start, start + count)])


@pytest.mark.parametrize("start", [0, 12345, 2**40 + 7])
def test_matches_python_uint64_reference(start):
    got = keep_mask(240603, "model.diffusion_model.out.2.weight", "models/a.safetensors", start, 2000, 0.9)
    assert torch.equal(got, reference_mask(240603, "model.diffusion_model.out.2.weight", "models/a.safetensors", start, 2000, 0.9))


def test_stable_hash_is_blake2b_and_process_independent():
    # A fixed value: Python's hash() is salted per process, this must not be.
    assert stable_hash("abc") == int.from_bytes(__import__("hashlib").blake2b(b"abc", digest_size=8).digest(), "little")
    assert stable_hash("abc") != stable_hash("abd")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.999])
def test_fraction_kept(p):
    n = 1_000_000
    frac = keep_mask(7, "t", "m", 0, n, p).double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_extremes():
    assert keep_mask(1, "t", "m", 5, 1000, 1.0).all()
    assert not keep_mask(1, "t", "m", 5, 1000, 0.0).any()
    assert keep_mask(1, "t", "m", 5, 0, 0.5).shape == (0,)
    with pytest.raises(ValueError):
        keep_mask(1, "t", "m", 0, 10, 1.5)


def test_chunk_independent_and_deterministic():
    whole = keep_mask(3, "t", "m", 0, 100_000, 0.7)
    assert torch.equal(whole, keep_mask(3, "t", "m", 0, 100_000, 0.7))
    parts = [keep_mask(3, "t", "m", s, c, 0.7) for s, c in [(0, 10), (10, 33_333), (33_343, 66_657)]]
    assert torch.equal(whole, torch.cat(parts))
    assert torch.equal(keep_mask(3, "t", "m", 0, 10, 0.7), torch.cat([keep_mask(3, "t", "m", 0, 5, 0.7), keep_mask(3, "t", "m", 5, 5, 0.7)]))


def test_thread_count_independent():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = keep_mask(9, "t", "m", 0, 300_000, 0.9)
        torch.set_num_threads(max(2, old))
        many = keep_mask(9, "t", "m", 0, 300_000, 0.9)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, many)


def test_streams_differ_and_are_uncorrelated():
    n = 200_000
    base = keep_mask(1, "t", "m", 0, n, 0.5)
    for other in (keep_mask(2, "t", "m", 0, n, 0.5), keep_mask(1, "u", "m", 0, n, 0.5), keep_mask(1, "t", "n", 0, n, 0.5)):
        agree = (base == other).double().mean().item()
        assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / n)
    # Neighbouring elements are independent too.
    x = base.double() - 0.5
    assert abs((x[1:] * x[:-1]).mean().item()) < 5 * 0.25 / math.sqrt(n)


def test_nested_masks_across_keep_prob():
    # Same u for every p: a lower keep probability keeps a subset (drop_rate sweeps are monotone).
    lo = keep_mask(4, "t", "m", 0, 50_000, 0.3)
    hi = keep_mask(4, "t", "m", 0, 50_000, 0.8)
    assert not (lo & ~hi).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_matches_cpu():
    cpu = keep_mask(240603, "k", "m", 123, 1_000_000, 0.9)
    gpu = keep_mask(240603, "k", "m", 123, 1_000_000, 0.9, device="cuda")
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize(
    "start,count,probs",
    [
        (0, 1000, [0.9, 0.9, 0.9]),
        (2**40 + 7, 3000, [0.9, 1.0, 0.0, 0.5, 1e-12, 1.0 - 2**-53]),
        (123, 300_001, [0.3, 0.7]),  # several hash blocks, ragged last one
        (5, 0, [0.5, 0.5]),
        (0, 17, []),
    ],
)
def test_keep_masks_is_stacked_keep_mask(start, count, probs):
    keys = [f"models/m{i}.safetensors" for i in range(len(probs))]
    got = keep_masks(240603, "k.weight", keys, start, count, probs)
    assert got.shape == (len(probs), count) and got.dtype == torch.bool
    for j, (key, p) in enumerate(zip(keys, probs, strict=True)):
        assert torch.equal(got[j], keep_mask(240603, "k.weight", key, start, count, p))


def test_keep_masks_many_models_chunk_and_thread_independent():
    keys = [f"m{i}" for i in range(117)]
    probs = [0.9] * 117
    whole = keep_masks(1, "t", keys, 0, 4000, probs)
    parts = torch.cat([keep_masks(1, "t", keys, s, 1000, probs) for s in range(0, 4000, 1000)], dim=1)
    assert torch.equal(whole, parts)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = keep_masks(1, "t", keys, 0, 4000, probs)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(whole, one)
    assert torch.equal(whole[42], reference_mask(1, "t", "m42", 0, 4000, 0.9))


def test_keep_masks_validates():
    with pytest.raises(ValueError):
        keep_masks(0, "t", ["a"], 0, 5, [1.5])
    with pytest.raises(ValueError):
        keep_masks(0, "t", ["a", "b"], 0, 5, [0.5])
    with pytest.raises(ValueError):
        keep_masks(0, "t", ["a"], -1, 5, [0.5])
