"""``mergekit-sdxl report CONFIG``: one streaming pass over a merge's inputs into a ReportCollector.

Per merged key (the keys the merge merges: not ``position_ids`` or ``logit_scale``, not the VAE
unless ``sdxl.vae.source: merge``), the base and every input are read in row chunks sized by the
merge's memory plan (``--memory-budget``), upcast to float64 one chunk at a time, and
``workflow/report_stats.KeyAccumulator`` sums the Gram matrix of the raw task vectors
``X_i - B`` (an input lacking the key: a zero vector; non-finite elements of an input: zero, with
a warning), the base's and the change's squared norms and the sign agreement (the method's
``sign_election``: count, or sum).

Median weights (median methods: tgmd with ``aggregate: median``, geometric_median) are
``weiszfeld_gram`` run per key on that Gram matrix, with the config's scalar ``weight``, ``eps``,
``maxiter`` and ``ftol`` (gradients and filters fall back to the defaults). For geometric_median
these are the merge's own weights up to rounding (the median's coefficients do not change when
every point moves by -B); for tgmd they are the weights of the raw task vectors, before the
merge's DROP, trim and sign masks: ``merge --report`` reports the merge's own.

Block change ``||merged - base|| / ||base||`` needs the merged result:

- ``merged=FILE`` (``--merged``): read from a finished merge, as saved;
- otherwise the merge is run in memory by mergekit's planner with the SDXL rules, exactly as
  ``mergekit-sdxl merge`` runs it (the same tasks, values cast to the save dtype; nothing is
  written), key by key, each key's statistics read right after its merge (so the inputs are read
  by the merge and by the pass, the second time mostly from the page cache). This adds the
  merge's own compute to the pass: give ``--merged`` when the merge exists.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from mergekit_sdxl.errors import InputDataError, UsageError
from mergekit_sdxl.host.checkpoint import SDXLCheckpointLoader, checkpoint_index, is_checkpoint_file
from mergekit_sdxl.host.driver import LoadedConfig, input_paths, load_config
from mergekit_sdxl.host.merge_report import is_merged_key
from mergekit_sdxl.host.plugin import register_all
from mergekit_sdxl.host.validate import validate_config
from mergekit_sdxl.kernels.geomedian import weiszfeld_gram
from mergekit_sdxl.kernels.memory_plan import MemoryPlan
from mergekit_sdxl.kernels.tgmd import rows_cols
from mergekit_sdxl.sdxl.families import MERGEABLE_FAMILIES
from mergekit_sdxl.sdxl.manifest import SDXL_KEYS, component_of
from mergekit_sdxl.workflow.preflight import preflight
from mergekit_sdxl.workflow.report_stats import MEDIAN_METHODS, KeyAccumulator, ReportCollector, report_block_of

LOG = logging.getLogger(__name__)

__all__ = ["ReportJob", "prepare_report", "run_report", "add_keys_from_output", "is_merged_key"]

RowsOf = Callable[[int, int], torch.Tensor]

_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_DEFAULT_AGGREGATE = {"tgmd": "median", "ties_soup": "mean", "dgmla": "median", "geometric_median": "median"}


@dataclass(frozen=True)
class ReportJob:
    """A checked report: the config, its base and models (config order), an optional merged file."""

    source: str
    loaded: LoadedConfig
    base: str
    models: Tuple[str, ...]
    merged: Optional[str]
    plan: MemoryPlan

    @property
    def vae_merged(self) -> bool:
        return self.loaded.sdxl.vae.source == "merge"

    def reads(self) -> List[Tuple[str, str]]:
        """``(path, what)`` of every file the report reads (for the output guard)."""
        pairs = [(self.base, "the base model"), *((m, "the input model") for m in self.models)]
        pairs += [(p, "the VAE donor") for p, role in input_paths(self.loaded.config, self.loaded.sdxl) if role == "vae"]
        if self.merged is not None:
            pairs.append((self.merged, "the merged model"))
        if os.path.isfile(self.source):
            pairs.append((self.source, "the config file"))
        return pairs


def prepare_report(
    config_text: str,
    *,
    source: str,
    overrides: Optional[Dict[str, Any]] = None,
    merged: Optional[str] = None,
) -> ReportJob:
    """Validate the config and its inputs' headers (nothing is read whole); raise a UserError on a problem."""
    register_all()
    validate_config(config_text, source=source, sha256_of=None, verify_pins=False)
    loaded = load_config(config_text, overrides, source=source)
    roles = input_paths(loaded.config, loaded.sdxl)
    if any(role == "lora" for _, role in roles):
        raise UsageError(
            f"config {source}: its models are LoRAs on a base (lora: entries), which this pass cannot read: "
            "write their report with `mergekit-sdxl merge CONFIG OUT.safetensors --report DIR`"
        )
    missing = [p for p, _ in roles if not is_checkpoint_file(p)]
    if missing:
        raise UsageError("inputs not found or not .safetensors files: " + ", ".join(missing))
    bases = [p for p, role in roles if role == "base"]
    if not bases:
        raise UsageError(f"config {source}: a report needs base_model (task vectors are each input minus the base)")
    models = tuple(p for p, role in roles if role == "model")
    if not models:
        raise UsageError(f"config {source}: no input besides the base model")
    if merged is not None and not is_checkpoint_file(merged):
        raise UsageError(f"--merged {merged}: not found or not a .safetensors file")
    report = preflight(
        [Path(p) for p, _ in roles] + ([Path(merged)] if merged else []),
        base=Path(bases[0]),
        allow_vpred_mix=loaded.sdxl.allow_vpred_mix,
        families=MERGEABLE_FAMILIES,
    )
    LOG.info("%s", report.summary())
    plan = MemoryPlan(budget_bytes=loaded.sdxl.memory_budget_bytes, adjust_threads=True)
    return ReportJob(source=source, loaded=loaded, base=bases[0], models=models, merged=merged, plan=plan)


