"""mergekit's ``della`` / ``della_linear`` as merged within the budget (host/budgeted_methods.py)
against mergekit 0.1.5's own ``della_magprune`` run whole, fed the same random draws.

mergekit draws its DELLA masks with ``torch.bernoulli(probs)``; this plugin keeps an element iff
its counter-based draw ``u(seed, tensor, model, element) < probs``. Replacing mergekit's
``torch.bernoulli`` by that comparison makes mergekit's own code (ranks along dim 1, probabilities
in [density - epsilon, density + epsilon], L1 rescale, weights, sign consensus) produce what the
chunked merge must give bit for bit without rescale; anything the chunking changed in the
deterministic parts shows up as a differing byte. With ``rescale`` (mergekit's L1 norm match, a
per-tensor sum the chunked merge accumulates in another order) the factor agrees within 1e-6
relative, the issue's bound for per-tensor statistics, so an output differs by at most that and
one float32 rounding.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import pytest
import torch

from mergekit_sdxl.host.budgeted_methods import BuiltinKey, merge_builtin
from mergekit_sdxl.host.mergekit_api import ParameterScope, TensorEntry, TensorGroup, TensorMetadata, get_method
from mergekit_sdxl.kernels.memory_plan import MemoryPlan
from mergekit_sdxl.kernels.rng import uniform_bits

NAME = "k.weight"
SEED = 21
TINY = MemoryPlan(budget_bytes=1 << 20)  # the floor: many chunks per key below


def _inputs(shape: Sequence[int], n_models: int) -> Dict[str, torch.Tensor]:
    """float32 base and fine-tunes: no tied magnitudes, so mergekit's unstable argsort ranks like ours."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(tuple(shape), generator=g)
    out = {"base": base}
    for i in range(1, n_models + 1):
        out[f"m{i}"] = base + 0.02 * torch.randn(tuple(shape), generator=g)
    return out


