"""The per-tensor driver: reference agreement, chunk/thread invariance, bad numbers."""

import warnings

import pytest
import torch

from mergekit_sdxl.kernels import (
    TGMDParams,
    merge_geometric_median,
    merge_task_vectors,
    rows_cols,
    tensor_reader,
    tgmd_merge,
)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# Independent naive float64 reference (whole tensors, no chunking, no Gram form, no kernels).
# ----------------------------------------------------------------------------------------------


def ref_geomedian(points, weights, eps, maxiter, ftol):
    n = len(points)
    y = sum(points) / n
    f = sum(float(torch.sqrt(((p - y) ** 2).sum())) for p in points) / n
    for _ in range(maxiter):
        w = [b / max(float(torch.sqrt(((p - y) ** 2).sum())), eps) for p, b in zip(points, weights, strict=True)]
        y = sum(wi * p for wi, p in zip(w, points, strict=True)) / sum(w)
        f_new = sum(float(torch.sqrt(((p - y) ** 2).sum())) for p in points) / n
        done = abs(f - f_new) <= ftol * f_new
        f = f_new
        if done:
            break
    return y


def ref_tgmd(base, models, density, vote, aggregate, weights, lam=1.0, eps=1e-6, maxiter=100, ftol=1e-20):
    b = base.double().flatten()
    deltas = []
    for m, k in zip(models, density, strict=True):
        d = m.double().flatten() - b
        if k < 1:
            keep = int(k * d.numel() + 1e-9)
            if keep == 0:
                d = torch.zeros_like(d)
            else:
                thr = sorted(d.abs().tolist(), reverse=True)[keep - 1]
                d = torch.where(d.abs() >= thr, d, torch.zeros_like(d))
        deltas.append(d)
    if vote == "none":
        us, agree = deltas, [torch.ones_like(d) for d in deltas]
    else:
        if vote == "count":
            g = torch.sign(sum(torch.sign(d) for d in deltas))
        else:
            g = torch.sign(sum(deltas))
        agree = [((torch.sign(d) == g) & (d != 0)).double() for d in deltas]
        us = [d * a for d, a in zip(deltas, agree, strict=True)]
    if aggregate == "mean":
        cnt = sum(agree)
        res = torch.where(cnt > 0, sum(us) / cnt.clamp(min=1), torch.zeros_like(b))
    else:
        res = ref_geomedian(us, weights, eps, maxiter, ftol)
    return (b + lam * res).reshape(base.shape)


def make_case(seed, n=5, shape=(40, 30), dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=F64)
    models = [(base + torch.randn(shape, generator=gen, dtype=F64) * (0.5 + i / n)).to(dtype) for i in range(n)]
    return base.to(dtype), models


def params(n, **kw):
    d = dict(drop_rate=[0.0] * n, density=[1.0] * n, weight=[1.0] * n)
    d.update(kw)
    return TGMDParams(**d)


# With ftol = 1e-20 Weiszfeld stops when f "stops changing in floating point": on slowly
# converging data the Gram form and the direct form can stop an iteration apart, ~1e-8 apart
# (see the spec). A binding maxiter makes both run the same iterations, so the comparison
# measures the arithmetic alone; the converged comparison gets the spec's 1e-8-level tolerance.
BINDING = 12


@pytest.mark.parametrize("vote", ["count", "sum", "none"])
@pytest.mark.parametrize("aggregate", ["mean", "median"])
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_matches_naive_reference(vote, aggregate, density):
    base, models = make_case(1)
    n = len(models)
    weights = [1.0, 2.0, 0.5, 1.0, 3.0]
    p = params(n, density=[density] * n, weight=weights, sign_election=vote, aggregate=aggregate, lambda_=0.8, maxiter=BINDING)
    out = tgmd_merge(base, models, p, F64, rows_per_chunk=7)
    ref = ref_tgmd(base, models, [density] * n, vote, aggregate, weights, lam=0.8, maxiter=BINDING)
    assert out.dtype == F64 and out.shape == base.shape
    assert (out - ref).abs().max().item() < 1e-10


