"""The worked examples of the TGMD spec (tests/data/tgmd_vectors.json), reproduced exactly."""

import json

import pytest
import torch

from mergekit_sdxl.kernels import (
    TGMDParams,
    apply_trim,
    merge_geometric_median,
    tensor_reader,
    tgmd_merge,
    trim_threshold,
    weiszfeld,
    weiszfeld_gram,
)
from tests.paths import DATA

V = json.loads((DATA / "tgmd_vectors.json").read_text())
F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


BASE = t(V["base"])
MODELS = [t(m) for m in V["models"]]
T4_MASKS = t(V["T4_masks"]) > 0
# T6 "p1, p1, p3": two copies of p1 = 1 and one p3 = 5 (per element, length 4); these are the
# points that reproduce the published iterates 1.8, 1.444..., 1.235... (y_t - 1 = 4 / (2^(t+1) + 1)).
T6_POINTS = t([[1.0] * 4, [1.0] * 4, [5.0] * 4])


def params(**kw) -> TGMDParams:
    d = dict(drop_rate=[0.0] * 3, density=[1.0] * 3, weight=[1.0] * 3)
    d.update(kw)
    return TGMDParams(**d)


def t4_masks(i, start, count):
    return T4_MASKS[i, start : start + count]


def masked_points(masks=None):
    """u_i for the identity vote (T3/T5 points), computed by hand here."""
    d = t(V["deltas"])
    if masks is not None:
        d = d * masks
    g = torch.sign(torch.sign(d).sum(0))
    return d * ((torch.sign(d) == g) & (d != 0))


