"""DELLA drop masks (kernels/della.py) against sd-mecha 1.1.8's definition, and inside the TGMD kernel.

sd-mecha's ``find_della_dropout``: ranks = scipy ``rankdata(|delta|, method="ordinal")`` over the
whole tensor, ``p_keep = clamp(1 - p + (rank/n - (n+1)/(2n)) * della_eps, 0, 1)``. The oracle below
recomputes that with scipy and numpy; the kernel must match its ranks exactly and keep each entry
iff the counter-based draw is below that probability.
"""

from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from mergekit_sdxl.kernels.della import della_keep, della_keep_exact, della_sketch, keep_probability
from mergekit_sdxl.kernels.rng import keep_mask, uniform_bits
from mergekit_sdxl.kernels.tgmd import TGMDParams, merge_task_vectors, tensor_reader

F64 = torch.float64


def _sd_mecha_keep_probability(delta: np.ndarray, p: float, eps: float) -> np.ndarray:
    """sd-mecha 1.1.8 ties.py ``find_della_dropout`` before its ``torch.bernoulli``, in numpy float64."""
    rank = rankdata(np.abs(delta), method="ordinal").reshape(delta.shape)
    n = delta.size
    return np.clip(1.0 - p + (rank / n - (n + 1) / (n * 2)) * eps, 0.0, 1.0)


def _draws(seed: int, name: str, key: str, n: int) -> np.ndarray:
    return uniform_bits(seed, name, key, 0, n).numpy().astype(np.float64) * 2.0**-53


