"""mergekit's built-in methods in row chunks (host/budgeted_methods.py) against the same methods
run whole by mergekit, in this process: bitwise where mergekit's statistics are recomputed exactly,
1e-6 relative for sce / model_stock, and the random methods by their statistics and by chunk
independence."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import pytest
import torch

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.host import budgeted_methods as bm
from mergekit_sdxl.host.budgeted_methods import BuiltinKey, merge_builtin
from mergekit_sdxl.host.mergekit_api import ParameterScope, TensorEntry, TensorGroup, TensorMetadata, get_method
from mergekit_sdxl.kernels.memory_plan import MemoryPlan
from mergekit_sdxl.kernels.rng import keep_mask

IDS = ("base", "m1", "m2", "m3")
SMALL = MemoryPlan(budget_bytes=16 << 20)  # 4 MiB chunks: several per key below
TINY = MemoryPlan(budget_bytes=1 << 20)  # 1 MiB chunks (the floor): many more


def _inputs(shape: Sequence[int], n_models: int = 3, seed: int = 0, dtype=torch.float16) -> Dict[str, torch.Tensor]:
    """A base and ``n_models`` fine-tunes of it, stored as ``dtype`` (fp16: many tied magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tuple(shape), generator=g)
    out = {"base": base.to(dtype)}
    for i in range(1, n_models + 1):
        out[f"m{i}"] = (base + 0.02 * torch.randn(tuple(shape), generator=g)).to(dtype)
    return out


def _shared(method: Any, given: Dict[str, Any]) -> Dict[str, Any]:
    """Every shared parameter, as mergekit's planner resolves them (defaults filled in)."""
    return {p.name: given.get(p.name, p.default) for p in method.spec.shared_parameters}


def _whole(method: Any, tensors: Dict[str, torch.Tensor], shared: Dict[str, Any], per: Dict[str, Any], dtype) -> torch.Tensor:
    """mergekit's own result on the whole tensors (the reference)."""
    ids = list(tensors)
    group = TensorGroup(
        entries=tuple(TensorEntry(id=i, tensor=tensors[i], is_base=i == "base") for i in ids),
        metadata=TensorMetadata(name="k.weight"),
    )
    params: Dict[str, Any] = dict(shared)
    for p in method.spec.input_parameters:
        params[p.name] = {i: per[p.name] for i in (ids if p.scope == ParameterScope.INPUT else ids[1:])}
    (result,) = method((group,), parameters=params, dtype=dtype, out_dtype=torch.float32)
    return result


class _Reads:
    """Row readers over in-memory tensors that record which row ranges were read."""

    def __init__(self) -> None:
        self.ranges: List[Tuple[int, int]] = []

    def reader(self, t: torch.Tensor):
        flat = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)

        def rows(a: int, b: int) -> torch.Tensor:
            self.ranges.append((a, b))
            return flat[a:b]

        return rows


def _chunked(
    method: Any,
    tensors: Dict[str, torch.Tensor],
    shared: Dict[str, Any],
    per: Dict[str, Any],
    dtype,
    plan: MemoryPlan = SMALL,
    seed: int = 0,
) -> Tuple[torch.Tensor, _Reads]:
    reads = _Reads()
    shape = tuple(next(iter(tensors.values())).shape)
    key = BuiltinKey(
        name="k.weight",
        shape=shape,
        readers=tuple((i, reads.reader(t)) for i, t in tensors.items()),
        base="base" if "base" in tensors else None,
        dtype=dtype,
        out_dtype=torch.float32,
        plan=plan,
        seed=seed,
    )
    return merge_builtin(method, key, shared, lambda m, p: per[p]), reads


def _chunks_of(reads: _Reads) -> int:
    return len({r for r in reads.ranges if r[1] - r[0] > 1})


EXACT = [
    ("ties", {}, {"weight": 0.5, "density": 0.4}),
    ("ties", {"rescale": True, "normalize": False, "lambda": 0.7}, {"weight": 0.3, "density": 0.25}),
    ("breadcrumbs", {}, {"weight": 0.5, "density": 0.5, "gamma": 0.05}),
    ("breadcrumbs_ties", {"rescale": True}, {"weight": 0.4, "density": 0.6, "gamma": 0.01}),
    ("breadcrumbs_ties", {}, {"weight": 0.4, "density": 0.0, "gamma": 0.01}),
    ("task_arithmetic", {"lambda": 0.5}, {"weight": 0.7, "density": 1.0}),
    ("linear", {}, {"weight": 0.25}),
    ("model_stock", {"filter_wise": True}, {}),
]