def test_mixed_densities_and_float32_compute():
    base, models = make_case(2)
    dens = [1.0, 0.5, 0.2, 0.9, 0.05]
    p = params(5, density=dens)
    ref = ref_tgmd(base, models, dens, "count", "median", [1.0] * 5)
    assert (tgmd_merge(base, models, p, F64, rows_per_chunk=3) - ref).abs().max().item() < 1e-7
    ref12 = ref_tgmd(base, models, dens, "count", "median", [1.0] * 5, maxiter=BINDING)
    out12 = tgmd_merge(base, models, params(5, density=dens, maxiter=BINDING), F64, rows_per_chunk=3)
    assert (out12 - ref12).abs().max().item() < 1e-10
    out32 = tgmd_merge(base.float(), [m.float() for m in models], p, torch.float32, rows_per_chunk=3)
    assert out32.dtype == torch.float32
    assert (out32.double() - ref).abs().max().item() < 1e-4


def test_fp16_inputs_upcast_per_chunk_and_fp16_output():
    base, models = make_case(3, dtype=torch.float16)
    p = params(5, drop_rate=[0.1] * 5)
    out = tgmd_merge(base, models, p, F64, rows_per_chunk=4, out_dtype=torch.float16)
    assert out.dtype == torch.float16
    ref = tgmd_merge(base.double(), [m.double() for m in models], p, F64)
    assert torch.equal(out, ref.half())


def test_drop_rate_one_gives_base_and_drop_is_seeded():
    base, models = make_case(4)
    assert torch.equal(tgmd_merge(base, models, params(5, drop_rate=[1.0] * 5)), base)
    p = params(5, drop_rate=[0.3] * 5, seed=240603)
    a = tgmd_merge(base, models, p, tensor_name="a")
    assert torch.equal(a, tgmd_merge(base, models, p, tensor_name="a"))
    assert not torch.equal(a, tgmd_merge(base, models, p, tensor_name="b"))
    assert not torch.equal(a, tgmd_merge(base, models, params(5, drop_rate=[0.3] * 5, seed=1), tensor_name="a"))


def test_tie_vote_keeps_base_exactly():
    base = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    models = [base + torch.tensor([0.5, 0.1, 0.0]), base - torch.tensor([0.5, -0.2, 0.0])]
    for agg in ("mean", "median"):
        out = tgmd_merge(base, models, params(2, aggregate=agg))
        assert out[0] == base[0] and out[2] == base[2]
        assert out[1] != base[1]


# ----------------------------------------------------------------------------------------------
# Invariance: chunk size and thread count change nothing, bit for bit.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregate,vote", [("median", "count"), ("mean", "sum"), ("median", "none")])
def test_chunk_and_thread_invariance(aggregate, vote):
    # > 2 Gram blocks (65536 elements) so the canonical re-blocking is exercised.
    base, models = make_case(5, n=4, shape=(300, 470), dtype=torch.float16)
    p = params(4, drop_rate=[0.1, 0.2, 0.0, 0.5], density=[1.0, 0.7, 1.0, 0.4], aggregate=aggregate, sign_election=vote, seed=240603)
    ref = tgmd_merge(base, models, p, F64, rows_per_chunk=300, tensor_name="k")
    old = torch.get_num_threads()
    try:
        for threads, rows in [(1, 2), (2, 7), (4, 139)]:
            torch.set_num_threads(threads)
            out = tgmd_merge(base, models, p, F64, rows_per_chunk=rows, tensor_name="k")
            assert torch.equal(out, ref), (threads, rows)
    finally:
        torch.set_num_threads(old)


