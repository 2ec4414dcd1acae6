"""``mergekit-sdxl merge``: check, lock, preflight, plan with mergekit, stream to one file.

The steps, each its own function: :func:`_checked_inputs` (the config validated, every path
the merge writes checked against every input), the output lock, preflight, planning
(``host/merge_planning.py``), provenance, and streaming (``host/streaming.py``) into ONE
single-file checkpoint that appears under its name only when complete and verified.

The inputs' sha256 (for provenance) are computed by background threads from right after preflight,
in parallel with planning and the merge (``io/background_hash.py``); only what must be known first
is hashed first (sha256 pins, files that may be copies of each other). The header is written with
same-length placeholders for the hashes still unknown and completed in place at close.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

from mergekit_sdxl.errors import OutputError, UsageError, UserError
from mergekit_sdxl.host.checkpoint import is_checkpoint_file
from mergekit_sdxl.host.merge_planning import plan_merge
from mergekit_sdxl.host.merge_report import MergeReportRecorder, new_recorder, recording, reported_inputs
from mergekit_sdxl.host.mergekit_api import MergeConfiguration, MergeOptions, mergekit_version
from mergekit_sdxl.host.planner import SDXLRules
from mergekit_sdxl.host.plugin import register_all
from mergekit_sdxl.host.ray_merge import RaySettings, check_ray_merge, ray_stream_merge, worker_budget
from mergekit_sdxl.host.streaming import bytes_read, stream_merge
from mergekit_sdxl.host.validate import ValidatedConfig, check_contents, validate_config
from mergekit_sdxl.io.background_hash import BackgroundHasher
from mergekit_sdxl.io.hashing import HashCache, sample_digest
from mergekit_sdxl.io.output_guard import (
    check_no_symlinks,
    check_not_foreign,
    check_output_target,
    check_writes_do_not_clash,
    merge_output_paths,
)
from mergekit_sdxl.io.output_lock import OutputLock
from mergekit_sdxl.io.provenance import (
    InputInfo,
    build_metadata,
    is_merge_output,
    is_our_sidecar,
    pending_input_info,
    publishable_recipe,
    sidecar_paths,
    with_sha256,
    write_sidecars,
)
from mergekit_sdxl.io.safe_write import describe_os_error
from mergekit_sdxl.io.writer import StreamingCheckpointWriter, WriteResult
from mergekit_sdxl.kernels.memory_plan import MemoryPlan
from mergekit_sdxl.sdxl.families import MERGEABLE_FAMILIES
from mergekit_sdxl.version import __version__
from mergekit_sdxl.workflow.lora_check import check_lora_inputs
from mergekit_sdxl.workflow.options import SDXLOptions
from mergekit_sdxl.workflow.preflight import PreflightReport, preflight
from mergekit_sdxl.workflow.recipe import config_loras

LOG = logging.getLogger(__name__)


class MergeError(UserError, RuntimeError):
    """A merge that cannot run; the message names the file and key where known."""


@dataclass
class MergeResult:
    write: WriteResult
    keys: int
    bytes_read: int
    seconds: float
    report: Optional[MergeReportRecorder] = None  # the statistics merge(report=True) collected


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

    from mergekit_sdxl.host.validate import expand_config, load_yaml

    raw = expand_config(load_yaml(text, source), source)  # {mbw: ...} block weights -> mergekit filters
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


def _first_validation_error(error: Any) -> str:
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


def fingerprint(config_text: str, inputs: Sequence[Tuple[str, os.stat_result]], extra: str = "") -> str:
    """Identity of a merge for resuming: config text, each input's path and file identity (size,
    mtime, ctime, inode: what the hash cache trusts a file's sha256 by; ctime and inode cannot be
    set back by hand, so a rewrite that restores the mtime still counts as a change).

    No sha256: it is computed while the merge runs, and a resume must be decided before. A JSON
    object rather than one digest, so that a refused resume can say what changed
    (``describe_fingerprint_change`` names the keys: ``config``, ``options``, ``input PATH``).
    """
    identity = {"config": hashlib.sha256(config_text.encode()).hexdigest(), "options": extra}
    for path, st in inputs:
        identity[f"input {path}"] = _file_identity(st)
    return json.dumps(identity, sort_keys=True)


def _file_identity(st: os.stat_result) -> str:
    return f"size {st.st_size}, mtime_ns {st.st_mtime_ns}, ctime_ns {st.st_ctime_ns}, inode {st.st_ino}"


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
    devices: Optional[Sequence[str]] = None,
    ray: Optional[RaySettings] = None,
    collect_report: bool = False,
) -> MergeResult:
    """Merge SDXL checkpoints into one safetensors file.

    ``source`` is the config file's path (named in error messages, and never written over);
    ``verify_pins`` checks the inputs against the recipe's sha256 pins; ``keep_paths`` records
    full input paths in the published metadata (by default only file names). Before any work
    the config is validated, every path the merge writes is checked against every input, and
    the output's lock is taken (one merge per output at a time). ``devices``: merge keys on
    these devices at once (``--multi-gpu`` gives every CUDA device); the bytes are those of a
    merge on one device of that kind. ``ray``: merge the keys as jobs on a Ray cluster
    (``host/ray_merge.py``), to the same bytes. ``collect_report``: collect the merge report's statistics
    from the merge's own reads (``host/merge_report.py``; not with ``ray``), in ``MergeResult.report``.
    """
    started = time.monotonic()
    if ray is not None:
        check_ray_merge(ray, options, devices)
    record = collect_report and ray is None  # with Ray the keys are merged in other processes
    lanes = list(devices) if devices is not None else (_all_gpus() if options.multi_gpu else None)
    register_all()
    cache = HashCache()
    label = source or "(given as text)"
    with _phase("validate"):
        loaded, roles, validated = _checked_inputs(config_text, out_path, overrides, source, label, allow_base_in_models)
        if record:
            _check_reportable(loaded, label)
    with OutputLock(out_path):
        with _phase("preflight"):
            report = _preflight(loaded, roles, preflight_scan)
        # Each input's identity before any of it is hashed: the fingerprint, and the check that
        # nothing changed while the merge (and the hashing) read it.
        stats = {path: _stat(path) for path, _ in roles}
        with BackgroundHasher(cache, [p for p, _ in roles]) as hasher:
            contents = _ContentIds(roles, validated, hasher, cache)
            with _phase("check-contents"):
                check_contents(validated, source=label, sha256_of=contents, verify_pins=verify_pins)
            budget = loaded.sdxl.memory_budget_bytes
            if ray is not None:  # the budget of each Ray worker
                budget = worker_budget(loaded.sdxl, ray, options.num_threads or 1)
            # Lanes run keys in threads: the process-wide torch thread count must stay as set.
            plan = MemoryPlan(budget_bytes=budget, adjust_threads=not lanes)
            checkpoints = [p for p, role in roles if role != "lora"]
            with _phase("plan"):
                rules = SDXLRules(options=loaded.sdxl, plan=plan, report=record)
                planned = plan_merge(loaded.config, options, rules, checkpoints)
            provenance = _Provenance(loaded, roles, report, out_path, keep_paths, hasher, contents.possible_copies)
            writer = StreamingCheckpointWriter.open_or_resume(
                out_path,
                planned.entries,
                provenance.metadata_now(),
                fingerprint=_identity(loaded.text, stats, overrides),
                restart=restart,
                alternate_metadata=provenance.alternate,
            )
            _check_free_space(writer)
            start, worker_bytes = bytes_read(), 0
            recorder = new_recorder(loaded.config, plan, vae_merged=loaded.sdxl.vae.source == "merge") if record else None
            with writer:
                with _phase("merge"):
                    if ray is None:
                        with recording(recorder) if recorder is not None else nullcontext():
                            stream_merge(
                                writer, planned.targets, device=options.device or "cpu", quiet=options.quiet, devices=lanes
                            )
                    else:
                        run = ray_stream_merge(writer, planned.targets, options=options, settings=ray, budget=budget)
                        worker_bytes = run.bytes_read
                with _phase("finish"):
                    infos = provenance.final_infos()
                    _check_unchanged(stats)
                    metadata = provenance.metadata(infos)
                    result = writer.close(
                        before_publish=lambda r: write_sidecars(
                            out_path, metadata, r.sha256, r.autov2, infos, command=command, config_name=config_name, size=r.size
                        ),
                        final_metadata=metadata,
                    )
    cache.record(out_path, result.sha256)
    return MergeResult(
        write=result,
        keys=len(planned.entries),
        bytes_read=bytes_read() - start + worker_bytes,
        seconds=time.monotonic() - started,
        report=recorder,
    )


def _check_reportable(loaded: LoadedConfig, label: str) -> None:
    try:
        reported_inputs(loaded.config)
    except ValueError as error:
        raise UsageError(f"config {label}: --report: {error}") from None


@contextmanager
def _phase(name: str) -> Iterator[None]:
    """Log how long a phase of the merge took (``phase NAME: SECONDS s``, read by bench/bench_merge.py)."""
    begun = time.monotonic()
    try:
        yield
    finally:
        LOG.info("phase %s: %.2f s", name, time.monotonic() - begun)


def _all_gpus() -> List[str]:
    """Every CUDA device, for ``--multi-gpu`` (at least one, or a clear error)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 1:
        raise MergeError("--multi-gpu: this torch sees no CUDA device; leave the option out to merge on the CPU")
    return [f"cuda:{i}" for i in range(count)]


