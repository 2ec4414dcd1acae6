"""Issue 15: ``mergekit-sdxl merge --ray-address``: the keys as Ray jobs, the same bytes.

Every Ray merge is compared, by sha256, with a single-process merge of the same config into a
file of the same name (the name is in the metadata). Ray starts in seconds and its workers
import mergekit once each, so one local cluster of 2 workers (``cluster``) serves the in-process
merges of this module; the CLI runs (the path a user takes) start their own.

The scheduler's rules (the window, largest first, output order) are checked without Ray against
a fake of the three calls it makes; the missing-extra error needs no Ray either.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import pytest
import yaml

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is an optional extra: pip install 'mergekit-sdxl[ray]'")

BIN = Path(sys.executable).parent
OUT_NAME = "merged.safetensors"  # the same file name everywhere: its stem is in the metadata
WIDTH = 1 / 32  # ~13.5 MB per input
SMALL_BUDGET = "16MB"  # the smallest budget: the larger keys are read in row chunks from the files


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray_merge")


@pytest.fixture(scope="module")
def configs(work) -> Dict[str, Path]:
    """tgmd (float64, DROP + geometric median) and ties_soup over a base and two fine-tunes."""
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    base, a, b = (work / f"{name}.safetensors" for name in ("base", "a", "b"))
    write_synthetic_sdxl(base, width=WIDTH, seed=0)
    write_synthetic_sdxl(a, width=WIDTH, seed=1, base=base)
    write_synthetic_sdxl(b, width=WIDTH, seed=2, base=base)
    parameters = {
        "tgmd": {"seed": 240603, "density": 1.0, "drop_rate": 0.1, "aggregate": "median"},
        "ties_soup": {"seed": 7},
    }
    paths = {}
    for method, params in parameters.items():
        config = {
            "merge_method": method,
            "base_model": {"model": {"path": str(base)}},
            "models": [{"model": {"model": {"path": str(p)}}} for p in (a, b)],
            "parameters": params,
            "dtype": "float64" if method == "tgmd" else "float32",
        }
        paths[method] = work / f"{method}.yaml"
        paths[method].write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


@pytest.fixture(autouse=True)
def _hash_cache(work, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(work / "hash-cache"))


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster of 2 worker CPUs for the in-process merges of this module."""
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


_REFERENCES: Dict[Tuple[str, Optional[str]], str] = {}


def _merge(config: Path, out: Path, budget: Optional[str], ray_settings: Any = None):
    from mergekit_sdxl.host.driver import run_sdxl_merge
    from mergekit_sdxl.host.mergekit_api import MergeOptions

    out.parent.mkdir(parents=True, exist_ok=True)
    return run_sdxl_merge(
        config.read_text(), str(out), MergeOptions(quiet=True), overrides={"memory_budget": budget}, ray=ray_settings
    )


def _reference(configs, work: Path, method: str, budget: Optional[str]) -> str:
    """sha256 of the single-process merge (computed once per config and budget)."""
    key = (method, budget)
    if key not in _REFERENCES:
        out = work / f"single-{method}-{budget}" / OUT_NAME
        result = _merge(configs[method], out, budget)
        assert result.write.sha256 == _sha256(out)
        _REFERENCES[key] = result.write.sha256
    return _REFERENCES[key]


@pytest.fixture
def ray_runs(monkeypatch) -> List[Any]:
    """The :class:`RayRunStats` of every Ray merge the test runs."""
    from mergekit_sdxl.host import driver, ray_merge

    runs: List[Any] = []

    def recorded(*args, **kwargs):
        stats = ray_merge.ray_stream_merge(*args, **kwargs)
        runs.append(stats)
        return stats

    monkeypatch.setattr(driver, "ray_stream_merge", recorded)
    return runs


# --------------------------------------------------------------------------- same bytes


@pytest.mark.slow
@needs_ray
@pytest.mark.parametrize(("method", "budget"), [("tgmd", SMALL_BUDGET), ("ties_soup", None)])
def test_ray_merge_gives_the_single_process_bytes(configs, work, cluster, ray_runs, method, budget):
    from mergekit_sdxl.host.ray_merge import RaySettings

    expected = _reference(configs, work, method, budget)
    out = work / f"ray-{method}-{budget}" / OUT_NAME
    result = _merge(configs[method], out, budget, RaySettings(address="local"))
    assert _sha256(out) == result.write.sha256 == expected
    (stats,) = ray_runs
    assert stats.workers == 2
    assert 2 < stats.jobs < 2515  # small keys are batched, large ones are jobs of their own
    assert result.bytes_read == stats.bytes_read > 0  # every input byte was read by the workers
    assert 0 <= stats.connect_seconds <= stats.first_result_seconds <= stats.seconds < result.seconds


