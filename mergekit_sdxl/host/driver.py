"""``mergekit-sdxl merge``: plan with mergekit, execute with mergekit, stream to one file.

mergekit's own writer holds a whole shard in RAM and splits files above 5 GB;
here the planner's per-tensor tasks are wrapped in ``OutputTensor`` targets, the
``Executor`` yields one merged tensor at a time, and each goes straight into a
single safetensors file whose header (names, shapes, offsets, provenance) was
written first. The file appears under its name only when complete and verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from mergekit.architecture import get_architecture_info
from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor
from mergekit.io.tasks import LoaderCache
from mergekit.merge import _model_out_config
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from tqdm.auto import tqdm

import mergekit_sdxl
from mergekit_sdxl.errors import OutputError, UsageError, UserError
from mergekit_sdxl.io.safe_write import describe_os_error
from mergekit_sdxl.host.architecture import is_sdxl_architecture
from mergekit_sdxl.host.checkpoint import SDXLCheckpointLoader, checkpoint_index, is_checkpoint_file
from mergekit_sdxl.host.methods import set_chunk_bytes
from mergekit_sdxl.workflow.options import SDXLOptions
from mergekit_sdxl.host.planner import planning_options
from mergekit_sdxl.host.plugin import register_all
from mergekit_sdxl.host.tasks import DonorTensor, OutputTensor, PositionIds
from mergekit_sdxl.io.output_guard import (
    check_no_symlinks,
    check_output_target,
    check_writes_do_not_clash,
    merge_output_paths,
)
from mergekit_sdxl.io.output_lock import OutputLock
from mergekit_sdxl.io.writer import StreamingCheckpointWriter, TensorEntrySpec, WriteResult

LOG = logging.getLogger(__name__)


class MergeError(UserError, RuntimeError):
    """A merge that cannot run; the message names the file and key where known."""


@dataclass
class MergeResult:
    write: WriteResult
    keys: int
    bytes_read: int
    seconds: float


@dataclass
class LoadedConfig:
    text: str
    config: MergeConfiguration
    sdxl: SDXLOptions


def read_config_text(path: str) -> str:
    """The text of a config file, or a :class:`UsageError` naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not a UTF-8 text file (is it a YAML config?)") from error
    except OSError as error:
        raise UsageError(describe_os_error(error, path)) from error


def load_config(text: str, overrides: Optional[Dict] = None, *, source: str = "config") -> LoadedConfig:
    """Parse a mergekit YAML with an optional ``sdxl:`` section (CLI overrides win)."""
    from pydantic import ValidationError

    from mergekit_sdxl.host.validate import load_yaml

    raw = load_yaml(text, source)
    section = dict(raw.pop("sdxl", None) or {})
    for key, value in (overrides or {}).items():
        if value is not None:
            section[key] = value
    try:
        config = MergeConfiguration.model_validate(raw)
        sdxl = SDXLOptions.model_validate(section)
    except ValidationError as error:
        raise UsageError(f"config {source}: {_first_validation_error(error)}") from error
    except ValueError as error:
        raise UsageError(f"config {source}: {error}") from error
    return LoadedConfig(text=text, config=config, sdxl=sdxl)


def _first_validation_error(error: "Any") -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    more = len(error.errors()) - 1
    return f"{where}: {first.get('msg')}" + (f" (and {more} more problems)" if more > 0 else "")


def input_paths(config: MergeConfiguration, sdxl: Optional[SDXLOptions] = None) -> List[Tuple[str, str]]:
    """``(path, role)`` of every input, base first, then models in config order, each once.

    Not ``MergeConfiguration.referenced_models()``: that is a set, and its order
    (hence the provenance metadata and the output bytes) would change between runs.
    """
    from mergekit_sdxl.workflow.recipe import config_inputs

    pairs = config_inputs(config)
    source = sdxl.vae.source if sdxl is not None else "base"
    if source not in ("base", "merge") and all(p != source for p, _ in pairs):
        pairs.append((source, "vae"))
    return pairs