def _checked_inputs(
    config_text: str,
    out_path: str,
    overrides: Optional[Dict],
    source: Optional[str],
    label: str,
    allow_base_in_models: bool,
) -> Tuple[LoadedConfig, List[Tuple[str, str]], ValidatedConfig]:
    """The validated config and its ``(path, role)`` inputs; refuses any write onto an input."""
    check_output_target(out_path, suffix=".safetensors")
    # Text and headers first; what needs whole files hashed (pins, copies) waits for preflight.
    validated = validate_config(
        config_text, source=label, allow_base_in_models=allow_base_in_models, sha256_of=None, verify_pins=False
    )
    loaded = load_config(config_text, overrides, source=label)
    roles = input_paths(loaded.config, loaded.sdxl)
    missing = [p for p, _ in roles if not is_checkpoint_file(p)]
    if missing:
        raise MergeError("inputs not found or not .safetensors files: " + ", ".join(missing))
    writes = merge_output_paths(out_path)
    guarded = [(p, _role_label(role)) for p, role in roles]
    if source and os.path.isfile(source):
        guarded.append((source, "the config file"))
    check_writes_do_not_clash(writes, guarded)
    check_no_symlinks(writes[2:])  # the .partial may be a stale link: the writer replaces it
    check_not_foreign(out_path, is_merge_output, "a merge")
    for sidecar in sidecar_paths(out_path):
        check_not_foreign(sidecar, is_our_sidecar, "a model card or provenance file")
    _make_output_folder(out_path)
    return loaded, roles, validated