def test_geometric_median_chunk_invariance_and_reference():
    _, models = make_case(6, n=4, shape=(200, 400))
    readers = [tensor_reader(m) for m in models]
    ref = merge_geometric_median("g", (200, 400), readers, [1.0, 2.0, 1.0, 1.0], 1e-6, 100, 1e-20, F64, 200)
    for rows in (3, 77):
        out = merge_geometric_median("g", (200, 400), readers, [1.0, 2.0, 1.0, 1.0], 1e-6, 100, 1e-20, F64, rows)
        assert torch.equal(out, ref)
    # Against the naive direct iteration on a smaller case (the naive loop is slow).
    small = [m[:30, :50] for m in models]
    out = merge_geometric_median("g", (30, 50), [tensor_reader(m) for m in small], [1.0, 2.0, 1.0, 1.0], 1e-6, BINDING, 1e-20, F64, 4)
    naive = ref_geomedian([m.flatten() for m in small], [1.0, 2.0, 1.0, 1.0], 1e-6, BINDING, 1e-20).reshape(30, 50)
    assert (out - naive).abs().max().item() < 1e-10


def test_rows_cols():
    assert rows_cols(()) == (1, 1)
    assert rows_cols((7,)) == (7, 1)
    assert rows_cols((320, 4, 3, 3)) == (320, 36)
    assert rows_cols((0, 5)) == (0, 0)


def test_zero_d_and_empty_tensors():
    base = torch.tensor(1.0, dtype=F64)
    out = tgmd_merge(base, [torch.tensor(2.0, dtype=F64), torch.tensor(3.0, dtype=F64)], params(2, aggregate="mean"))
    assert out.shape == () and out.item() == 2.5
    empty = torch.zeros(0, 4, dtype=F64)
    assert tgmd_merge(empty, [empty, empty], params(2)).shape == (0, 4)


# ----------------------------------------------------------------------------------------------
# Bad numbers: excluded with a report, absent models abstain, nothing is clamped.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregate", ["mean", "median"])
def test_nan_model_is_left_out_and_reported(aggregate):
    base, models = make_case(7, n=3)
    bad = models[1].clone()
    bad[20, 3] = float("nan")
    keys = ["a.safetensors", "b.safetensors", "c.safetensors"]
    calls = []
    p = params(3, drop_rate=[0.1] * 3, aggregate=aggregate)
    out = tgmd_merge(base, [models[0], bad, models[2]], p, model_keys=keys, tensor_name="x.weight", rows_per_chunk=8, on_bad_input=lambda i, msg: calls.append((i, msg)))
    assert [c[0] for c in calls] == [1]
    assert "x.weight" in calls[0][1] and "b.safetensors" in calls[0][1]
    p2 = params(2, drop_rate=[0.1] * 2, aggregate=aggregate)
    expected = tgmd_merge(base, [models[0], models[2]], p2, model_keys=[keys[0], keys[2]], tensor_name="x.weight")
    assert torch.equal(out, expected)


