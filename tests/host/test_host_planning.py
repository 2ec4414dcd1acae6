"""In-process unit tests of the host: the memory plan's decisions, the one binding path, the
SDXL planner's task choice, and that a key merged whole and the same key read in row chunks
from the files give the same bytes."""

from __future__ import annotations

import pytest
import torch
import yaml

from mergekit_sdxl.kernels.memory_plan import MemoryPlan

MiB = 1024 * 1024


# ------------------------------------------------------------------ the memory plan


def test_whole_or_chunked_follows_the_working_set_rule():
    plan = MemoryPlan(budget_bytes=64 * MiB)
    # 1000 x 1000 float64 with 4 inputs: 8e6 * (4 + 3) = 56 MB > 32 MB (half the budget).
    assert plan.whole_tensor_bytes((1000, 1000), 4, torch.float64) == 1000 * 1000 * 8 * 7
    assert not plan.merge_whole((1000, 1000), 4, torch.float64)
    # float32 halves it: 28 MB <= 32 MB.
    assert plan.merge_whole((1000, 1000), 4, torch.float32)
    assert MemoryPlan().merge_whole((100_000, 10_000), 117, torch.float64)  # no budget: never from files


def test_chunk_rows_fit_a_quarter_of_the_budget():
    plan = MemoryPlan(budget_bytes=64 * MiB)
    rows = plan.rows_per_chunk((1000, 1000), 4, torch.float64)
    assert rows * 1000 * 8 * 4 * 4 <= plan.chunk_bytes < (rows + 1) * 1000 * 8 * 4 * 4
    assert plan.chunk_bytes == 16 * MiB
    assert plan.rows_per_chunk((3,), 4, torch.float64) == 3  # a 1-D key: its elements are rows, all fit
    assert MemoryPlan(budget_bytes=1).chunk_bytes == MiB  # never below 1 MiB


def test_peak_estimate_is_the_whole_working_set_or_one_chunk():
    plan = MemoryPlan(budget_bytes=64 * MiB)
    out = 1000 * 1000 * 2
    assert plan.peak_bytes((1000, 1000), 4, torch.float64, torch.float16) == plan.chunk_bytes + out
    assert plan.peak_bytes((100, 100), 4, torch.float64, torch.float16) == 100 * 100 * 8 * 7 + 100 * 100 * 2


def test_threads_change_only_when_the_plan_may():
    configured = torch.get_num_threads()
    if configured == 1:
        pytest.skip("one thread: nothing to change")
    with MemoryPlan(adjust_threads=True).threads_for(10):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == configured
    with MemoryPlan(adjust_threads=False).threads_for(10):
        assert torch.get_num_threads() == configured


def test_plan_is_immutable_and_hashable():
    plan = MemoryPlan(budget_bytes=64 * MiB)
    with pytest.raises(AttributeError):
        plan.budget_bytes = 1  # type: ignore[misc]
    assert hash(plan) == hash(MemoryPlan(budget_bytes=64 * MiB))


# ------------------------------------------------------------------ binding


def test_binding_validates_with_mergekit_and_keeps_model_order():
    from mergekit_sdxl.host.methods import bind_parameters, build_methods

    tgmd = next(m for m in build_methods() if m.spec.name == "tgmd")
    shared = {p.name: p.default for p in tgmd.spec.shared_parameters}
    values = {
        "b": {"drop_rate": 0.2, "density": 1.0, "weight": 2.0, "epsilon": 0.0},
        "a": {"drop_rate": 0.1, "density": 0.5, "weight": 1.0, "epsilon": 0.0},
    }
    bound = bind_parameters(tgmd.spec, shared, lambda m, name: values[m][name], ["a", "b"])
    assert bound.per_model["drop_rate"] == (0.1, 0.2)
    assert bound.per_model["weight"] == (1.0, 2.0)
    assert bound.shared["seed"] == 0
    values["a"]["drop_rate"] = 1.5
    with pytest.raises(Exception, match="1"):  # mergekit's ParameterSpec.validate refuses it
        bind_parameters(tgmd.spec, shared, lambda m, name: values[m][name], ["a", "b"])


