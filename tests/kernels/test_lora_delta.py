"""A LoRA module's weight change, row range by row range, against whole-matrix formulas written
here from kohya's, LyCORIS's and A1111's definitions."""

import pytest
import torch
import torch.nn.functional as F

from mergekit_sdxl.kernels.lora_delta import (
    DORA_EPS,
    LoraMathError,
    delta_rows,
    dora_column_sumsq,
    dora_columns,
    dora_rows,
    module_scale,
)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _r(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed), dtype=torch.float64)


def _by_chunks(kind, f, scale, rows, cols, step):
    parts = [delta_rows(kind, f, scale, r0, min(rows, r0 + step), cols) for r0 in range(0, rows, step)]
    return torch.cat(parts)


@pytest.mark.parametrize("step", [1, 3, 7, 40])
def test_linear_lora_is_scaled_up_times_down_in_any_chunking(step):
    up, down = _r(40, 4, seed=1), _r(4, 24, seed=2)
    whole = up @ down * (8 / 4)
    got = _by_chunks("lora", {"up": up, "down": down}, 2.0, 40, 24, step)
    torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-12)


def test_locon_3x3_equals_kohyas_conv2d_merge():
    # kohya networks/lora.py merge_to: conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    up, down = _r(16, 4, 1, 1, seed=3), _r(4, 8, 3, 3, seed=4)
    kohya = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    got = _by_chunks("lora", {"up": up, "down": down}, 1.0, 16, 8 * 9, 5).reshape(16, 8, 3, 3)
    torch.testing.assert_close(got, kohya, rtol=1e-12, atol=1e-12)


def test_locon_tucker_mid_equals_lycoris_rebuild():
    up, down, mid = _r(16, 4, 1, 1, seed=5), _r(4, 8, 1, 1, seed=6), _r(4, 4, 3, 3, seed=7)
    # LyCORIS rebuild_tucker(t, wa=up^T, wb=down): einsum("i j ..., i p, j r -> p r ...")
    expected = torch.einsum("ijkl,ip,jr->prkl", mid, up.reshape(16, 4).T, down.reshape(4, 8))
    got = _by_chunks("lora", {"up": up, "down": down, "mid": mid}, 1.0, 16, 72, 3).reshape(16, 8, 3, 3)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_loha_is_a_hadamard_product_of_two_low_rank_products():
    w1a, w1b, w2a, w2b = _r(12, 3, seed=1), _r(3, 10, seed=2), _r(12, 3, seed=3), _r(3, 10, seed=4)
    f = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    expected = (w1a @ w1b) * (w2a @ w2b) * 0.5
    torch.testing.assert_close(_by_chunks("loha", f, 0.5, 12, 10, 5), expected, rtol=1e-12, atol=1e-12)


def test_loha_tucker():
    t1, t2 = _r(3, 3, 3, 3, seed=1), _r(3, 3, 3, 3, seed=2)
    w1a, w1b, w2a, w2b = _r(3, 12, seed=3), _r(3, 6, seed=4), _r(3, 12, seed=5), _r(3, 6, seed=6)
    # A1111 make_weight_cp(t, wa, wb): einsum('i j k l, j r -> i r k l') then ('i j k l, i r -> r j k l')
    def cp(t, wa, wb):
        temp = torch.einsum("ijkl,jr->irkl", t, wb)
        return torch.einsum("ijkl,ir->rjkl", temp, wa)

    expected = cp(t1, w1a, w1b) * cp(t2, w2a, w2b)
    f = {"hada_t1": t1, "hada_t2": t2, "hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    got = _by_chunks("loha", f, 1.0, 12, 54, 5).reshape(12, 6, 3, 3)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("w1_form", ["full", "factorised"])
@pytest.mark.parametrize("w2_form", ["full", "factorised", "tucker"])
def test_lokr_rows_of_the_kronecker_product(w1_form, w2_form):
    f = {}
    if w1_form == "full":
        w1 = f["lokr_w1"] = _r(2, 4, seed=1)
    else:
        f["lokr_w1_a"], f["lokr_w1_b"] = _r(2, 3, seed=1), _r(3, 4, seed=2)
        w1 = f["lokr_w1_a"] @ f["lokr_w1_b"]
    if w2_form == "full":
        w2 = f["lokr_w2"] = _r(6, 2, 3, 3, seed=3)
    elif w2_form == "factorised":
        f["lokr_w2_a"], f["lokr_w2_b"] = _r(6, 3, seed=3), _r(3, 2 * 9, seed=4)
        w2 = (f["lokr_w2_a"] @ f["lokr_w2_b"]).reshape(6, 2, 3, 3)
    else:
        f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"] = _r(3, 3, 3, 3, seed=5), _r(3, 6, seed=6), _r(3, 2, seed=7)
        w2 = torch.einsum("ijkl,ip,jr->prkl", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    # A1111 make_kron: w1 unsqueezed for a conv w2, torch.kron
    expected = torch.kron(w1[:, :, None, None].contiguous(), w2.contiguous()) * 0.25
    got = _by_chunks("lokr", f, 0.25, 12, 8 * 9, 5).reshape(12, 8, 3, 3)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_full_and_norm():
    diff = _r(6, 5)
    torch.testing.assert_close(_by_chunks("full", {"diff": diff}, 1.0, 6, 5, 4), diff)
    w = _r(7)
    torch.testing.assert_close(_by_chunks("norm", {"w_norm": w}, 1.0, 7, 1, 3), w[:, None])


def test_scale_rules():
    assert module_scale("lora", 16.0, 8) == 2.0
    assert module_scale("lora", None, 8) == 1.0  # no alpha: alpha = rank
    assert module_scale("lora", 0.0, 8) == 1.0  # kohya and LyCORIS: alpha 0 means alpha = rank
    assert module_scale("lokr", 4.0, None) == 1.0  # LoKr with both factors full
    assert module_scale("full", 4.0, 2) == 1.0


def test_a_factor_that_does_not_fit_is_an_error():
    with pytest.raises(LoraMathError, match="columns"):
        delta_rows("lora", {"up": _r(4, 2), "down": _r(2, 5)}, 1.0, 0, 4, 6)


def test_dora_rows_and_columns_match_lycoris_apply_weight_decompose():
    w, d = _r(10, 6, seed=1), _r(10, 6, seed=2) * 0.1
    merged = w + d
    m_rows, m_cols = _r(10, 1, seed=3).abs() + 0.5, _r(1, 6, seed=4).abs() + 0.5
    # wd_on_out: the norm of each output row
    expected_rows = merged * (m_rows / (merged.norm(dim=1, keepdim=True) + DORA_EPS))
    got = torch.cat([dora_rows(merged[a : a + 3], m_rows, a, min(10, a + 3)) for a in range(0, 10, 3)])
    torch.testing.assert_close(got, expected_rows, rtol=1e-12, atol=1e-12)
    # per input channel: norms over every output row, summed chunk by chunk
    expected_cols = merged * (m_cols / (merged.norm(dim=0, keepdim=True) + DORA_EPS))
    sumsq = sum(dora_column_sumsq(merged[a : a + 4], 6) for a in range(0, 10, 4))
    got = torch.cat([dora_columns(merged[a : a + 4], m_cols, sumsq) for a in range(0, 10, 4)])
    torch.testing.assert_close(got, expected_cols, rtol=1e-12, atol=1e-12)