def _preflight(loaded: LoadedConfig, roles: Sequence[Tuple[str, str]], scan: bool) -> PreflightReport:
    base = loaded.config.base_model.model.path if loaded.config.base_model else None
    report = preflight(
        [Path(p) for p, role in roles if role != "lora"],
        base=Path(base) if base else None,
        allow_vpred_mix=loaded.sdxl.allow_vpred_mix,
        scan=scan,
        families=MERGEABLE_FAMILIES,  # what the loader merges
    )
    check_lora_inputs(config_loras(loaded.config))  # each LoRA against its checkpoint, headers only
    LOG.info("%s", report.summary())
    return report


class _ContentIds:
    """What ``check_contents`` is given to tell inputs apart: the sha256 where it matters (a pinned
    file; a file whose size and content samples equal another input's, a possible copy), and for
    every other file its sample digest, which already proves it differs from every other input of
    its size. So copies are still found before the merge, exactly, without hashing every file first
    (SDXL checkpoints often have the very same size)."""

    def __init__(
        self, roles: Sequence[Tuple[str, str]], validated: ValidatedConfig, hasher: BackgroundHasher, cache: HashCache
    ) -> None:
        self._hasher, self._cache = hasher, cache
        self._pinned = {os.path.realpath(pin.path) for pin in validated.pins}
        self._samples: Dict[str, str] = {}
        by_size: Dict[int, List[str]] = {}
        for path, _ in roles:
            by_size.setdefault(os.path.getsize(path), []).append(path)
        seen: Dict[str, List[str]] = {}
        for paths in by_size.values():
            if len(paths) < 2:
                continue
            for path in paths:
                digest = sample_digest(path)
                self._samples[os.path.realpath(path)] = digest
                seen.setdefault(digest, []).append(path)
        self.possible_copies: Set[str] = {p for same in seen.values() if len(same) > 1 for p in same}
        self._copies = {os.path.realpath(p) for p in self.possible_copies}

    def __call__(self, path: str) -> str:
        key = os.path.realpath(path)
        if key in self._samples and key not in self._copies and key not in self._pinned:
            return self._samples[key]
        try:
            return self._hasher.sha256(path)
        except KeyError:  # not one of the merge's inputs as the driver lists them
            return self._cache.sha256(path)