@pytest.mark.slow
def test_the_small_budget_reads_keys_in_chunks_from_the_files(configs):
    """The precondition of the chunked case above: under 16 MB the largest keys of these inputs
    are merged from row chunks read from the files (the plan's own rule), not loaded whole."""
    import torch
    from safetensors import safe_open

    from mergekit_sdxl.kernels.memory_plan import MemoryPlan
    from mergekit_sdxl.workflow.options import parse_bytes

    base = yaml.safe_load(configs["tgmd"].read_text())["base_model"]["model"]["path"]
    with safe_open(base, "pt") as handle:
        shape = handle.get_slice("conditioner.embedders.1.model.token_embedding.weight").get_shape()
    plan = MemoryPlan(budget_bytes=parse_bytes(SMALL_BUDGET))
    assert not plan.merge_whole(shape, 3, torch.float64, stored_itemsize=2)
    assert MemoryPlan(budget_bytes=parse_bytes("1GB")).merge_whole(shape, 3, torch.float64, stored_itemsize=2)


@pytest.mark.slow
@needs_ray
def test_a_small_window_bounds_what_waits_for_the_writer(configs, work, cluster, ray_runs):
    from mergekit_sdxl.host.ray_merge import RaySettings

    expected = _reference(configs, work, "tgmd", SMALL_BUDGET)
    out = work / "ray-window" / OUT_NAME
    window = 256 * 1024
    _merge(configs["tgmd"], out, SMALL_BUDGET, RaySettings(address="local", window_bytes=window))
    assert _sha256(out) == expected
    (stats,) = ray_runs
    # The largest output tensor of these inputs (the CLIP-G token embedding) is ~3.9 MB fp16.
    assert 0 < stats.max_unwritten_bytes <= window + 4 * 2**20, stats


@pytest.mark.slow
@needs_ray
def test_an_interrupted_ray_merge_resumes_with_only_the_pending_keys(configs, work, cluster, ray_runs, monkeypatch):
    from mergekit_sdxl.host import ray_merge
    from mergekit_sdxl.host.ray_merge import RaySettings
    from mergekit_sdxl.io.writer import StreamingCheckpointWriter

    expected = _reference(configs, work, "ties_soup", None)
    out = work / "ray-resume" / OUT_NAME

    class DriverLost(Exception):
        pass

    real_write = StreamingCheckpointWriter.write
    calls = {"n": 0}

    def write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] > 1500:
            raise DriverLost()
        real_write(self, name, tensor)

    planned: List[int] = []  # entries each Ray merge made jobs of
    real_plan_jobs = ray_merge.plan_jobs

    def plan_jobs(order, targets, entries):
        jobs = real_plan_jobs(order, targets, entries)
        planned.append(sum(len(job.names) for job in jobs))
        return jobs

    monkeypatch.setattr(ray_merge, "plan_jobs", plan_jobs)
    monkeypatch.setattr(StreamingCheckpointWriter, "write", write)
    with pytest.raises(DriverLost):
        _merge(configs["ties_soup"], out, None, RaySettings(address="local"))
    assert not out.exists() and Path(str(out) + ".partial").exists()
    monkeypatch.setattr(StreamingCheckpointWriter, "write", real_write)
    result = _merge(configs["ties_soup"], out, None, RaySettings(address="local"))
    assert _sha256(out) == result.write.sha256 == expected
    assert planned == [2515, 2515 - 1500]  # the resumed merge submitted only the keys not yet written
    (resumed,) = ray_runs  # the interrupted run returned no stats
    assert resumed.bytes_read > 0


# --------------------------------------------------------------------------- the CLI, faults