@dataclass(frozen=True)
class _MethodView:
    """What the report pass takes from the method's parameters (scalars only)."""

    name: str
    sign_election: str
    median: bool
    weights: Tuple[float, ...]
    eps: float
    maxiter: int
    ftol: float


def _scalar(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _method_view(job: ReportJob) -> _MethodView:
    config = job.loaded.config
    method = str(config.merge_method)
    shared: Mapping[str, Any] = dict(config.parameters or {})
    election = shared.get("sign_election")
    aggregate = shared.get("aggregate", _DEFAULT_AGGREGATE.get(method))
    per_model: Dict[str, Any] = {}
    for entry in config.models or ():
        per_model.setdefault(entry.model.model.path, dict(entry.parameters or {}).get("weight"))
    default_weight = _scalar(shared.get("weight"))
    weights = []
    for path in job.models:
        weight = _scalar(per_model.get(path))
        weights.append(weight if weight is not None else default_weight if default_weight is not None else 1.0)
    if not any(w > 0 for w in weights) or any(w < 0 for w in weights):
        weights = [1.0] * len(job.models)
    maxiter = _scalar(shared.get("maxiter"))
    eps = _scalar(shared.get("eps"))
    ftol = _scalar(shared.get("ftol"))
    return _MethodView(
        name=method,
        sign_election=election if election in ("count", "sum") else "count",
        median=method in MEDIAN_METHODS and aggregate == "median",
        weights=tuple(weights),
        eps=eps if eps is not None and eps > 0 else 1e-6,
        maxiter=int(maxiter) if maxiter is not None and maxiter >= 0 else 100,
        ftol=ftol if ftol is not None and ftol >= 0 else 1e-20,
    )


def _merged_keys(job: ReportJob) -> List[Tuple[str, Tuple[int, ...]]]:
    index = checkpoint_index(job.base)
    names = [k for k in index.shapes if is_merged_key(k, job.vae_merged) and index.dtypes.get(k) in _FLOAT_DTYPES]
    rank = {k: i for i, k in enumerate(SDXL_KEYS)}
    names.sort(key=lambda k: (rank.get(k, len(rank)), k))
    return [(k, tuple(index.shapes[k])) for k in names]


class _Inputs:
    """Row readers of the base and the models of one report (one descriptor per file)."""

    def __init__(self, base: str, models: Sequence[str]) -> None:
        self.base_path = base
        self.model_paths = list(models)
        self.base = SDXLCheckpointLoader(checkpoint_index(base))
        self.models = [SDXLCheckpointLoader(checkpoint_index(p)) for p in models]
        self._warned: set = set()

    def close(self) -> None:
        for loader in [self.base, *self.models]:
            loader.close()

    def chunks(self, name: str, shape: Tuple[int, ...], rows_per_chunk: int) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
        """``(r0, r1, base [k], task vectors [N, k])`` in float64, chunk by chunk."""
        rows, _ = rows_cols(shape)
        for r0 in range(0, rows, rows_per_chunk):
            r1 = min(rows, r0 + rows_per_chunk)
            base = self.base.get_rows(name, r0, r1).reshape(-1).to(torch.float64)
            if not bool(torch.isfinite(base).all()):
                raise InputDataError(f"{self.base_path}: key {name}: the base model has non-finite values (rows {r0}:{r1})")
            deltas = torch.zeros(len(self.models), base.numel(), dtype=torch.float64)
            for i, loader in enumerate(self.models):
                if name not in loader.index.tensor_paths:
                    continue  # the input abstains: a zero task vector, as in the merge
                row = deltas[i]
                row.copy_(loader.get_rows(name, r0, r1).reshape(-1))
                row.sub_(base)
                bad = ~torch.isfinite(row)
                if bool(bad.any()):
                    row[bad] = 0.0
                    if (i, name) not in self._warned:
                        self._warned.add((i, name))
                        LOG.warning("%s: key %s has non-finite values; counted as the base there", self.model_paths[i], name)
            yield r0, r1, base, deltas


def _key_statistics(
    inputs: _Inputs,
    name: str,
    shape: Tuple[int, ...],
    merged: Optional[RowsOf],
    view: _MethodView,
    plan: MemoryPlan,
) -> Dict[str, Any]:
    n = len(inputs.models)
    acc = KeyAccumulator(n, view.sign_election)
    step = plan.rows_per_chunk(shape, n + 2, torch.float64)
    for r0, r1, base, deltas in inputs.chunks(name, shape, step):
        acc.update(base, deltas, merged(r0, r1) if merged is not None else None)
    stats = acc.result()
    coeffs = None
    if view.median:
        coeffs, _ = weiszfeld_gram(
            stats.gram, torch.tensor(view.weights, dtype=torch.float64), view.eps, view.maxiter, view.ftol
        )
    return {
        "block_id": report_block_of(name),
        "component": component_of(name),
        "gram": stats.gram,
        "median_coeffs": coeffs,
        "base_norm_sq": stats.base_norm_sq,
        "change_norm_sq": stats.change_norm_sq,
        "sign_agree_fraction": stats.sign_agree_fraction,
        "elements": stats.elements,
    }


def _file_rows(job: ReportJob, loader: SDXLCheckpointLoader, name: str, shape: Tuple[int, ...]) -> RowsOf:
    if name not in loader.index.tensor_paths:
        raise InputDataError(f"{job.merged}: key {name} is missing (the base has it: is this the merge of this config?)")
    if tuple(loader.index.shapes[name]) != shape:
        raise InputDataError(f"{job.merged}: key {name} has shape {tuple(loader.index.shapes[name])}, the base {shape}")
    return lambda r0, r1: loader.get_rows(name, r0, r1)


def _tensor_rows(tensor: torch.Tensor, name: str, shape: Tuple[int, ...]) -> RowsOf:
    if tuple(tensor.shape) != shape:
        raise InputDataError(f"key {name}: the merge gave shape {tuple(tensor.shape)}, the base has {shape}")
    rows, cols = rows_cols(shape)
    flat = tensor.reshape(rows, cols)
    return lambda r0, r1: flat[r0:r1]


def _merge_in_memory(job: ReportJob, names: Sequence[str]) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(key, merged value as saved)`` of the given keys, from the merge's own plan and tasks."""
    from mergekit_sdxl.host.merge_planning import plan_merge
    from mergekit_sdxl.host.mergekit_api import MergeOptions
    from mergekit_sdxl.host.planner import SDXLRules
    from mergekit_sdxl.host.streaming import StreamingExecutor

    wanted = set(names)
    options = MergeOptions(quiet=True)
    roles = input_paths(job.loaded.config, job.loaded.sdxl)
    planned = plan_merge(job.loaded.config, options, SDXLRules(options=job.loaded.sdxl, plan=job.plan), [p for p, _ in roles])
    targets = [task for name, task in planned.targets if name in wanted]
    executor = StreamingExecutor(targets, math_device=torch.device("cpu"), storage_device=torch.device("cpu"))
    for task, value in executor.run(quiet=True):
        if value is not None:
            yield task.name, value


def run_report(job: ReportJob, *, quiet: bool = True) -> Dict[str, object]:
    """Stream the inputs once and build the report.json document (see the module docstring)."""
    view = _method_view(job)
    keys = _merged_keys(job)
    shapes = dict(keys)
    names = [os.path.basename(p) for p in job.models]
    if job.merged is not None:
        change_from = f"the finished merge {os.path.basename(job.merged)}"
    else:
        change_from = "the merge, run in memory by this report (nothing written)"
    median_from = None
    if view.median:
        median_from = (
            "Weiszfeld per key on the inputs' Gram matrix (the merge's median weights, up to rounding)"
            if view.name == "geometric_median"
            else "Weiszfeld per key on the raw task vectors' Gram matrix, before DROP, trim and sign masks "
            "(merge --report gives the merge's own weights)"
        )
    collector = ReportCollector(
        names,
        base=os.path.basename(job.base),
        method=view.name,
        statistics_from="a report pass over the inputs (raw task vectors X_i - B)",
        block_change_from=change_from,
        median_weight_from=median_from,
    )
    inputs = _Inputs(job.base, job.models)
    try:
        with tqdm(total=len(keys), unit="key", desc="report", disable=quiet) as bar:
            if job.merged is not None:
                _add_from_merged_file(job, view, inputs, collector, keys, lambda: bar.update(1))
            else:
                for name, value in _merge_in_memory(job, [k for k, _ in keys]):
                    shape = shapes[name]
                    rows = _tensor_rows(value, name, shape)
                    collector.add_key(name, **_key_statistics(inputs, name, shape, rows, view, job.plan))
                    bar.update(1)
    finally:
        inputs.close()
    return collector.build()


def _add_from_merged_file(
    job: ReportJob,
    view: _MethodView,
    inputs: _Inputs,
    collector: ReportCollector,
    keys: Sequence[Tuple[str, Tuple[int, ...]]],
    done: Callable[[], None],
) -> None:
    """Add ``keys`` to ``collector``, their block change read from the finished merge ``job.merged``."""
    assert job.merged is not None
    loader = SDXLCheckpointLoader(checkpoint_index(job.merged))
    try:
        for name, shape in keys:
            rows = _file_rows(job, loader, name, shape)
            collector.add_key(name, **_key_statistics(inputs, name, shape, rows, view, job.plan))
            done()
    finally:
        loader.close()


def add_keys_from_output(job: ReportJob, collector: ReportCollector, names: Sequence[str]) -> None:
    """Add the given keys to ``collector`` by a pass over them, the block change from ``job.merged``
    (for keys a resumed merge wrote in an earlier run, which the merge's recorder never saw)."""
    if job.merged is None:
        raise ValueError("add_keys_from_output needs the finished merge (job.merged)")
    if collector.n != len(job.models):
        raise ValueError(f"the report has {collector.n} inputs, the config {len(job.models)}")
    shapes = dict(_merged_keys(job))
    inputs = _Inputs(job.base, job.models)
    try:
        _add_from_merged_file(job, _method_view(job), inputs, collector, [(n, shapes[n]) for n in names], lambda: None)
    finally:
        inputs.close()