class _Provenance:
    """The merge's metadata: with placeholders for the hashes not known yet, or final.

    The placeholder version depends only on the config and the inputs' contents (never on how
    far the hashing got), so a resumed merge writes the very header its partial output has.
    """

    def __init__(
        self,
        loaded: LoadedConfig,
        roles: Sequence[Tuple[str, str]],
        report: PreflightReport,
        out_path: str,
        keep_paths: bool,
        hasher: BackgroundHasher,
        possible_copies: Set[str],
    ) -> None:
        self._loaded, self._roles, self._report = loaded, roles, report
        self._out_path, self._keep_paths, self._hasher = out_path, keep_paths, hasher
        pending = [pending_input_info(path, role=role, index=i) for i, (path, role) in enumerate(roles)]
        # A1111's sd_merge_models lists each sha256 once: files that may be copies get their
        # real hashes here, so the placeholder header has the final one's length.
        self._pending = [with_sha256(i, self._sha256(i.path)) if i.path in possible_copies else i for i in pending]
        self._placeholders = self.metadata(self._pending)
        self._final: Optional[Dict[str, str]] = None

    def metadata(self, infos: Sequence[InputInfo]) -> Dict[str, str]:
        """The ``__metadata__`` for ``infos`` (the inputs in config order)."""
        loaded, config = self._loaded, self._loaded.config
        recipe = loaded.text if self._keep_paths else publishable_recipe(loaded.text, [p for p, _ in self._roles])
        return build_metadata(
            recipe,
            infos,
            method=config.merge_method,
            seed=str(dict(config.parameters or {}).get("seed", "")),
            dtype=str(config.dtype or ""),
            out_dtype=config.out_dtype or "float16",
            title=Path(self._out_path).stem,
            prediction_type=self._report.prediction_type,
            plugin_version=__version__,
            mergekit_version=mergekit_version(),
        )

    def metadata_now(self) -> Dict[str, str]:
        """Final when every hash is already known (a warm cache, or hashing done during planning),
        else with placeholders."""
        if self._hasher.all_known():
            self._final = self.metadata(self.final_infos())
            return self._final
        return self._placeholders

    def alternate(self) -> Dict[str, str]:
        """The version :meth:`metadata_now` did not give (the writer asks only when a partial output
        has another header; the final one waits for the hashes)."""
        if self._final is not None:
            return self._placeholders
        return self.metadata(self.final_infos())

    def final_infos(self) -> List[InputInfo]:
        """Every input with its sha256 (waits for the hashing threads, and helps them)."""
        if not self._hasher.all_known():
            LOG.info("waiting for the sha256 of the inputs")
        return [with_sha256(info, self._sha256(info.path)) for info in self._pending]

    def _sha256(self, path: str) -> str:
        try:
            return self._hasher.sha256(path)
        except OSError as error:
            raise MergeError(describe_os_error(error, path)) from error


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as error:
        raise MergeError(describe_os_error(error, path)) from error


def _check_unchanged(stats: Mapping[str, os.stat_result]) -> None:
    """Refuse to publish when an input changed while the merge and its hashing read it."""
    for path, before in stats.items():
        try:
            now = _file_identity(os.stat(path))
        except OSError as error:
            raise MergeError(describe_os_error(error, path) + " (it was an input of this merge)") from error
        if now != _file_identity(before):
            raise MergeError(
                f"{path}: changed while the merge read it ({_file_identity(before)} -> {now}); nothing was published. "
                "Run the merge again with --restart"
            )


def _identity(config_text: str, stats: Mapping[str, os.stat_result], overrides: Optional[Mapping[str, Any]]) -> str:
    # The memory budget only changes how tensors are chunked, never the bytes: a merge killed
    # for lack of memory must be able to resume with a smaller --memory-budget.
    options = {k: v for k, v in (overrides or {}).items() if k != "memory_budget"}
    return fingerprint(config_text, list(stats.items()), json.dumps(options, sort_keys=True))


def _make_output_folder(out_path: str) -> None:
    folder = os.path.dirname(os.path.abspath(out_path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise OutputError(describe_os_error(error, folder)) from error


def _role_label(role: str) -> str:
    return {"base": "the base model", "vae": "the VAE donor", "lora": "an input LoRA"}.get(role, "the input model")


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