def _children(pid: int) -> List[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _titles(pid: int) -> List[Tuple[Any, str]]:
    """``(process, title)`` of the Ray processes under ``pid`` (workers: ``ray::IDLE`` or ``ray::TASK``)."""
    import psutil

    found = []
    for child in _children(pid):
        try:
            title = child.cmdline()
        except psutil.Error:
            continue
        if title and title[0].startswith("ray::"):
            found.append((child, title[0].split()[0]))
    return found


def _start_cli(config: Path, out: Path, work: Path, budget: Optional[str]) -> subprocess.Popen:
    """``mergekit-sdxl merge CONFIG OUT --ray-address local --ray-workers 2``, in a session of its own
    (its Ray processes can be killed with it)."""
    args = [str(BIN / "mergekit-sdxl"), "merge", str(config), str(out), "--ray-address", "local"]
    args += ["--ray-workers", "2", "--quiet"] + (["--memory-budget", budget] if budget else [])
    env = dict(os.environ, MERGEKIT_SDXL_CACHE_DIR=str(work / "hash-cache"))
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


def _end_session(proc: subprocess.Popen) -> None:
    """Kill what is left of the CLI's session (a lost driver's Ray agents outlive it)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _journaled(journal: Path) -> int:
    from mergekit_sdxl.io.journal import JournalError, read_journal

    try:
        return read_journal(journal).completed if journal.exists() else 0
    except (JournalError, OSError):  # being replaced
        return 0


@pytest.mark.slow
@needs_ray
def test_a_lost_driver_resumes_and_a_killed_worker_is_replaced_to_the_same_bytes(configs, work):
    """``mergekit-sdxl merge --ray-address local --ray-workers 2``, twice (one Ray start-up each):

    1. the driver is SIGKILLed once its journal holds a key (its Ray agents outlive it); until
       then the local cluster has exactly the 2 worker processes asked for;
    2. the same command resumes the partial output; one worker is SIGKILLed while it merges (its
       title is ``ray::_merge_job`` only then): Ray reruns the job, and the merge finishes with
       the single-process bytes.

    Which keys a resumed Ray merge submits: ``test_an_interrupted_ray_merge_resumes_with_only_the_pending_keys``.
    """
    from mergekit_sdxl.io.writer import journal_path_for

    expected = _reference(configs, work, "tgmd", SMALL_BUDGET)
    out = work / "ray-faults" / OUT_NAME
    out.parent.mkdir()
    partial = Path(str(out) + ".partial")
    journal = journal_path_for(partial)
    first = _start_cli(configs["tgmd"], out, work, SMALL_BUDGET)
    workers: set = set()
    killed: Optional[int] = None
    try:
        done, deadline = 0, time.monotonic() + 240
        # The journal is checkpointed at the first key written, then every 16 MiB or 5 s.
        while first.poll() is None and done < 1 and time.monotonic() < deadline:
            workers.update(c.pid for c, title in _titles(first.pid) if title in ("ray::IDLE", "ray::_merge_job"))
            done = _journaled(journal)
            time.sleep(0.01)
        assert first.poll() is None and done >= 1, f"rc {first.poll()}, {done} keys journaled"
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert not out.exists() and partial.exists()
        assert len(workers) == 2, workers  # --ray-workers 2

        # The same command, while the lost driver's leftovers still run.
        second = _start_cli(configs["tgmd"], out, work, SMALL_BUDGET)
        try:
            while second.poll() is None and killed is None and time.monotonic() < deadline:
                busy = [c for c, title in _titles(second.pid) if title == "ray::_merge_job"]
                if busy:
                    busy[0].kill()
                    killed = busy[0].pid
                time.sleep(0.005)
            stdout, stderr = second.communicate(timeout=300)
        finally:
            _end_session(second)
    finally:
        _end_session(first)
    assert killed is not None, f"no worker was seen merging; rc {second.returncode}\n{stderr}"
    assert second.returncode == 0, stderr
    resumed = re.search(r"resuming: (\d+) of 2515 tensors done", stderr)
    assert resumed and int(resumed.group(1)) >= done, stderr
    assert f"sha256 {expected}" in stdout
    assert _sha256(out) == expected


def test_without_ray_the_option_fails_before_any_work_in_one_line(configs, work, monkeypatch):
    from click.testing import CliRunner

    from mergekit_sdxl.cli.main import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # ``import ray`` raises ImportError
    out = work / "no-ray" / OUT_NAME
    result = CliRunner().invoke(cli(), ["merge", str(configs["tgmd"]), str(out), "--ray-address", "local"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: --ray-address needs Ray, an optional extra: pip install 'mergekit-sdxl[ray]'"], (
        result.output
    )
    assert not out.parent.exists()  # refused before the output folder was even made


def test_ray_workers_needs_an_address():
    from mergekit_sdxl.errors import UsageError
    from mergekit_sdxl.host.ray_merge import ray_settings

    assert ray_settings(None, None) is None
    with pytest.raises(UsageError, match="--ray-workers: give --ray-address too"):
        ray_settings(None, 2)


def test_a_node_with_other_package_versions_is_refused():
    """Other torch or mergekit versions may round differently: a worker refuses the job."""
    import torch

    from mergekit_sdxl.host.ray_merge import RayMergeError, _check_same_versions, _versions

    _check_same_versions(_versions())
    with pytest.raises(RayMergeError, match=rf"has torch {re.escape(torch.__version__)}, the driver 2\.0\.0; install the same"):
        _check_same_versions((("torch", "2.0.0"),))


def test_an_address_where_no_cluster_listens_is_refused_at_once():
    import socket

    from mergekit_sdxl.host.ray_merge import RayMergeError, _probe

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(RayMergeError, match=rf"127\.0\.0\.1:{port}: nothing answers there .*ray start --head"):
        _probe(f"127.0.0.1:{port}")


# --------------------------------------------------------------------------- the scheduler


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64", "int64"])
@pytest.mark.parametrize("shape", [(), (0,), (3, 5), (2, 3, 1, 1)])
def test_tensors_travel_to_the_driver_bit_for_bit(dtype, shape):
    import torch

    from mergekit_sdxl.host.ray_merge import _from_wire, _to_wire

    tensor = (torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 1e3).to(
        getattr(torch, dtype)
    )
    if tensor.numel():
        tensor.view(-1)[0] = float("nan") if tensor.is_floating_point() else -(2**62)
    wire = _to_wire(tensor.t() if tensor.dim() == 2 else tensor)  # a non-contiguous view too
    back = _from_wire(wire)
    expected = tensor.t() if tensor.dim() == 2 else tensor
    assert back.dtype == expected.dtype and back.shape == expected.shape
    as_bytes = expected.contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(back.contiguous().reshape(-1).view(torch.uint8), as_bytes)


class _FakeRay:
    """The calls the driver loop makes (``remote``, ``wait``, ``get``): jobs finish in a random
    order, a few at a time, as on a cluster."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.submitted: List[int] = []
        self.running: List[int] = []
        self.most_running = 0
        self.exceptions = SimpleNamespace(RayTaskError=_Never, OutOfMemoryError=_Never, RayError=_Never)

    def remote(self, setup: Any, targets: Tuple[Any, ...]) -> int:
        index = targets[0].index
        self.submitted.append(index)
        self.running.append(index)
        self.most_running = max(self.most_running, len(self.running))
        return index

    def wait(self, refs: List[int], num_returns: int, fetch_local: bool) -> Tuple[List[int], List[int]]:
        assert not fetch_local  # finished tensors stay in the object store until their turn
        done = self.random.choice(refs)
        self.running.remove(done)
        return [done], [r for r in refs if r != done]

    def get(self, ref: int) -> Tuple[List[Any], int]:
        import torch

        from mergekit_sdxl.host.ray_merge import _to_wire

        assert ref not in self.running
        return [_to_wire(torch.tensor([ref], dtype=torch.int64))], 10


class _Never(Exception):
    pass


class _Writer:
    def __init__(self) -> None:
        self.names: List[str] = []

    def write(self, name: str, value: Any) -> None:
        if value.numel():  # a job's value (markers are empty): job i's is [i]
            assert value.tolist() == [int(name[3:])], (name, value)
        self.names.append(name)


@pytest.mark.parametrize("seed", range(5))
def test_jobs_inside_the_window_go_largest_first_and_are_written_in_order(seed):
    from mergekit_sdxl.host.ray_merge import _Job, _Run

    rng = random.Random(100 + seed)
    jobs = []
    for i in range(200):
        marker = rng.random() < 0.05  # entries no job computes (v_pred markers): written by the driver
        target = SimpleNamespace(index=i)
        cost, size = (0, 0) if marker else (rng.randint(1, 10**6), rng.randint(1, 5000))
        jobs.append(
            _Job(index=i, names=(f"key{i:03d}",), targets=() if marker else (target,), cost=cost, out_bytes=size)
        )
    window, in_flight = 40_000, 4
    ray, writer = _FakeRay(seed), _Writer()
    bar = SimpleNamespace(update=lambda n: None, set_postfix_str=lambda *a, **k: None)
    run = _Run(ray, ray, None, jobs, writer, window, in_flight, max_retries=3)
    run.execute(bar)

    assert writer.names == [f"key{i:03d}" for i in range(200)]
    computed = [j.index for j in jobs if j.targets]
    assert sorted(ray.submitted) == computed  # each job once
    assert ray.most_running <= in_flight
    largest = max(j.out_bytes for j in jobs)
    assert 0 < run.max_unwritten <= window + largest
    assert run.bytes_read == 10 * len(computed)
    # Largest first: when a job is submitted, every unsubmitted job before it in the output is
    # inside the window too (the window is a prefix from the first unwritten job), so none of
    # them may cost more.
    out_of_order = sum(1 for a, b in zip(ray.submitted, ray.submitted[1:], strict=False) if b < a)
    assert out_of_order > 0  # the order is not simply the output order
    for n, index in enumerate(ray.submitted):
        waiting_costlier = [j for j in ray.submitted[n + 1 :] if j < index and jobs[j].cost > jobs[index].cost]
        assert not waiting_costlier, (index, waiting_costlier[:3])