@pytest.mark.parametrize("name, given, per", EXACT)
@pytest.mark.parametrize("dtype", [torch.float32, None])  # None: mergekit computes in the stored fp16
def test_chunked_is_bitwise_mergekit(name, given, per, dtype):
    method = get_method(name)
    tensors = _inputs((2048, 96))
    shared = _shared(method, given)
    want = _whole(method, tensors, shared, per, dtype)
    got, reads = _chunked(method, tensors, shared, per, dtype)
    assert _chunks_of(reads) > 3, "the key must be merged in several chunks"
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("shape", [(64, 40, 3, 3), (1000,), (37, 250)])
@pytest.mark.parametrize("name, given, per", [EXACT[0], EXACT[2], EXACT[-1]])
def test_chunked_is_bitwise_for_other_shapes(name, given, per, shape):
    """Conv weights (dim 1 is not the chunked one), vectors and odd row lengths."""
    method = get_method(name)
    tensors = _inputs(shape, seed=3)
    shared = _shared(method, given)
    want = _whole(method, tensors, shared, per, torch.float32)
    got, _ = _chunked(method, tensors, shared, per, torch.float32, plan=TINY)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name, given, per", [EXACT[0], EXACT[3], EXACT[5]])
def test_sums_over_many_models_keep_their_order(name, given, per):
    """Nine float32 models (torch's sum over them rounds, and in another order in a chunk's tail
    of fewer than 32 elements) and rows of 75: bitwise only because chunks hold multiples of 128
    elements."""
    method = get_method(name)
    tensors = _inputs((3000, 75), n_models=9, seed=2, dtype=torch.float32)
    shared = _shared(method, given)
    want = _whole(method, tensors, shared, per, torch.float32)
    got, reads = _chunked(method, tensors, shared, per, torch.float32, plan=TINY)
    assert _chunks_of(reads) > 10 and torch.equal(got, want)


def test_nearswap_is_bitwise_mergekit():
    method = get_method("nearswap")
    tensors = _inputs((2048, 96), n_models=1)
    shared = _shared(method, {"t": 0.01})
    want = _whole(method, tensors, shared, {}, torch.float32)
    got, reads = _chunked(method, tensors, shared, {}, torch.float32, plan=TINY)
    assert _chunks_of(reads) > 3 and torch.equal(got, want)


@pytest.mark.parametrize(
    "name, given",
    [("model_stock", {}), ("sce", {"select_topk": 0.3}), ("sce", {"select_topk": 1.0}), ("sce", {"int8_mask": True, "select_topk": 0.5})],
)
@pytest.mark.parametrize("shape", [(2048, 96), (64, 40, 3, 3)])
def test_statistics_methods_agree_with_mergekit(name, given, shape):
    """float64 chunk-independent statistics vs mergekit's float32 sums: 1e-6 relative."""
    method = get_method(name)
    tensors = _inputs(shape, seed=5)
    shared = _shared(method, given)
    want = _whole(method, tensors, shared, {}, torch.float32)
    got, _ = _chunked(method, tensors, shared, {}, torch.float32, plan=TINY)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-6 * scale
    again, _ = _chunked(method, tensors, shared, {}, torch.float32, plan=SMALL)
    assert torch.equal(got, again), "the statistics do not depend on the chunking"


def test_sce_selection_matches_mergekit_exactly():
    """The top-k of the variances is taken on the same whole variance tensor as mergekit's."""
    from mergekit.merge_methods.sce import sce_mask

    tensors = _inputs((2048, 96), seed=9)
    tvs = torch.stack([tensors[i].float() - tensors["base"].float() for i in IDS[1:]])
    view = bm._View(
        BuiltinKey("k", (2048, 96), tuple((i, _Reads().reader(t)) for i, t in tensors.items()), "base", torch.float32, None, TINY),
        copies=8,
    )
    ours = bm._SCE._selection(view, 0.3)
    assert torch.equal(ours.reshape(2048, 96), sce_mask(tvs, 0.3, torch.float32).bool())


# ----------------------------------------------------------------------------- random methods


def _one_model_drop(name: str, per: Dict[str, Any], given: Dict[str, Any], plan=SMALL, seed=0, shape=(2048, 96)):
    method = get_method(name)
    tensors = _inputs(shape, n_models=1, seed=11, dtype=torch.float32)
    shared = _shared(method, {"normalize": False, **given})
    got, reads = _chunked(method, tensors, shared, {"weight": 1.0, **per}, torch.float32, plan=plan, seed=seed)
    delta = tensors["m1"] - tensors["base"]
    return got - tensors["base"], delta, reads


def test_dare_keeps_density_and_rescales_l1():
    out, delta, _ = _one_model_drop("dare_linear", {"density": 0.3}, {"rescale": False})
    kept = out != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5
    assert torch.allclose(out[kept], delta[kept], rtol=1e-6, atol=1e-7)  # survivors unchanged (+/- base rounding)
    rescaled, delta, _ = _one_model_drop("dare_linear", {"density": 0.3}, {"rescale": True})
    assert torch.equal(rescaled != 0, kept), "the same mask with and without rescale"
    # mergekit's L1 rescale: the dropped task vector keeps the whole one's L1 norm.
    assert abs(rescaled.abs().sum().item() / delta.abs().sum().item() - 1.0) < 1e-5