def test_mask_identity_is_the_model_as_written():
    from mergekit_sdxl.host.mergekit_api import ModelReference
    from mergekit_sdxl.host.methods import mask_identity

    ref = ModelReference.model_validate({"model": {"path": "/m/a.safetensors"}})
    assert mask_identity(ref) == str(ref) == "/m/a.safetensors"


# ------------------------------------------------------------------ the SDXL planner


@pytest.fixture
def tiny_merge(synthetic_sdxl_factory, tmp_path):
    base = synthetic_sdxl_factory("base", seed=0, width=1 / 32)
    models = [synthetic_sdxl_factory(f"m{i}", seed=i, base=base, width=1 / 32) for i in (1, 2)]
    config = {
        "merge_method": "tgmd",
        "base_model": {"model": {"path": str(base)}},
        "models": [{"model": {"model": {"path": str(m)}}} for m in models],
        "parameters": {"drop_rate": 0.2, "seed": 5},
        "dtype": "float64",
    }
    return yaml.safe_dump(config), base, models


def _plan(text: str, budget: int):
    from mergekit_sdxl.host.driver import input_paths, load_config
    from mergekit_sdxl.host.merge_planning import plan_merge
    from mergekit_sdxl.host.mergekit_api import MergeOptions
    from mergekit_sdxl.host.planner import SDXLRules
    from mergekit_sdxl.host.plugin import register_all

    register_all()
    loaded = load_config(text)
    rules = SDXLRules(options=loaded.sdxl, plan=MemoryPlan(budget_bytes=budget))
    files = [p for p, _ in input_paths(loaded.config, loaded.sdxl)]
    return plan_merge(loaded.config, MergeOptions(), rules, files)


def test_planner_picks_the_task_for_each_kind_of_key(tiny_merge):
    from mergekit_sdxl.host.tasks import DonorTensor, MergeKeyTask, PositionIds

    text, base, _ = tiny_merge
    planned = _plan(text, budget=16 * MiB)
    tasks = {name: target.tensor_task for name, target in planned.targets}
    assert len(planned.entries) == 2515
    assert [e.name for e in planned.entries] == sorted(e.name for e in planned.entries)
    assert isinstance(tasks["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"], PositionIds)
    vae = tasks["first_stage_model.decoder.conv_out.weight"]
    assert isinstance(vae, DonorTensor) and vae.model.model.path == str(base)
    assert isinstance(tasks["conditioner.embedders.1.model.logit_scale"], DonorTensor)
    unet = tasks["model.diffusion_model.input_blocks.4.1.proj_in.weight"]
    assert isinstance(unet, MergeKeyTask) and not unet.from_files
    embedding = tasks["conditioner.embedders.1.model.token_embedding.weight"]
    assert isinstance(embedding, MergeKeyTask) and embedding.from_files  # over the 16 MiB plan
    assert embedding.plan == MemoryPlan(budget_bytes=16 * MiB)


def test_a_key_merged_whole_and_from_files_gives_the_same_bytes(tiny_merge):
    from mergekit_sdxl.host.mergekit_api import LoaderCache
    from mergekit_sdxl.host.tasks import MergeKeyTask

    text, _, _ = tiny_merge
    key = "conditioner.embedders.1.model.token_embedding.weight"
    planned = _plan(text, budget=16 * MiB)
    task = dict(planned.targets)[key].tensor_task
    assert isinstance(task, MergeKeyTask) and task.from_files
    from_files = task.execute()
    tensors = task.merge.gather_tensors.execute()
    whole = task.model_copy(update={"from_files": False, "plan": MemoryPlan()}).execute(tensors=tensors)
    assert from_files.dtype == whole.dtype == torch.float64
    assert torch.equal(from_files, whole)
    LoaderCache.loaders.clear()
