"""``dgmla`` in mergekit's registry: AstolfoMix-XL's DGMLA operator (DELLA drop p = 0.1,
epsilon -0.1, no rescale, identity vote, geometric median) with those defaults, through mergekit's
Python API against the kernel."""

from __future__ import annotations

import torch

from mergekit_sdxl.kernels.tgmd import TGMDParams, tgmd_merge

IDS = ["base", "m1", "m2", "m3", "m4"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g, dtype=torch.float64)
    return base, [base + 0.1 * torch.randn(64, 48, generator=g, dtype=torch.float64) for _ in range(4)]


def _merge(method: str, **parameters) -> torch.Tensor:
    from mergekit.merge_methods import merge_tensors

    base, models = _inputs()
    return merge_tensors(
        [base, *models], method, base_index=0, ids=IDS, name="layer.weight", parameters=parameters, dtype=torch.float64
    )


def test_dgmla_is_registered_with_the_astolfomix_defaults():
    from mergekit.merge_methods import registry

    from mergekit_sdxl.host import plugin

    plugin.register_all()
    spec = registry.get("dgmla").spec
    defaults = {p.name: p.default for p in spec.parameters}
    assert {k: defaults[k] for k in ("drop_method", "drop_rate", "epsilon", "rescale", "sign_election", "aggregate")} == {
        "drop_method": "della",
        "drop_rate": 0.1,
        "epsilon": -0.1,
        "rescale": 0.0,
        "sign_election": "count",
        "aggregate": "median",
    }
    assert (defaults["density"], defaults["weight"], defaults["lambda"]) == (1.0, 1.0, 1.0)
    # tgmd keeps uniform DROP by default: its bytes do not change.
    tgmd = {p.name: p.default for p in registry.get("tgmd").spec.parameters}
    assert (tgmd["drop_method"], tgmd["epsilon"]) == ("uniform", 0.0)


def test_dgmla_by_name_is_the_della_kernel():
    base, models = _inputs()
    got = _merge("dgmla", seed=11)
    params = TGMDParams(
        drop_rate=[0.1] * 4, density=[1.0] * 4, weight=[1.0] * 4, drop_method="della", epsilon=[-0.1] * 4, seed=11
    )
    expected = tgmd_merge(base, models, params, torch.float64, tensor_name="layer.weight", model_keys=IDS[1:])
    assert torch.equal(got, expected)
    # The same merge as tgmd with DELLA asked for, and not tgmd's uniform DROP.
    assert torch.equal(got, _merge("tgmd", seed=11, drop_method="della", epsilon=-0.1))
    assert not torch.equal(got, _merge("tgmd", seed=11))
    # epsilon 0: DELLA's masks are uniform DROP's, so dgmla is tgmd.
    assert torch.equal(_merge("dgmla", seed=11, epsilon=0.0), _merge("tgmd", seed=11))


def test_the_recipe_writes_the_x215a_reference_with_dgmlas_defaults():
    """``mergekit-sdxl recipe --method dgmla``: the registered operator plus the x215a run's seed."""
    from mergekit.merge_methods import registry

    from mergekit_sdxl.host import plugin
    from mergekit_sdxl.workflow.recipe import METHOD_PARAMETERS

    plugin.register_all()
    defaults = {p.name: p.default for p in registry.get("dgmla").spec.parameters}
    reference = dict(METHOD_PARAMETERS["dgmla"])
    assert reference.pop("seed") == 241011  # x215a: ties_sum_with_dropout(..., seed=241011)
    assert reference == {k: defaults[k] for k in reference}