def test_della_keep_rate_follows_the_rank_along_dim_1():
    """mergekit's della_magprune: p = density - eps + 2 eps (rank - 1) / (n - 1), ranks of |delta|
    within each row."""
    out, delta, _ = _one_model_drop("della_linear", {"density": 0.5, "epsilon": 0.3}, {"rescale": False}, shape=(4096, 100))
    ranks = delta.abs().argsort(dim=1, stable=True).argsort(dim=1)
    kept = out != 0
    for decile in range(10):
        sel = (ranks >= decile * 10) & (ranks < decile * 10 + 10)
        expected = 0.2 + 0.6 * (decile * 10 + 4.5) / 99
        rate = kept[sel].float().mean().item()
        assert abs(rate - expected) < 4 * (expected * (1 - expected) / int(sel.sum())) ** 0.5 + 1e-3, (decile, rate, expected)


def test_della_with_epsilon_zero_is_dare():
    """One counter-based draw per element: DELLA's rank-dependent threshold degenerates to DARE's."""
    della, _, _ = _one_model_drop("della_linear", {"density": 0.6, "epsilon": 0.0}, {"rescale": True})
    dare, _, _ = _one_model_drop("dare_linear", {"density": 0.6}, {"rescale": True})
    assert torch.equal(della, dare)


def test_dare_mask_is_the_counter_based_mask_of_the_model():
    out, delta, _ = _one_model_drop("dare_linear", {"density": 0.4}, {"rescale": False}, seed=77)
    want = keep_mask(77, "k.weight", "m1", 0, delta.numel(), 0.4).reshape(delta.shape)
    assert torch.equal((out != 0) | (delta == 0), want | (delta == 0))


@pytest.mark.parametrize(
    "name, per",
    [
        ("dare_ties", {"weight": 0.5, "density": 0.7}),
        ("dare_linear", {"weight": 0.5, "density": 0.7}),
        ("della", {"weight": 0.5, "density": 0.6, "epsilon": 0.2}),
        ("della_linear", {"weight": 0.5, "density": 0.6, "epsilon": 0.2}),
    ],
)
@pytest.mark.parametrize("shape", [(2048, 96), (64, 40, 3, 3), (1000,)])
def test_random_methods_do_not_depend_on_chunks_and_follow_the_seed(name, per, shape):
    method = get_method(name)
    tensors = _inputs(shape, seed=13)
    shared = _shared(method, {})
    a, reads = _chunked(method, tensors, shared, per, torch.float32, plan=TINY, seed=5)
    b, _ = _chunked(method, tensors, shared, per, torch.float32, plan=MemoryPlan(budget_bytes=1 << 30), seed=5)
    assert torch.equal(a, b)
    c, _ = _chunked(method, tensors, shared, per, torch.float32, plan=TINY, seed=6)
    assert not torch.equal(a, c)
    # Same scale as mergekit's own (torch-generator) result: same method, other draws.
    want = _whole(method, tensors, shared, per, torch.float32)
    base = tensors["base"].float()
    ours, theirs = (a - base).abs().mean().item(), (want - base).abs().mean().item()
    assert abs(ours / theirs - 1) < 0.1


def test_della_density_and_epsilon_out_of_range_is_a_user_error():
    method = get_method("della")
    tensors = _inputs((64, 32))
    with pytest.raises(UsageError, match="density"):
        _chunked(method, tensors, _shared(method, {}), {"weight": 1.0, "density": 0.1, "epsilon": 0.2}, torch.float32)


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("cols", [1, 48, 80, 720, 11520, 100])
def test_chunks_hold_multiples_of_128_elements(cols):
    for step in (1, 3, 50, 333, 10_000):
        rows = 5000
        got = bm._aligned(step, rows, cols)
        assert got == rows or (got * cols) % 128 == 0
        assert got <= max(step, 128)


def test_row_sums_do_not_depend_on_the_chunking():
    x = torch.randn(3, 5003, dtype=torch.float64)

    def total(step: int) -> torch.Tensor:
        sums = bm._RowSums()
        for r0 in range(0, x.shape[1], step):
            sums.add(x[:, r0 : r0 + step])
        return sums.total(3)

    first = total(7)
    for step in (1, 100, 1024, 4000, 6000):
        assert torch.equal(total(step), first)
    assert torch.allclose(first, x.sum(dim=1))


def test_budgeted_covers_the_issue_methods():
    names = ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce"]
    assert all(bm.budgeted(get_method(n)) for n in names)
    assert not any(bm.budgeted(get_method(n)) for n in ("linear", "task_arithmetic", "slerp", "karcher"))
    assert {"linear", "task_arithmetic", "passthrough", "nearswap"} == set(bm.ELEMENTWISE)
