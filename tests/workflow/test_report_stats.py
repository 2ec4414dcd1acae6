"""The report's statistics: per-key accumulation, per-block / per-component tables, flags and the
clustering order, against worked examples and direct numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergekit_sdxl.workflow.report_stats import (
    KeyAccumulator,
    ReportCollector,
    cluster_order,
    cosine_matrix,
    report_block_of,
    report_block_order,
)

UNET = "model.diffusion_model."
CLIP_L = "conditioner.embedders.0.transformer.text_model."
CLIP_G = "conditioner.embedders.1.model."


@pytest.mark.parametrize(
    ("key", "block"),
    [
        (UNET + "input_blocks.4.1.proj_in.weight", "IN04"),
        (UNET + "input_blocks.0.0.weight", "IN00"),
        (UNET + "middle_block.1.norm.bias", "M00"),
        (UNET + "output_blocks.8.0.skip_connection.weight", "OUT08"),
        (UNET + "out.2.weight", "OUT08"),
        (UNET + "time_embed.0.weight", "BASE"),
        (CLIP_L + "encoder.layers.3.mlp.fc1.weight", "clip_l.03"),
        (CLIP_L + "encoder.layers.11.layer_norm1.bias", "clip_l.11"),
        (CLIP_L + "embeddings.token_embedding.weight", "clip_l.other"),
        (CLIP_G + "transformer.resblocks.31.attn.in_proj_weight", "clip_g.31"),
        (CLIP_G + "text_projection", "clip_g.other"),
        ("first_stage_model.decoder.conv_in.weight", "VAE"),
    ],
)
def test_block_ids(key, block):
    assert report_block_of(key) == block
    assert block in report_block_order()


def test_block_order_is_unet_then_text_encoders_then_vae():
    order = report_block_order()
    assert order[:2] == ("BASE", "IN00") and order[10] == "M00" and order[19] == "OUT08"
    assert order[20] == "clip_l.00" and order[32] == "clip_l.other" and order[33] == "clip_g.00"
    assert order[-2:] == ("clip_g.other", "VAE") and len(order) == len(set(order)) == 20 + 13 + 33 + 1


def test_sign_agreement_worked_example():
    # element:        0   1   2   3   4
    d = torch.tensor(
        [
            [1.0, -1.0, 0.0, 2.0, 1.0],
            [1.0, 1.0, 0.0, -1.0, 1.0],
            [-1.0, 1.0, 0.0, 3.0, -5.0],
        ]
    )
    # count: + + (no votes) + +  -> each sign held by 2 of 3 votes except element 2: 4 of 5 agree.
    acc = KeyAccumulator(3, "count")
    acc.update(torch.zeros(5), d)
    assert acc.result().sign_agree_fraction == pytest.approx(4 / 5)
    # sum: element 4 elects - (1 + 1 - 5), held by 1 of 3 votes: 3 of 5 agree.
    acc = KeyAccumulator(3, "sum")
    acc.update(torch.zeros(5), d)
    assert acc.result().sign_agree_fraction == pytest.approx(3 / 5)


def test_a_tie_is_no_agreement():
    acc = KeyAccumulator(2)
    acc.update(torch.zeros(2), torch.tensor([[1.0, 1.0], [-1.0, 2.0]]))
    assert acc.result().sign_agree_fraction == pytest.approx(0.5)


def test_key_accumulator_matches_numpy_for_any_chunking():
    rng = np.random.default_rng(3)
    n, k = 5, 70_001  # more than one canonical Gram block, and a ragged tail
    base = rng.normal(size=k)
    deltas = rng.normal(size=(n, k)) * np.array([0.5, 1, 2, 0.01, 3])[:, None]
    merged = base + 0.3 * rng.normal(size=k)
    results = []
    for step in (k, 4096, 30_000):
        acc = KeyAccumulator(n)
        for start in range(0, k, step):
            sl = slice(start, start + step)
            acc.update(torch.from_numpy(base[sl]), torch.from_numpy(deltas[:, sl]), torch.from_numpy(merged[sl]))
        results.append(acc.result())
    for stats in results:
        np.testing.assert_allclose(stats.gram.numpy(), deltas @ deltas.T, rtol=1e-12)
        assert stats.base_norm_sq == pytest.approx(float(base @ base), rel=1e-12)
        assert stats.change_norm_sq == pytest.approx(float((merged - base) @ (merged - base)), rel=1e-12)
        signs = np.sign(deltas)
        pos, neg = (signs > 0).sum(0), (signs < 0).sum(0)
        elected = np.sign(pos - neg)
        shared = np.where(elected > 0, pos, np.where(elected < 0, neg, 0))
        assert stats.sign_agree_fraction == pytest.approx(float(np.mean(2 * shared > pos + neg)))
        assert stats.elements == k
    # The Gram matrix is re-blocked canonically: chunking does not change a bit of it.
    assert all(torch.equal(results[0].gram, r.gram) for r in results[1:])


def test_key_accumulator_without_merged_rows_has_no_change():
    acc = KeyAccumulator(1)
    acc.update(torch.ones(3), torch.ones(1, 3))
    assert acc.result().change_norm_sq is None


def test_cosine_matrix_of_a_zero_vector():
    g = torch.tensor([[4.0, 0.0, 2.0], [0.0, 0.0, 0.0], [2.0, 0.0, 1.0]], dtype=torch.float64)
    cos = cosine_matrix(g)
    assert cos[0][2] == pytest.approx(1.0) and cos[0][1] == 0.0 and cos[1][1] == 1.0


def test_cluster_order_puts_pairs_together():
    # 0 and 2 are near-copies, 1 and 3 are near-copies, the two pairs are unrelated.
    sim = [
        [1.0, 0.0, 0.95, 0.1],
        [0.0, 1.0, 0.05, 0.9],
        [0.95, 0.05, 1.0, 0.0],
        [0.1, 0.9, 0.0, 1.0],
    ]
    assert cluster_order(sim) == [0, 2, 1, 3]
    assert cluster_order([[1.0]]) == [0]


def test_cluster_order_average_linkage_worked_example():
    # Points on a line at 0, 1, 5, 6.2, 20 (distance = |a - b|, similarity = 1 - distance): first
    # {0,1} (d=1), then {5,6.2} (1.2), then average linkage joins {0,1} and {5,6.2}
    # (mean of 5, 6.2, 4, 5.2 = 5.1) before 20 (mean distance 19.5 to {0,1}).
    x = [5.0, 20.0, 0.0, 6.2, 1.0]
    sim = [[1.0 - abs(a - b) for b in x] for a in x]
    assert cluster_order(sim) == [0, 3, 2, 4, 1]


def _collector(n: int = 3) -> ReportCollector:
    return ReportCollector(
        [f"m{i}.safetensors" for i in range(n)],
        base="base.safetensors",
        method="tgmd",
        statistics_from="test",
        block_change_from="test",
        median_weight_from="test",
    )


def test_collector_tables_against_direct_computation():
    rng = np.random.default_rng(0)
    # Two UNet keys in two blocks and one CLIP-L key; task vectors of 3 inputs.
    keys = {
        UNET + "input_blocks.1.0.in_layers.2.weight": ("IN01", "unet", 40),
        UNET + "output_blocks.3.0.out_layers.3.bias": ("OUT03", "unet", 25),
        CLIP_L + "encoder.layers.2.mlp.fc1.weight": ("clip_l.02", "clip_l", 30),
    }
    collector = _collector()
    vectors, bases, changes, coeffs = {}, {}, {}, {}
    for name, (block, component, size) in keys.items():
        d = rng.normal(size=(3, size))
        b = rng.normal(size=size)
        m = b + rng.normal(size=size) * 0.1
        c = rng.dirichlet(np.ones(3))
        vectors[name], bases[name], changes[name], coeffs[name] = d, b, m - b, c
        collector.add_key(
            name,
            block_id=block,
            component=component,
            gram=torch.from_numpy(d @ d.T),
            median_coeffs=c.tolist(),
            base_norm_sq=float(b @ b),
            change_norm_sq=float((m - b) @ (m - b)),
            sign_agree_fraction=0.25,
            elements=size,
        )
    report = collector.build()
    assert report["inputs"] == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]
    assert report["blocks"] == ["IN01", "OUT03", "clip_l.02"]
    unet = np.concatenate([vectors[k] for k in list(keys)[:2]], axis=1)
    whole = np.concatenate(list(vectors.values()), axis=1)
    for component, data in (("unet", unet), ("model", whole), ("clip_l", vectors[list(keys)[2]])):
        norms = np.linalg.norm(data, axis=1)
        np.testing.assert_allclose(report["task_vector_norm"][component], norms, rtol=1e-12)
        np.testing.assert_allclose(report["similarity"][component], (data @ data.T) / np.outer(norms, norms), rtol=1e-12)
    base_model = np.concatenate(list(bases.values()))
    assert report["base_norm"]["model"] == pytest.approx(float(np.linalg.norm(base_model)))
    np.testing.assert_allclose(
        report["relative_task_vector_norm"]["model"], np.linalg.norm(whole, axis=1) / np.linalg.norm(base_model)
    )
    assert report["similarity"]["clip_g"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # no CLIP-G key
    for name, (block, _component, _size) in keys.items():
        expected = np.linalg.norm(changes[name]) / np.linalg.norm(bases[name])
        assert report["block_change"][block] == pytest.approx(float(expected), rel=1e-12)
        np.testing.assert_allclose(report["median_weight"]["blocks"][block], coeffs[name])
        assert report["sign_agreement"][block] == pytest.approx(0.25)
    sizes = np.array([40, 25, 30], dtype=float)
    stacked = np.stack([coeffs[k] for k in keys])
    np.testing.assert_allclose(report["median_weight"]["components"]["model"], (stacked * sizes[:, None]).sum(0) / sizes.sum())
    np.testing.assert_allclose(
        report["median_weight"]["components"]["unet"], (stacked[:2] * sizes[:2, None]).sum(0) / sizes[:2].sum()
    )
    assert report["elements"] == {"model": 95, "unet": 65, "clip_l": 30, "clip_g": 0}
    assert report["keys"] == 3 and report["format"] == "mergekit-sdxl-report/1"


def test_flags():
    # m1 is a copy of m0 (cosine 1), m2 barely moved the base, m3's median weight is tiny.
    d = np.array([[1.0, 2.0, 0.0], [1.0, 2.0, 0.001], [1e-4, 0.0, 0.0], [0.0, -3.0, 1.0]])
    collector = ReportCollector(
        ["a", "b", "c", "d"], base="base", method="tgmd", statistics_from="t", block_change_from="t"
    )
    collector.add_key(
        UNET + "middle_block.0.in_layers.0.weight",
        block_id="M00",
        component="unet",
        gram=torch.from_numpy(d @ d.T),
        median_coeffs=[0.4, 0.4, 0.19, 0.01],
        base_norm_sq=100.0,  # ||B|| = 10: c is at 1e-5 of it
        change_norm_sq=1.0,
        sign_agree_fraction=1.0,
        elements=3,
    )
    flags = collector.build()["flags"]
    assert [f["inputs"] for f in flags["near_duplicates"]] == [["a", "b"]]
    assert flags["near_duplicates"][0]["cosine"] > 0.99
    assert [(f["input"], round(f["relative_norm"], 8)) for f in flags["near_base"]] == [("c", 1e-5)]
    assert [f["input"] for f in flags["median_outliers"]] == ["d"]
    assert flags["median_outliers"][0]["mean"] == pytest.approx(0.25)


def test_no_median_weights_for_a_method_without_a_median():
    collector = ReportCollector(["a", "b"], base="base", method="ties_soup", statistics_from="t", block_change_from="t")
    collector.add_key(
        UNET + "out.0.weight", block_id="OUT08", component="unet", gram=torch.eye(2, dtype=torch.float64),
        median_coeffs=None, base_norm_sq=4.0, change_norm_sq=None, sign_agree_fraction=0.5, elements=2,
    )
    report = collector.build()
    assert report["median_weight"] is None and report["flags"]["median_outliers"] == []
    assert report["block_change"] == {"OUT08": None}  # no merged values given


def test_add_key_refuses_wrong_shapes_and_repeats():
    collector = _collector(2)
    arguments = dict(
        block_id="M00", component="unet", median_coeffs=None, base_norm_sq=1.0, change_norm_sq=0.0,
        sign_agree_fraction=0.5, elements=1,
    )
    with pytest.raises(ValueError, match=r"gram must be \[2, 2\]"):
        collector.add_key("k", gram=torch.eye(3), **arguments)
    collector.add_key("k", gram=torch.eye(2), **arguments)
    with pytest.raises(ValueError, match="twice"):
        collector.add_key("k", gram=torch.eye(2), **arguments)
    with pytest.raises(ValueError, match="no key"):
        _collector(2).build()
    assert math.isfinite(collector.build()["block_change"]["M00"])