def test_deltas_are_model_minus_base():
    assert torch.equal(torch.stack(MODELS) - BASE, t(V["deltas"]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_t1_ties_paper_mean(dtype):
    out = tgmd_merge(BASE.to(dtype), [m.to(dtype) for m in MODELS], params(sign_election="sum", aggregate="mean"), dtype)
    assert torch.equal(out - BASE.to(dtype), t(V["T1_ties_paper_k1_mean"], dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_t2_ties_soup_mean(dtype):
    out = tgmd_merge(BASE.to(dtype), [m.to(dtype) for m in MODELS], params(aggregate="mean"), dtype)
    assert torch.equal(out - BASE.to(dtype), t(V["T2_ties_soup_k1_mean"], dtype))


def test_t3_direct_exact_and_32_iterations():
    res = weiszfeld(masked_points())
    assert res.iterations == V["T3_iterations"] == 32
    assert torch.allclose(res.median, t(V["T3_ties_soup_k1_geomedian"]), rtol=0, atol=1e-9)
    # The coefficients reproduce the median (convex combination of the points).
    assert torch.allclose(res.coeffs @ masked_points(), res.median, rtol=0, atol=1e-15)
    assert abs(float(res.coeffs.sum()) - 1.0) < 1e-15


def test_t3_gram_form_and_driver():
    u = masked_points()
    coeffs, iters = weiszfeld_gram(u @ u.T)
    # ftol = 1e-20 means "until f stops changing": the Gram form's rounding stops one step early.
    assert iters in (31, 32)
    expected = t(V["T3_ties_soup_k1_geomedian"])
    assert torch.allclose(coeffs @ u, expected, rtol=0, atol=1e-8)
    out = tgmd_merge(BASE, MODELS, params())
    assert torch.allclose(out - BASE, expected, rtol=0, atol=1e-8)


def test_t4_drop_no_rescale_and_dare():
    out = tgmd_merge(BASE, MODELS, params(aggregate="mean", drop_rate=[0.25] * 3), masks=t4_masks)
    assert torch.equal(out - BASE, t(V["T4_ties_soup_mean_after_drop_no_rescale"]))
    out = tgmd_merge(BASE, MODELS, params(aggregate="mean", drop_rate=[0.25] * 3, rescale=1.0), masks=t4_masks)
    assert torch.equal(out - BASE, t(V["T4_same_with_dare_rescale_p0.25"]))


def test_t5_tgmd_maxiter_binding():
    u = masked_points(T4_MASKS.to(F64))
    res = weiszfeld(u, maxiter=100)
    assert res.iterations == 100
    assert torch.allclose(res.median, t(V["T5_tgmd_delta_maxiter100"]), rtol=0, atol=1e-11)
    res = weiszfeld(u, maxiter=1000)
    assert torch.allclose(res.median, t(V["T5_tgmd_delta_converged(maxiter=1000)"]), rtol=0, atol=1e-11)
    coeffs, _ = weiszfeld_gram(u @ u.T, maxiter=1000)
    assert torch.allclose(coeffs @ u, t(V["T5_tgmd_delta_converged(maxiter=1000)"]), rtol=0, atol=5e-8)
    # Through the driver (Gram form): the tie at element 1 keeps the base exactly.
    out = tgmd_merge(BASE, MODELS, params(drop_rate=[0.25] * 3), masks=t4_masks)
    assert torch.allclose(out - BASE, t(V["T5_tgmd_delta_maxiter100"]), rtol=0, atol=1e-11)
    assert torch.allclose(out, t(V["T5_tgmd_merged_alpha1"]), rtol=0, atol=1e-11)
    assert out[1] == BASE[1]


def test_t6_eps_clamp_duplicated_points():
    expected = t(V["T6_gm_zero_distance_p1_p1_p3"])
    res = weiszfeld(T6_POINTS)
    assert torch.allclose(res.median, expected, rtol=0, atol=1e-12)
    assert not torch.equal(res.median, torch.ones(4, dtype=F64))  # the eps clamp, not 1.0
    coeffs, _ = weiszfeld_gram(T6_POINTS @ T6_POINTS.T)
    assert torch.allclose(coeffs @ T6_POINTS, expected, rtol=0, atol=1e-12)
    for maxiter, row in zip((1, 2, 3), V["T6_gm_maxiter1,2,3"], strict=True):
        assert torch.allclose(weiszfeld(T6_POINTS, maxiter=maxiter).median, t(row), rtol=0, atol=1e-11)
        c, iters = weiszfeld_gram(T6_POINTS @ T6_POINTS.T, maxiter=maxiter)
        assert iters == maxiter
        assert torch.allclose(c @ T6_POINTS, t(row), rtol=0, atol=1e-11)
    readers = [tensor_reader(p) for p in T6_POINTS]
    out = merge_geometric_median("t6", (4,), readers, None, 1e-6, 100, 1e-20, F64, 1)
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)


def test_t7_trim_k1_keeps_everything():
    x = t(V["T7_trim_k1_input"])
    thr = trim_threshold(x, 1.0)
    assert thr is None
    assert torch.equal(apply_trim(x, thr), t(V["T7_trim_k1_expected_keeps_all"]))
    # And in float32, where a float32-vs-float64 threshold mix-up would bite.
    x32 = x.float()
    assert torch.equal(apply_trim(x32, trim_threshold(x32, 1.0)), x32)


@pytest.mark.parametrize("dtype,key", [(torch.float64, "U1_gm_fp64"), (torch.float32, "U1_gm_fp32")])
def test_u1_geometric_median(dtype, key):
    pts = t(V["U1_inputs_4x4"], dtype)
    res = weiszfeld(pts)
    assert res.median.dtype == dtype
    assert torch.allclose(res.median.double(), t(V[key]), rtol=0, atol=1e-9)


def test_u1_gram_form_and_driver():
    pts = t(V["U1_inputs_4x4"]).reshape(3, 4, 4)
    expected = t(V["U1_gm_fp64"]).reshape(4, 4)
    for rows_per_chunk in (1, 3, 4):
        out = merge_geometric_median("u1", (4, 4), [tensor_reader(p) for p in pts], None, 1e-6, 100, 1e-20, F64, rows_per_chunk)
        assert out.shape == (4, 4)
        assert torch.allclose(out, expected, rtol=0, atol=1e-7)