def test_bad_input_default_warns_and_callback_may_raise():
    base, models = make_case(8, n=2)
    models[0] = models[0].clone()
    models[0][0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        tgmd_merge(base, models, params(2))

    def fail(i, msg):
        raise ValueError(msg)

    with pytest.raises(ValueError, match="model0"):
        tgmd_merge(base, models, params(2), on_bad_input=fail)


def test_all_models_bad_gives_base():
    base, models = make_case(9, n=2)
    bad = [m.clone().fill_(float("nan")) for m in models]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(tgmd_merge(base, bad, params(2)), base)


@pytest.mark.parametrize("aggregate", ["mean", "median"])
def test_missing_model_abstains_as_zero_delta(aggregate):
    base, models = make_case(10, n=3)
    p = params(3, drop_rate=[0.2] * 3, aggregate=aggregate)
    out = tgmd_merge(base, [models[0], None, models[2]], p)
    # Abstaining = a zero task vector: the same as passing the base itself, never a fake delta.
    assert torch.equal(out, tgmd_merge(base, [models[0], base, models[2]], p))


def test_non_finite_result_raises():
    base = torch.tensor([1.0, 60000.0], dtype=F64)
    models = [torch.tensor([1.5, 65000.0], dtype=F64)]
    with pytest.raises(ValueError, match="big.weight"):
        tgmd_merge(base, models, params(1, aggregate="mean", lambda_=10.0), out_dtype=torch.float16, tensor_name="big.weight")
    huge = torch.tensor([1e308], dtype=F64)
    with pytest.raises(ValueError, match="huge"):
        tgmd_merge(huge, [huge * 1.5], params(1, aggregate="mean", lambda_=10.0), tensor_name="huge")


def test_non_finite_base_raises():
    base, models = make_case(11, n=2)
    base = base.clone()
    base[3, 3] = float("nan")
    with pytest.raises(ValueError, match="base"):
        tgmd_merge(base, models, params(2))


def test_reader_interface_and_memory_shape():
    base, models = make_case(12, n=3, shape=(10, 3, 2))
    seen = []

    def reader(t):
        view = t.reshape(10, 6)

        def read(r0, r1):
            seen.append(r1 - r0)
            return view[r0:r1]

        return read

    out = merge_task_vectors("t", base.shape, reader(base), [reader(m) for m in models], ["a", "b", "c"], params(3), F64, 4)
    assert out.shape == (10, 3, 2)
    assert max(seen) == 4  # only row chunks are ever requested
    assert torch.equal(out, tgmd_merge(base, models, params(3), model_keys=["a", "b", "c"], tensor_name="t"))


def test_params_validation():
    with pytest.raises(ValueError):
        params(2, drop_rate=[0.1])
    with pytest.raises(ValueError):
        params(1, sign_election="majority")
    with pytest.raises(ValueError):
        params(1, aggregate="median_of_means")
    with pytest.raises(ValueError):
        params(1, drop_rate=[1.5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("aggregate", ["mean", "median"])
def test_cuda_chunk_invariant_and_close_to_cpu(aggregate):
    base, models = make_case(13, n=4, shape=(300, 470), dtype=torch.float16)
    p = params(4, drop_rate=[0.1] * 4, density=[1.0, 0.5, 1.0, 1.0], aggregate=aggregate, seed=240603)
    cpu = tgmd_merge(base, models, p, F64, rows_per_chunk=300, tensor_name="k")
    gb, gm = base.cuda(), [m.cuda() for m in models]
    ref = tgmd_merge(gb, gm, p, F64, rows_per_chunk=300, tensor_name="k")
    assert ref.is_cuda
    for rows in (1, 7, 139):
        assert torch.equal(tgmd_merge(gb, gm, p, F64, rows_per_chunk=rows, tensor_name="k"), ref)
    # Same masks and votes; only the Gram matrix's last bits may differ between devices.
    if aggregate == "mean":
        assert torch.equal(ref.cpu(), cpu)
    else:
        assert (ref.cpu() - cpu).abs().max().item() < 1e-12


def test_geometric_median_leaves_out_absent_and_bad_models():
    _, models = make_case(14, n=3, shape=(6, 5))
    readers = [tensor_reader(m) for m in models]
    two = merge_geometric_median("g", (6, 5), readers[:2], None, 1e-6, 100, 1e-20, F64, 2)
    out = merge_geometric_median("g", (6, 5), readers[:2] + [tensor_reader(None)], None, 1e-6, 100, 1e-20, F64, 2)
    assert torch.equal(out, two)
    bad = models[2].clone()
    bad[5, 4] = float("nan")
    calls = []
    out = merge_geometric_median("g", (6, 5), readers[:2] + [tensor_reader(bad)], None, 1e-6, 100, 1e-20, F64, 2, on_bad_input=lambda i, m: calls.append(i))
    assert calls == [2] and torch.equal(out, two)
    with pytest.raises(ValueError, match="no model"):
        merge_geometric_median("g", (6, 5), [tensor_reader(None)], None, 1e-6, 100, 1e-20, F64, 2)