def _tied(n: int, seed: int) -> torch.Tensor:
    """A task vector as fp16 checkpoints give them: many exact zeros and repeated magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g, dtype=F64) * 8).round() / 8
    x[torch.rand(n, generator=g) < 0.3] = 0.0
    return x


@pytest.mark.parametrize("p,eps", [(0.1, -0.1), (0.5, 0.8), (0.5, 1.5), (0.0, -0.4)])
def test_masks_are_sd_mechas_probabilities_with_ordinal_ties(p, eps):
    delta = _tied(20_000, seed=1)
    want = _draws(7, "t.weight", "m", delta.numel()) < _sd_mecha_keep_probability(delta.numpy(), p, eps)
    got = della_keep_exact(delta.abs(), p, eps, seed=7, tensor_name="t.weight", model_key="m")
    assert np.array_equal(got.numpy(), want)
    # The sketched path (what a chunked merge runs) for any bucket count and chunk size.
    for buckets in (1, 2, 37, None, delta.numel()):
        sketch = della_sketch(delta.abs(), p, eps, seed=7, tensor_name="t.weight", model_key="m", buckets=buckets)
        for step in (1_000, 4_096, delta.numel()):
            parts = [della_keep(sketch, delta[s : s + step].abs(), s) for s in range(0, delta.numel(), step)]
            assert np.array_equal(torch.cat(parts).numpy(), want), (buckets, step)


def test_ranks_break_ties_by_index_like_rankdata_ordinal():
    # |delta| = [1, 0, 1, 0, 2]: ordinal ranks 3, 1, 4, 2, 5 (ties in index order).
    delta = torch.tensor([1.0, 0.0, -1.0, -0.0, 2.0], dtype=F64)
    assert rankdata(delta.abs().numpy(), method="ordinal").tolist() == [3, 1, 4, 2, 5]
    probs = keep_probability(torch.tensor([3, 1, 4, 2, 5]), 5, 0.5, 1.0)
    assert probs.tolist() == pytest.approx([0.5, 0.1, 0.7, 0.3, 0.9])
    u = _draws(0, "x", "m", 5)
    assert della_keep_exact(delta.abs(), 0.5, 1.0, seed=0, tensor_name="x", model_key="m").tolist() == (u < probs.numpy()).tolist()


@pytest.mark.parametrize("p,eps", [(0.1, -0.1), (0.3, 0.4), (0.5, 1.5)])
def test_keep_rate_per_magnitude_decile_follows_the_formula(p, eps):
    """Empirical keep rate of each tenth of the ranks, through a chunked merge, within 5 binomial sd."""
    n_rows, cols = 1000, 1000
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n_rows, cols, generator=g, dtype=F64)
    delta = torch.randn(n_rows, cols, generator=g, dtype=F64)
    params = TGMDParams(
        drop_rate=[p], density=[1.0], weight=[1.0], sign_election="none", aggregate="mean",
        drop_method="della", epsilon=[eps], seed=5,
    )
    out = merge_task_vectors("k", base.shape, tensor_reader(base), [tensor_reader(base + delta)], ["m"], params, F64, 37)
    kept = (out != base).reshape(-1).numpy()  # mean of one model: base + delta where kept, base where dropped
    n = kept.size
    order = np.argsort(np.abs(((base + delta) - base).reshape(-1).numpy()), kind="stable")
    rates = []
    for q in range(10):
        lo, hi = q * n // 10, (q + 1) * n // 10
        ranks = torch.arange(lo + 1, hi + 1)
        expected = float(keep_probability(ranks, n, p, eps).mean())
        observed = float(kept[order[lo:hi]].mean())
        sd = math.sqrt(max(expected * (1 - expected), 1e-12) / (hi - lo))
        assert abs(observed - expected) <= 5 * sd + 1e-12, (q, observed, expected)
        rates.append(observed)
    # eps < 0 keeps small task-vector entries more often than large ones (DGMLA moves toward the base).
    assert (rates[0] > rates[-1]) == (eps < 0)
    overall = float(keep_probability(torch.arange(1, n + 1), n, p, eps).mean())  # 1 - p unless clamped
    assert kept.mean() == pytest.approx(overall, abs=5 * math.sqrt(overall * (1 - overall) / n))
    if eps <= 2 * min(p, 1 - p):
        assert overall == pytest.approx(1 - p, abs=1e-9)


def _merge(params: TGMDParams, rows: int, kernel=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    base = torch.randn(64, 48, generator=g, dtype=torch.float32)
    models = [base + ((torch.randn(64, 48, generator=g) * 4).round() / 8) for _ in range(4)]
    return merge_task_vectors(
        "model.layers.0.w", base.shape, tensor_reader(base), [tensor_reader(m) for m in models],
        ["a", "b", "c", "d"], params, F64, rows, out_dtype=torch.float32, kernel=kernel,
    )


def _dgmla(**kw: Any) -> TGMDParams:
    d: Dict[str, Any] = dict(
        drop_rate=[0.1] * 4, density=[1.0] * 4, weight=[1.0] * 4, drop_method="della", epsilon=[-0.1] * 4, seed=9
    )
    d.update(kw)
    return TGMDParams(**d)


@pytest.mark.parametrize("kw", [{}, {"density": [0.5, 1.0, 0.3, 1.0]}, {"aggregate": "mean", "epsilon": [0.6, -0.2, 0.0, 1.0]}])
def test_della_merge_is_chunk_and_thread_independent(kw):
    params = _dgmla(**kw)
    reference = _merge(params, 64)
    threads = torch.get_num_threads()
    try:
        for rows, n_threads in ((1, 1), (5, 2), (17, 1), (63, 2)):
            torch.set_num_threads(n_threads)
            assert torch.equal(_merge(params, rows), reference), (rows, n_threads)
    finally:
        torch.set_num_threads(threads)
    # DELLA is drawn by the torch reference whichever kernel is asked for.
    assert torch.equal(_merge(params, 7, kernel="fused"), reference)
    assert not torch.equal(reference, _merge(_dgmla(**{**kw, "drop_method": "uniform"}), 64))


def test_epsilon_zero_is_uniform_drop():
    # The masks: bit for bit uniform DROP's, and its keep rate.
    mag = torch.rand(200_000, dtype=F64)
    della = della_keep_exact(mag, 0.25, 0.0, seed=4, tensor_name="t", model_key="m")
    assert torch.equal(della, keep_mask(4, "t", "m", 0, mag.numel(), 0.75))
    assert float(della.double().mean()) == pytest.approx(0.75, abs=5 * math.sqrt(0.75 * 0.25 / mag.numel()))
    sketch = della_sketch(mag, 0.25, 0.0, seed=4, tensor_name="t", model_key="m")
    assert sketch.exc_index.numel() == 0 and torch.equal(della_keep(sketch, mag, 0), della)
    # The merge: della with epsilon 0 gives the uniform method's bytes (and so may run fused).
    assert torch.equal(_merge(_dgmla(epsilon=[0.0] * 4), 9), _merge(_dgmla(drop_method="uniform"), 9))


def test_della_rescale_is_sd_mechas_one_over_one_minus_p():
    base = torch.zeros(50, 40, dtype=F64)
    delta = torch.randn(50, 40, generator=torch.Generator().manual_seed(2), dtype=F64)
    params = TGMDParams(
        drop_rate=[0.2], density=[1.0], weight=[1.0], rescale=1.0, sign_election="none", aggregate="mean",
        drop_method="della", epsilon=[0.3],
    )
    out = merge_task_vectors("k", base.shape, tensor_reader(base), [tensor_reader(delta)], ["m"], params, F64, 8)
    kept = out != 0
    assert 0 < int(kept.sum()) < delta.numel()
    assert torch.equal(out[kept], delta[kept] * (0.8**-1.0))


def test_drop_rate_one_drops_everything_whatever_epsilon():
    out = _merge(_dgmla(drop_rate=[1.0] * 4, epsilon=[0.9] * 4), 5)
    g = torch.Generator().manual_seed(11)
    base = torch.randn(64, 48, generator=g, dtype=torch.float32)
    assert torch.equal(out, base)


def test_a_bad_model_is_left_out_the_same_way_in_one_chunk_or_many():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 10, generator=g, dtype=F64)
    models = [base + torch.randn(12, 10, generator=g, dtype=F64) for _ in range(3)]
    models[1][7, 3] = float("nan")
    seen = []
    outs = []
    for rows in (12, 4):
        outs.append(
            merge_task_vectors(
                "k", base.shape, tensor_reader(base), [tensor_reader(m) for m in models], ["a", "b", "c"],
                _dgmla(drop_rate=[0.1] * 3, density=[1.0] * 3, weight=[1.0] * 3, epsilon=[-0.1] * 3),
                F64, rows, on_bad_input=lambda i, message: seen.append(i),
            )
        )
    assert seen == [1, 1] and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("n", [2, 7, 1000, 123_457])
def test_keep_probabilities_are_centred_on_one_minus_p_with_width_epsilon(n):
    """sd-mecha's window: p_keep(rank) = 1 - p + eps (rank - (n+1)/2) / n, from 1 - p - eps (n-1)/(2n)
    at the smallest |delta| to 1 - p + eps (n-1)/(2n) at the largest, mean exactly 1 - p (unclamped).
    The window is eps wide, half of mergekit's della (density -/+ eps, tests/host/test_della_mergekit.py),
    so an epsilon does not carry over between ``drop_method: della`` and mergekit's ``della``."""
    p, eps = 0.3, 0.4
    probs = keep_probability(torch.arange(1, n + 1), n, p, eps)
    half = eps * (n - 1) / (2 * n)
    assert float(probs[0]) == pytest.approx(1 - p - half, abs=1e-15)
    assert float(probs[-1]) == pytest.approx(1 - p + half, abs=1e-15)
    assert float(probs.mean()) == pytest.approx(1 - p, abs=1e-12)
    steps = probs.diff()
    assert torch.allclose(steps, torch.full_like(steps, eps / n), rtol=0, atol=1e-15)  # linear in the rank
    # epsilon < 0 (DGMLA) reverses it: small task-vector entries are kept more often.
    flipped = keep_probability(torch.arange(1, n + 1), n, p, -eps)
    assert torch.allclose(flipped, probs.flip(0), rtol=0, atol=1e-15)
    # Clamped into [0, 1] where the window leaves it (sd-mecha's clamp).
    wide = keep_probability(torch.arange(1, n + 1), n, 0.9, 1.5)
    assert float(wide.min()) >= 0.0 and float(wide.max()) <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_masks_are_the_cpu_masks():
    """Ranks, draws and the sketch's exceptions are exact on any device: the same keep bits."""
    delta = _tied(300_000, seed=8)
    cpu = della_keep_exact(delta.abs(), 0.1, -0.1, seed=3, tensor_name="t", model_key="m")
    gpu = delta.cuda().abs()
    assert torch.equal(della_keep_exact(gpu, 0.1, -0.1, seed=3, tensor_name="t", model_key="m").cpu(), cpu)
    sketch = della_sketch(gpu, 0.1, -0.1, seed=3, tensor_name="t", model_key="m")
    parts = [della_keep(sketch, gpu[s : s + 77_777], s).cpu() for s in range(0, gpu.numel(), 77_777)]
    assert torch.equal(torch.cat(parts), cpu)
    # And a chunked DGMLA merge with the mean (no Gram matrix) gives the CPU's bytes.
    params = _dgmla(aggregate="mean")
    g = torch.Generator().manual_seed(11)
    base = torch.randn(64, 48, generator=g, dtype=torch.float32)
    models = [base + ((torch.randn(64, 48, generator=g) * 4).round() / 8) for _ in range(4)]
    outs = []
    for device in ("cpu", "cuda"):
        b, ms = base.to(device), [m.to(device) for m in models]
        outs.append(
            merge_task_vectors(
                "model.layers.0.w", b.shape, tensor_reader(b), [tensor_reader(m) for m in ms], ["a", "b", "c", "d"],
                params, F64, 9, out_dtype=torch.float32,
            ).cpu()
        )
    assert torch.equal(outs[0], outs[1])
