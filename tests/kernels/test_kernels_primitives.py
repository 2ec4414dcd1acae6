"""Sparsify, consensus, aggregate and Gram accumulation primitives."""

import pytest
import torch

from mergekit_sdxl.kernels import (
    GramAccumulator,
    apply_drop,
    apply_trim,
    disjoint_mask,
    disjoint_mean,
    elect_sign,
    trim_threshold,
    weiszfeld,
    weiszfeld_gram,
)

F64 = torch.float64


def test_apply_drop_rescale_and_p1():
    d = torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=F64)
    keep = torch.tensor([True, False, True, True])
    assert torch.equal(apply_drop(d, keep, 0.5, 0.0), torch.tensor([1.0, 0.0, 3.0, 4.0], dtype=F64))
    assert torch.equal(apply_drop(d, keep, 0.5, 1.0), torch.tensor([2.0, 0.0, 6.0, 8.0], dtype=F64))
    assert torch.allclose(apply_drop(d, keep, 0.75, 0.5), torch.tensor([2.0, 0.0, 6.0, 8.0], dtype=F64))
    out = apply_drop(d, torch.ones(4, dtype=torch.bool), 1.0, 1.0)
    assert torch.equal(out, torch.zeros(4, dtype=F64))
    # A dropped NaN/inf becomes an exact zero, never NaN.
    assert torch.equal(apply_drop(torch.tensor([float("nan"), 1.0]), torch.tensor([False, True]), 0.1, 0.0), torch.tensor([0.0, 1.0]))


def test_trim_threshold_topk_ties_and_zero():
    d = torch.tensor([0.1, -0.5, 0.5, 0.2, -0.05, 0.0, 0.3, -0.3, 0.4, 0.45], dtype=F64)
    thr = trim_threshold(d, 0.3)  # top 3 magnitudes: 0.5, 0.5, 0.45
    assert thr.item() == 0.45 and thr.dtype == F64
    assert torch.equal(apply_trim(d, thr) != 0, d.abs() >= 0.45)
    # Ties at the threshold all survive: top 1 of [0.5, 0.5] keeps both.
    thr = trim_threshold(d, 0.1)
    assert (apply_trim(d, thr) != 0).sum() == 2
    assert not apply_trim(d, trim_threshold(d, 0.0)).any()
    assert trim_threshold(d, 1.0) is None
    assert torch.equal(apply_trim(d, None), d)


def test_trim_threshold_in_data_dtype_float32():
    # The smallest entry must survive density 0.999.. when it is the kept boundary in float32.
    x = torch.tensor([1e-8, 0.3, -0.7, 0.123456789], dtype=torch.float32)
    thr = trim_threshold(x, 0.75)
    assert thr.dtype == torch.float32
    assert torch.equal(apply_trim(x, thr), torch.tensor([0.0, 0.3, -0.7, 0.123456789], dtype=torch.float32))


def test_elect_sign_count_vs_sum_and_ties():
    d = torch.tensor([[0.5, 1.0, 0.0, 1.0], [0.25, -1.0, 0.0, -1.0], [-1.0, 0.0, 0.0, -3.0]], dtype=F64)
    assert torch.equal(elect_sign(d, "count"), torch.tensor([1.0, 0.0, 0.0, -1.0], dtype=F64))
    assert torch.equal(elect_sign(d, "sum"), torch.tensor([-1.0, 0.0, 0.0, -1.0], dtype=F64))
    mask = disjoint_mask(d, elect_sign(d, "count"))
    assert torch.equal(mask, torch.tensor([[1, 0, 0, 0], [1, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.bool))
    with pytest.raises(ValueError):
        elect_sign(d, "majority")


def test_elect_sign_count_exact_for_many_models_low_precision():
    d = torch.ones(601, 3, dtype=torch.bfloat16)
    d[:300] = -1
    assert torch.equal(elect_sign(d, "count"), torch.ones(3, dtype=torch.bfloat16))


def test_disjoint_mean_zero_over_zero():
    u = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 2.0]], dtype=F64)
    a = torch.tensor([[True, False, False], [True, False, True]])
    assert torch.equal(disjoint_mean(u, a), torch.tensor([2.0, 0.0, 2.0], dtype=F64))


def test_weiszfeld_weights_and_single_point():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
    # A dominant prior weight pulls the median onto that point (up to the eps clamp).
    res = weiszfeld(pts, weights=torch.tensor([100.0, 1.0, 1.0]))
    assert res.median.abs().max() < 1e-5
    c, _ = weiszfeld_gram(pts @ pts.T, weights=torch.tensor([100.0, 1.0, 1.0]))
    assert (c @ pts).abs().max() < 1e-5
    one = torch.tensor([[1.0, 2.0]], dtype=F64)
    assert torch.equal(weiszfeld(one).median, one[0])
    c, _ = weiszfeld_gram(torch.zeros(4, 4, dtype=F64))
    assert torch.allclose(c, torch.full((4,), 0.25, dtype=F64))


def _gram(data: torch.Tensor, chunk: int) -> torch.Tensor:
    acc = GramAccumulator(data.shape[0])
    for s in range(0, data.shape[1], chunk):
        acc.update(data[:, s : s + chunk])
    return acc.result()


def test_gram_accumulator_chunk_and_thread_invariant():
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(7, 300_001, generator=gen, dtype=F64) * torch.rand(7, 1, generator=gen, dtype=F64)
    ref = _gram(data, data.shape[1])
    for chunk in (1000, 65536, 100003):
        assert torch.equal(_gram(data, chunk), ref), chunk
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            assert torch.equal(_gram(data, 77_777), ref), threads
    finally:
        torch.set_num_threads(old)
    exact = data @ data.T
    assert ((ref - exact).abs().max() / exact.abs().max()).item() < 1e-12
    assert torch.equal(ref, ref.T)


def test_gram_accumulator_small_and_float32_input():
    data = torch.randn(3, 10, dtype=torch.float32)
    acc = GramAccumulator(3)
    acc.update(data[:, :4])
    acc.update(data[:, 4:4])
    acc.update(data[:, 4:])
    g = acc.result()
    assert g.dtype == F64 and acc.elements == 10
    d64 = data.double()
    assert torch.allclose(g, d64 @ d64.T, rtol=1e-14, atol=0)
    assert torch.equal(GramAccumulator(2).result(), torch.zeros(2, 2, dtype=F64))
    with pytest.raises(ValueError):
        acc.update(torch.zeros(2, 5))