class _SameDraws:
    """``torch.bernoulli`` for mergekit's della_magprune: model by model (mergekit sparsifies the
    task vectors in input order), keep iff the plugin's draw for that element is below ``probs``."""

    def __init__(self, model_keys: List[str]) -> None:
        self.pending = list(model_keys)
        self.probs: Dict[str, torch.Tensor] = {}
        self.masks: Dict[str, torch.Tensor] = {}

    def __call__(self, probs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert not args and not kwargs
        model = self.pending.pop(0)
        self.probs[model] = probs.clone()
        u = uniform_bits(SEED, NAME, model, 0, probs.numel()).to(torch.float64).mul_(2.0**-53)
        self.masks[model] = (u.reshape(probs.shape) < probs.to(torch.float64)).to(probs.dtype)
        return self.masks[model].clone()


def _mergekit_whole(
    method: Any, tensors: Dict[str, torch.Tensor], shared: Dict[str, Any], per: Dict[str, Any], monkeypatch
) -> Tuple[torch.Tensor, _SameDraws]:
    ids = list(tensors)
    draws = _SameDraws(ids[1:])
    monkeypatch.setattr(torch, "bernoulli", draws)  # mergekit.sparsify calls torch.bernoulli
    group = TensorGroup(
        entries=tuple(TensorEntry(id=i, tensor=tensors[i], is_base=i == "base") for i in ids),
        metadata=TensorMetadata(name=NAME),
    )
    params: Dict[str, Any] = dict(shared)
    for p in method.spec.input_parameters:
        scope = ids if p.scope == ParameterScope.INPUT else ids[1:]
        params[p.name] = {i: per[p.name][i] if isinstance(per[p.name], dict) else per[p.name] for i in scope}
    (result,) = method((group,), parameters=params, dtype=torch.float32, out_dtype=torch.float32)
    monkeypatch.undo()
    assert not draws.pending, "mergekit drew once per model"
    return result, draws


def _chunked(method: Any, tensors: Dict[str, torch.Tensor], shared: Dict[str, Any], per: Dict[str, Any]) -> torch.Tensor:
    shape = tuple(next(iter(tensors.values())).shape)

    def reader(t: torch.Tensor):
        flat = t.reshape(t.shape[0], -1)
        return lambda a, b: flat[a:b]

    key = BuiltinKey(
        name=NAME, shape=shape, readers=tuple((i, reader(t)) for i, t in tensors.items()), base="base",
        dtype=torch.float32, out_dtype=torch.float32, plan=TINY, seed=SEED,
    )

    def value(model: Any, name: str) -> Any:
        v = per[name]
        return v[str(model)] if isinstance(v, dict) else v

    return merge_builtin(method, key, shared, value)


def _assert_same(got: torch.Tensor, want: torch.Tensor, tensors: Dict[str, torch.Tensor], draws: _SameDraws, exact: bool) -> None:
    """Bitwise, or: each rescaled task vector within 1e-6 relative, plus the final float32 rounding.

    The bound per element is 1e-6 * sum_i factor_i |delta_i| (factor_i mergekit's L1 factor): weights,
    the ties divisor and lambda never enlarge a term in these cases (weights <= 1, lambda <= 1)."""
    if exact:
        assert torch.equal(got, want)
        return
    scale = torch.zeros_like(want)
    for model, mask in draws.masks.items():
        delta = (tensors[model] - tensors["base"]).reshape(mask.shape)
        factor = delta.abs().sum() / (delta * mask).abs().sum()
        scale += (factor * delta.abs()).reshape(want.shape)
    ulp = torch.nextafter(want.abs(), torch.tensor(float("inf"))) - want.abs()
    assert bool(((got - want).abs() <= 1e-6 * scale + ulp).all())
    assert float((got != want).double().mean()) < 0.2  # mostly the same bytes: same masks, near-same factor


CASES = [
    ("della", {}, {"weight": 0.5, "density": 0.6, "epsilon": 0.2}),
    ("della", {"rescale": False, "lambda": 0.8}, {"weight": {"m1": 0.3, "m2": 0.9, "m3": 0.5}, "density": 0.4, "epsilon": 0.1}),
    ("della_linear", {}, {"weight": 0.5, "density": {"m1": 0.7, "m2": 0.5, "m3": 0.3}, "epsilon": {"m1": 0.05, "m2": 0.3, "m3": 0.25}}),
    ("della_linear", {"rescale": False, "normalize": False}, {"weight": 0.4, "density": 0.5, "epsilon": 0.4}),
]


@pytest.mark.parametrize("name, given, per", CASES)
@pytest.mark.parametrize("shape", [(2048, 96), (96, 40, 3, 3), (3000,)])
def test_chunked_della_is_mergekits_della_with_the_same_draws(name, given, per, shape, monkeypatch):
    method = get_method(name)
    tensors = _inputs(shape, 3)
    shared = {p.name: given.get(p.name, p.default) for p in method.spec.shared_parameters}
    want, draws = _mergekit_whole(method, tensors, shared, per, monkeypatch)
    got = _chunked(method, tensors, shared, per)
    _assert_same(got, want, tensors, draws, exact=not shared["rescale"])
    # The deterministic part mergekit defines: keep probabilities span [density - eps, density + eps]
    # linearly in the magnitude rank along dim 1 (rank 1 the smallest |delta|).
    for model, p in draws.probs.items():
        density = per["density"][model] if isinstance(per["density"], dict) else per["density"]
        eps = per["epsilon"][model] if isinstance(per["epsilon"], dict) else per["epsilon"]
        delta = (tensors[model] - tensors["base"]).reshape(p.shape)
        n = p.shape[1]
        rank = delta.abs().argsort(dim=1).argsort(dim=1).to(torch.float64)
        assert torch.allclose(p.to(torch.float64), density - eps + 2 * eps * rank / (n - 1), atol=1e-6)
        assert abs(float(p.amin()) - (density - eps)) < 1e-6 and abs(float(p.amax()) - (density + eps)) < 1e-6


def test_rescale_is_mergekits_l1_norm_match_not_one_over_keep_probability(monkeypatch):
    """mergekit 0.1.5 rescales a DELLA-dropped task vector to the L1 norm of the whole one (one
    factor per tensor), not by 1 / p_i per element as the DELLA paper writes it."""
    method = get_method("della_linear")
    tensors = _inputs((512, 64), 1)
    per = {"weight": 1.0, "density": 0.5, "epsilon": 0.3}
    shared = {p.name: p.default for p in method.spec.shared_parameters}
    assert shared["rescale"] is True  # mergekit's default for della / della_linear
    want, draws = _mergekit_whole(method, tensors, shared, per, monkeypatch)
    got = _chunked(method, tensors, shared, per)
    _assert_same(got, want, tensors, draws, exact=False)
    delta = tensors["m1"] - tensors["base"]
    out = got - tensors["base"]
    kept = out != 0
    ratio = out[kept] / delta[kept]
    assert float(ratio.std()) < 1e-3 * float(ratio.mean())  # one factor for the whole tensor
    assert float(out.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4)