def _entries(planned, out_dtype: str, flags: Sequence[str]) -> Tuple[List[TensorEntrySpec], List[Tuple[str, OutputTensor]]]:
    """Output layout in name order, and the target task of each merged key."""
    specs: Dict[str, TensorEntrySpec] = {}
    targets: List[Tuple[str, OutputTensor]] = []
    for weight, task in planned:
        name = weight.name
        if isinstance(task, DonorTensor):
            index = LoaderCache().get(task.model).index
            if name not in index.tensor_paths:
                if weight.optional:
                    continue
                raise MergeError(f"{task.model}: key {name} is missing (needed from that file)")
            shape = index.shapes[name]
        elif isinstance(task, PositionIds):
            shape = (1, 77)
        else:
            shape = None
            for model in _models_of(task):
                index = LoaderCache().get(model).index
                if name in index.tensor_paths:
                    shape = index.shapes[name]
                    break
            if shape is None:
                continue
        dtype = weight.force_dtype or out_dtype
        specs[name] = TensorEntrySpec(name=name, dtype=dtype_from_name(dtype), shape=tuple(shape))
        targets.append((name, OutputTensor(name=name, tensor_task=task, dtype=dtype, optional=weight.optional)))
    for flag in flags:
        specs[flag] = TensorEntrySpec(name=flag, dtype=torch.float32, shape=(0,))
    return [specs[name] for name in sorted(specs)], targets


def _models_of(task) -> Sequence[ModelReference]:
    if hasattr(task, "model_order"):
        return task.model_order
    if hasattr(task, "merge"):
        return task.merge.model_order
    if hasattr(task, "model"):
        return (task.model,)
    return ()


def _agreed_flags(paths: Sequence[str]) -> List[str]:
    """v_pred/ztsnr markers, kept only when every input carries them."""
    flag_sets = [set(checkpoint_index(p).flags) for p in paths]
    agreed = set.intersection(*flag_sets) if flag_sets else set()
    if any(s != agreed for s in flag_sets):
        LOG.warning("inputs disagree on v_pred/ztsnr markers; the output carries only %s", sorted(agreed) or "none")
    return sorted(agreed)


def fingerprint(config_text: str, inputs: Sequence[Tuple[str, int, int, str]], extra: str = "") -> str:
    """Identity of a merge for resuming: config text, each input's path, size, mtime and sha256.

    A JSON object rather than one digest, so that a refused resume can say what changed
    (``describe_fingerprint_change`` names the keys: ``config``, ``options``, ``input PATH``).
    """
    identity = {"config": hashlib.sha256(config_text.encode()).hexdigest(), "options": extra}
    for path, size, mtime_ns, sha256 in inputs:
        identity[f"input {path}"] = f"size {size}, mtime_ns {mtime_ns}, sha256 {sha256}"
    return json.dumps(identity, sort_keys=True)


def run_sdxl_merge(
    config_text: str,
    out_path: str,
    options: MergeOptions,
    *,
    overrides: Optional[Dict] = None,
    restart: bool = False,
    preflight_scan: bool = False,
    command: Optional[str] = None,
    config_name: Optional[str] = None,
    source: Optional[str] = None,
    verify_pins: bool = True,
    allow_base_in_models: bool = False,
    keep_paths: bool = False,
) -> MergeResult:
    """Merge SDXL checkpoints into one safetensors file.

    ``source`` is the config file's path (named in error messages, and never written over); ``verify_pins`` checks the inputs against
    the recipe's sha256 pins; ``keep_paths`` records full input paths in the published
    metadata (by default only file names).

    Before any work: the config is validated, every path the merge writes is checked against
    every input, and the output's lock is taken (one merge per output at a time).
    """
    started = time.monotonic()
    if options.multi_gpu:
        raise MergeError("--multi-gpu is not supported by mergekit-sdxl merge (one device per merge); use --cuda")
    from mergekit_sdxl.host.validate import validate_config
    from mergekit_sdxl.io.hashing import HashCache

    register_all()
    check_output_target(out_path, suffix=".safetensors")
    cache = HashCache()
    label = source or "(given as text)"
    validate_config(  # logs its warnings (copies of one file, ...)
        config_text,
        source=label,
        allow_base_in_models=allow_base_in_models,
        sha256_of=cache.sha256,
        verify_pins=verify_pins,
    )
    loaded = load_config(config_text, overrides, source=label)
    config, sdxl = loaded.config, loaded.sdxl
    roles = input_paths(config, sdxl)
    paths = [p for p, _ in roles]
    missing = [p for p in paths if not is_checkpoint_file(p)]
    if missing:
        raise MergeError("inputs not found or not .safetensors files: " + ", ".join(missing))
    writes = merge_output_paths(out_path)
    guarded = [(p, _role_label(role)) for p, role in roles]
    if source and os.path.isfile(source):
        guarded.append((source, "the config file"))
    check_writes_do_not_clash(writes, guarded)
    check_no_symlinks(writes[2:])  # the .partial may be a stale link: the writer replaces it
    _refuse_foreign_output(out_path)
    _make_output_folder(out_path)
    with OutputLock(out_path):
        return _locked_merge(
            loaded, roles, out_path, options, overrides, restart, preflight_scan, command, config_name, started,
            cache=cache, keep_paths=keep_paths,
        )


