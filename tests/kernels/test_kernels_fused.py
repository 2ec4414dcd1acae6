"""The fused numba path gives the torch reference's bytes, for every combination it takes."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from mergekit_sdxl.kernels import tgmd_fused
from mergekit_sdxl.kernels.geomedian import (
    GRAM_SUBBLOCK,
    PAIRWISE_GRAM_MIN_POINTS,
    BlockedGram,
    GramAccumulator,
    gram_state_bytes,
)
from mergekit_sdxl.kernels.tgmd import TGMDParams, merge_task_vectors, tensor_reader, tgmd_merge

pytestmark = pytest.mark.skipif(not tgmd_fused.fused_available(), reason="numba not importable")

F64 = torch.float64


def _inputs(n, shape, seed=0, absent=()):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).half()
    models = [
        None if i in absent else (base.float() + 0.01 * torch.randn(shape, generator=g)).half() for i in range(n)
    ]
    return base, models


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (signed zeros included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


# Every sign election x aggregate, each with parameter sets that cover every pair of values of
# (rescale, density, drop rate, lambda) at least once.
PARAMETER_SETS = [
    (0.0, 1.0, 0.0, 1.0),
    (1.0, 1.0, 0.3, -0.7),
    (0.0, 0.6, 0.3, 1.0),
    (1.0, 0.6, 1.0, 1.0),
    (0.0, 1.0, 1.0, -0.7),
    (1.0, 0.6, 0.0, -0.7),
    (0.0, 0.6, 1.0, -0.7),
    (1.0, 1.0, 0.0, 1.0),
]
COMBOS = [
    (elect, agg, *values)
    for elect, agg in itertools.product(["count", "sum", "none"], ["median", "mean"])
    for values in PARAMETER_SETS
]


@pytest.mark.parametrize("compute", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n,shape,absent,rows", [(3, (37, 19), (), 3), (5, (300, 257), (2,), 64), (4, (1, 70000), (), None)])
def test_fused_equals_torch_for_every_combination(compute, n, shape, absent, rows):
    base, models = _inputs(n, shape, seed=n, absent=absent)
    for elect, agg, rescale, dens, drop, lam in COMBOS:
        p = TGMDParams(
            drop_rate=[drop] * n,
            density=[dens] * n,
            weight=[1.0 + i for i in range(n)],
            rescale=rescale,
            sign_election=elect,
            aggregate=agg,
            lambda_=lam,
            seed=5,
        )
        for out_dtype in (torch.float16, None):
            ref = tgmd_merge(base, models, p, compute, rows_per_chunk=rows, out_dtype=out_dtype, kernel="torch")
            got = tgmd_merge(base, models, p, compute, rows_per_chunk=rows, out_dtype=out_dtype, kernel="fused")
            assert _same(ref, got), (elect, agg, rescale, dens, drop, lam, out_dtype)


def test_fused_bytes_do_not_depend_on_chunks_or_threads():
    base, models = _inputs(6, (523, 301), seed=1)
    p = TGMDParams(drop_rate=[0.1] * 6, density=[1.0] * 6, weight=[1.0] * 6, seed=240603)
    ref = tgmd_merge(base, models, p, F64, out_dtype=torch.float16, kernel="torch")
    threads = torch.get_num_threads()
    try:
        for n_threads, rows in itertools.product((1, 2), (None, 1, 7, 256)):
            torch.set_num_threads(n_threads)
            got = tgmd_merge(base, models, p, F64, rows_per_chunk=rows, out_dtype=torch.float16, kernel="fused")
            assert _same(ref, got), (n_threads, rows)
    finally:
        torch.set_num_threads(threads)


def test_non_finite_model_is_left_out_as_in_the_reference():
    base, models = _inputs(4, (40, 33), seed=2)
    bad = models[2].clone()
    bad[17, 5] = float("inf")
    models[2] = bad
    p = TGMDParams(drop_rate=[0.1] * 4, density=[0.8] * 4, weight=[1.0] * 4, seed=3)
    results, calls = {}, {}
    for kernel in ("torch", "fused"):
        seen: list = []
        calls[kernel] = seen
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            results[kernel] = tgmd_merge(
                base, models, p, F64, rows_per_chunk=9, on_bad_input=lambda i, m, seen=seen: seen.append((i, m)), kernel=kernel
            )
    assert _same(results["torch"], results["fused"])
    assert calls["torch"] == calls["fused"] and [i for i, _ in calls["fused"]] == [2]
    assert "rows 9:18" in calls["fused"][0][1]


@pytest.mark.parametrize("n", [5, PAIRWISE_GRAM_MIN_POINTS])
def test_blocked_gram_equals_gram_accumulator(n):
    g = torch.Generator().manual_seed(4)
    total = 3 * 65536 + 1000
    data = torch.randn(n, total, generator=g, dtype=F64)
    acc = GramAccumulator(n)
    for start in range(0, total, 40000):
        acc.update(data[:, start : start + 40000])
    blocked = BlockedGram(n)
    full = total // GRAM_SUBBLOCK
    sub = data[:, : full * GRAM_SUBBLOCK].reshape(n, full, GRAM_SUBBLOCK).transpose(0, 1).contiguous()
    blocked.add(sub[:300], 0)
    blocked.add(sub[300:], 300)
    tail = torch.zeros(n, GRAM_SUBBLOCK, dtype=F64)
    rest = total - full * GRAM_SUBBLOCK
    tail[:, :rest] = data[:, full * GRAM_SUBBLOCK :]
    blocked.add_tail(tail)
    result = blocked.result()
    assert torch.equal(result, acc.result())
    assert torch.equal(blocked.result(), result)  # result() leaves the accumulator as it was
    with pytest.raises(ValueError):
        blocked.add(sub[:1], 0)


def _perfect_pairs(parts):
    if len(parts) == 1:
        return parts[0].clone()
    half = len(parts) // 2
    return _perfect_pairs(parts[:half]) + _perfect_pairs(parts[half:])


def _adjacent_pair_gram(data: torch.Tensor) -> torch.Tensor:
    """The pairwise rule of docs/methods.md, written out: per 65536-element block, the 256-element
    sub-block products summed by perfect adjacent-pair trees over the runs given by the binary
    digits of their count (largest run first), the runs added from the smallest up; blocks in order."""
    n, total = data.shape
    padded = torch.nn.functional.pad(data, (0, -total % GRAM_SUBBLOCK))
    products = [torch.bmm(s[None], s[None].transpose(1, 2))[0] for s in padded.split(GRAM_SUBBLOCK, dim=1)]
    gram = None
    for b in range(0, len(products), 256):
        block = products[b : b + 256]
        runs, start = [], 0
        for bit in reversed(range(9)):
            if len(block) & (1 << bit):
                runs.append(_perfect_pairs(block[start : start + (1 << bit)]))
                start += 1 << bit
        s = runs.pop()
        while runs:
            s = runs.pop() + s
        gram = s if gram is None else gram + s
    upper = torch.triu(gram)
    return upper + torch.triu(gram, diagonal=1).T


def test_gram_of_many_points_sums_sub_blocks_by_adjacent_pairs():
    g = torch.Generator().manual_seed(9)
    n, total = PAIRWISE_GRAM_MIN_POINTS + 3, 65536 + 7 * 256 + 100  # a full block, then 7 + 1 sub-blocks
    data = torch.randn(n, total, generator=g, dtype=F64) * torch.rand(n, 1, generator=g, dtype=F64)
    acc = GramAccumulator(n)
    for start in range(0, total, 30001):
        acc.update(data[:, start : start + 30001])
    assert torch.equal(acc.result(), _adjacent_pair_gram(data))
    # Below the threshold the halves tree stays (method version 1's bytes): it is another rounding.
    few = data[:5]
    small = GramAccumulator(5)
    small.update(few)
    assert not torch.equal(small.result(), _adjacent_pair_gram(few))
    assert gram_state_bytes(1000) < 100 * 2**20 < gram_state_bytes(128) * 10


def test_fused_equals_torch_with_many_inputs():
    n = PAIRWISE_GRAM_MIN_POINTS + 1
    base, models = _inputs(n, (300, 257), seed=3, absent=(7,))
    p = TGMDParams(drop_rate=[0.1] * n, density=[1.0] * n, weight=[1.0] * n, seed=240603)
    for compute in (torch.float64, torch.float32):
        ref = tgmd_merge(base, models, p, compute, rows_per_chunk=97, out_dtype=torch.float16, kernel="torch")
        got = tgmd_merge(base, models, p, compute, rows_per_chunk=61, out_dtype=torch.float16, kernel="fused")
        assert _same(ref, got), compute


def test_kept_rows_are_read_once_within_reuse_bytes():
    base, models = _inputs(3, (64, 50), seed=5)
    reads = {"n": 0}

    def counting(t):
        inner = tensor_reader(t)

        def read(r0, r1):
            reads["n"] += 1
            return inner(r0, r1).clone()

        return read

    p = TGMDParams(drop_rate=[0.1] * 3, density=[1.0] * 3, weight=[1.0] * 3, seed=1)

    def merge(reuse):
        reads["n"] = 0
        out = merge_task_vectors(
            "k", base.shape, counting(base), [counting(m) for m in models], ["a", "b", "c"], p, F64, 8, reuse_bytes=reuse
        )
        return out, reads["n"]

    twice, n_twice = merge(0)
    once, n_once = merge(1 << 30)
    half, n_half = merge(4 * 32 * 50 * 2)  # room for 4 of the 8 chunks of the 4 inputs (fp16)
    assert n_twice == 2 * 8 * 4 and n_once == 8 * 4 and n_once < n_half < n_twice
    assert torch.equal(twice, once) and torch.equal(twice, half)


def test_kernel_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert tgmd_fused.resolve_kernel(None, cpu, False) == "fused"
    assert tgmd_fused.resolve_kernel("torch", cpu, False) == "torch"
    assert tgmd_fused.resolve_kernel("fused", cpu, True) == "torch"  # explicit masks: the reference
    assert tgmd_fused.resolve_kernel("auto", torch.device("meta"), False) == "torch"  # not on the CPU
    monkeypatch.setenv(tgmd_fused.KERNEL_ENV, "torch")
    assert tgmd_fused.resolve_kernel(None, cpu, False) == "torch"
    monkeypatch.setenv(tgmd_fused.KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="MERGEKIT_SDXL_KERNEL"):
        tgmd_fused.resolve_kernel(None, cpu, False)


def test_workspace_buffers_are_reused():
    ws = tgmd_fused._Workspace()
    a = ws.get("u", 1000, F64)
    b = ws.get("u", 500, F64)
    assert a.data_ptr() == b.data_ptr()
    c = ws.get("u", 5000, F64)
    assert c.numel() == 5000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("compute", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("aggregate", ["mean", "median"])
def test_cuda_output_within_one_fp16_ulp_of_the_fused_cpu_path(compute, aggregate):
    """The masks, votes and elementwise steps are exact on both devices; only cuBLAS's reduction
    order in the Gram differs, which moves the median's coefficients in their last bits."""
    base, models = _inputs(8, (512, 640), seed=7)
    p = TGMDParams(drop_rate=[0.1] * 8, density=[1.0] * 8, weight=[1.0] * 8, aggregate=aggregate, seed=240603)
    cpu = tgmd_merge(base, models, p, compute, out_dtype=torch.float16, kernel="fused")
    gpu = tgmd_merge(base.cuda(), [m.cuda() for m in models], p, compute, out_dtype=torch.float16).cpu()
    if aggregate == "mean":
        assert _same(cpu, gpu)
        return
    # Distance in fp16 ULPs: ordered integer views of the bit patterns.
    def ordered(t):
        i = _bits(t).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    assert (ordered(cpu) - ordered(gpu)).abs().max().item() <= 1