def _make_output_folder(out_path: str) -> None:
    folder = os.path.dirname(os.path.abspath(out_path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise OutputError(describe_os_error(error, folder)) from error


def _role_label(role: str) -> str:
    return {"base": "the base model", "vae": "the VAE donor"}.get(role, "the input model")


def _refuse_foreign_output(out_path: str) -> None:
    """An existing file under the output name is replaced only if an earlier merge made it."""
    from mergekit_sdxl.io.provenance import is_merge_output

    if os.path.lexists(out_path) and not is_merge_output(out_path):
        raise MergeError(
            f"{out_path}: exists and was not written by mergekit-sdxl; refusing to replace it "
            "(move it or choose another output name)"
        )


def _locked_merge(
    loaded: "LoadedConfig",
    roles: List[Tuple[str, str]],
    out_path: str,
    options: MergeOptions,
    overrides: Optional[Dict],
    restart: bool,
    preflight_scan: bool,
    command: Optional[str],
    config_name: Optional[str],
    started: float,
    *,
    cache: "Any",
    keep_paths: bool,
) -> MergeResult:
    from mergekit_sdxl.workflow.preflight import preflight
    from mergekit_sdxl.io.provenance import build_metadata, input_info, publishable_recipe, write_sidecars

    config, sdxl, config_text = loaded.config, loaded.sdxl, loaded.text
    files = [p for p, _ in roles]
    base_path = config.base_model.model.path if config.base_model else None
    report = preflight(
        [Path(p) for p in files],
        base=Path(base_path) if base_path else None,
        allow_vpred_mix=sdxl.allow_vpred_mix,
        scan=preflight_scan,
        families=("sdxl-base",),  # the loader merges SDXL base-family files only
    )
    LOG.info("%s", report.summary())

    budget = sdxl.memory_budget_bytes
    set_chunk_bytes(max(budget // 4, 1024**2))
    LoaderCache.loaders.clear()
    loader_cache = LoaderCache()
    loader_cache.setup(options=options)
    arch = get_architecture_info(config, options)
    if not is_sdxl_architecture(arch):
        raise MergeError("mergekit-sdxl merge writes SDXL single files; use mergekit-yaml for other architectures")
    for model in config.referenced_models():
        loader_cache.get(model)
    out_config = _model_out_config(config, arch, trust_remote_code=options.trust_remote_code)
    recipe_text = loaded.text
    out_dtype = config.out_dtype or "float16"

    with planning_options(sdxl.model_copy(update={"memory_budget": budget})):
        planner = MergePlanner(config, arch, options=options, out_model_config=out_config)
        planner._plan()
    entries, targets = _entries(planner._tensors, out_dtype, _agreed_flags(files))

    infos = [input_info(path, role=role, cache=cache) for path, role in roles]
    params = dict(config.parameters or {})
    metadata = build_metadata(
        recipe_text if keep_paths else publishable_recipe(recipe_text, [p for p, _ in roles]),
        infos,
        method=config.merge_method,
        seed=str(params.get("seed", "")),
        dtype=str(config.dtype or ""),
        out_dtype=out_dtype,
        title=Path(out_path).stem,
        prediction_type=report.prediction_type,
        plugin_version=mergekit_sdxl.__version__,
        mergekit_version=_mergekit_version(),
    )
    # The memory budget only changes how tensors are chunked, never the bytes: a merge killed for
    # lack of memory must be able to resume with a smaller --memory-budget.
    options_identity = {k: v for k, v in (overrides or {}).items() if k != "memory_budget"}
    identity = fingerprint(config_text, [(i.path, i.size, os.stat(i.path).st_mtime_ns, i.sha256) for i in infos], json.dumps(options_identity, sort_keys=True))
    writer = StreamingCheckpointWriter.open_or_resume(out_path, entries, metadata, fingerprint=identity, restart=restart)
    _check_free_space(writer)
    done = set(writer.completed_names())
    pending = [(name, task) for name, task in targets if name not in done]
    constants = {spec.name: torch.empty(0, dtype=torch.float32) for spec in entries if spec.shape == (0,) and spec.name not in done}

    loaders = [l for l in LoaderCache.loaders.values() if isinstance(l, SDXLCheckpointLoader)]
    total_read = _expected_read_bytes(pending)
    order = [spec.name for spec in entries if spec.name not in done]
    buffered: Dict[str, Optional[torch.Tensor]] = dict(constants)
    position = 0
    read_start = sum(l.bytes_read for l in loaders)
    with writer, tqdm(total=total_read, unit="B", unit_scale=True, desc="merging", disable=options.quiet) as bar:
        executor = StreamingExecutor(
            targets=[task for _, task in pending],
            math_device=torch.device(options.device or "cpu"),
            storage_device=torch.device("cpu"),
        )
        keys_done = 0

        def drain() -> None:
            nonlocal position
            while position < len(order) and order[position] in buffered:
                name = order[position]
                tensor = buffered.pop(name)
                writer.write(name, tensor)
                position += 1

        drain()
        for task, value in executor.run(quiet=True):
            buffered[task.name] = value
            drain()
            keys_done += 1
            read_now = sum(l.bytes_read for l in loaders) - read_start
            bar.update(max(0, min(read_now, total_read) - bar.n))
            bar.set_postfix_str(f"keys {keys_done}/{len(pending)} {task.name[-40:]}", refresh=False)
        drain()
        if position != len(order):
            raise MergeError(f"merge produced no value for {order[position]}")
        result = writer.close(
            before_publish=lambda r: write_sidecars(
                out_path, metadata, r.sha256, r.autov2, infos, command=command, config_name=config_name, size=r.size
            )
        )
    cache.record(out_path, result.sha256)
    bytes_read = sum(l.bytes_read for l in loaders) - read_start
    return MergeResult(write=result, keys=len(entries), bytes_read=bytes_read, seconds=time.monotonic() - started)


def _check_free_space(writer: StreamingCheckpointWriter) -> None:
    """Refuse to start when the output cannot fit on its disk (the partial output stays resumable)."""
    import shutil

    needed = writer.bytes_remaining
    free = shutil.disk_usage(writer.temp_path.parent).free
    if needed > free:
        writer.abort()
        raise MergeError(
            f"{writer.out_path}: needs {needed / 1e9:.2f} GB more on its disk but only {free / 1e9:.2f} GB are free; "
            "free some space (or choose another output folder) and run the same command again"
        )


class StreamingExecutor(Executor):
    """mergekit's ``Executor`` with O(1) target lookup and no progress bar of its own.

    ``Executor._run`` tests ``task_handle in self.targets`` against a list: with
    2515 targets that is millions of pydantic ``__eq__`` calls per merge.
    """

    def _run(self, quiet: bool = False, desc: Optional[str] = None):
        last_use = self.schedule.last_use_index
        targets = set(self.targets)
        values: Dict = dict(self.cached_values or {})
        for index, handle in enumerate(self.schedule.tasks):
            task = handle.task()
            on_math_device = task.uses_accelerator()
            arguments = {}
            for name, dependency in handle.arguments().items():
                value = values[dependency]
                arguments[name] = self._move_tensors(value, self.math_device) if on_math_device else value
            result = self._move_tensors(task.execute(**arguments), self.storage_device)
            del arguments
            values[handle] = result
            del result
            if handle in targets:
                yield handle, values[handle]
            for key in [k for k in values if index >= last_use[k]]:
                del values[key]


def _expected_read_bytes(pending) -> int:
    """Input bytes the merge will read, for the progress bar."""
    total = 0
    for name, target in pending:
        for model in _models_of(target.tensor_task):
            ranges = getattr(LoaderCache().get(model).index, "byte_ranges", {})
            if name in ranges:
                start, stop = ranges[name]
                total += stop - start
    return total


def _mergekit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergekit")
    except PackageNotFoundError:
        return "unknown"
