"""``mergekit-sdxl merge``: check, lock, preflight, plan with mergekit, stream to one file.

The steps, each its own function: :func:`_checked_inputs` (the config validated, every path
the merge writes checked against every input), the output lock, preflight, planning
(``host/merge_planning.py``), provenance, and streaming (``host/streaming.py``) into ONE
single-file checkpoint that appears under its name only when complete and verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit_sdxl.errors import OutputError, UsageError, UserError
from mergekit_sdxl.host.checkpoint import is_checkpoint_file
from mergekit_sdxl.host.merge_planning import plan_merge
from mergekit_sdxl.host.mergekit_api import MergeConfiguration, MergeOptions, mergekit_version
from mergekit_sdxl.host.planner import SDXLRules
from mergekit_sdxl.host.plugin import register_all
from mergekit_sdxl.host.streaming import bytes_read, stream_merge
from mergekit_sdxl.host.validate import ValidatedConfig, check_contents, validate_config
from mergekit_sdxl.io.hashing import HashCache
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
    input_info,
    is_merge_output,
    is_our_sidecar,
    publishable_recipe,
    sidecar_paths,
    write_sidecars,
)
from mergekit_sdxl.io.safe_write import describe_os_error
from mergekit_sdxl.io.writer import StreamingCheckpointWriter, WriteResult
from mergekit_sdxl.kernels.memory_plan import MemoryPlan
from mergekit_sdxl.sdxl.families import MERGEABLE_FAMILIES
from mergekit_sdxl.version import __version__
from mergekit_sdxl.workflow.options import SDXLOptions
from mergekit_sdxl.workflow.preflight import PreflightReport, preflight

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

    ``source`` is the config file's path (named in error messages, and never written over);
    ``verify_pins`` checks the inputs against the recipe's sha256 pins; ``keep_paths`` records
    full input paths in the published metadata (by default only file names). Before any work
    the config is validated, every path the merge writes is checked against every input, and
    the output's lock is taken (one merge per output at a time).
    """
    started = time.monotonic()
    if options.multi_gpu:
        raise MergeError("--multi-gpu is not supported by mergekit-sdxl merge (one device per merge); use --cuda")
    register_all()
    cache = HashCache()
    label = source or "(given as text)"
    loaded, roles, validated = _checked_inputs(config_text, out_path, overrides, source, label, allow_base_in_models)
    with OutputLock(out_path):
        report = _preflight(loaded, roles, preflight_scan)
        check_contents(validated, source=label, sha256_of=cache.sha256, verify_pins=verify_pins)
        plan = MemoryPlan(budget_bytes=loaded.sdxl.memory_budget_bytes, adjust_threads=not options.multi_gpu)
        planned = plan_merge(loaded.config, options, SDXLRules(options=loaded.sdxl, plan=plan), [p for p, _ in roles])
        infos = [input_info(path, role=role, cache=cache) for path, role in roles]
        metadata = _metadata(loaded, roles, infos, report, out_path, keep_paths)
        writer = StreamingCheckpointWriter.open_or_resume(
            out_path, planned.entries, metadata, fingerprint=_identity(loaded.text, infos, overrides), restart=restart
        )
        _check_free_space(writer)
        start = bytes_read()
        with writer:
            stream_merge(writer, planned.targets, device=options.device or "cpu", quiet=options.quiet)
            result = writer.close(
                before_publish=lambda r: write_sidecars(
                    out_path, metadata, r.sha256, r.autov2, infos, command=command, config_name=config_name, size=r.size
                )
            )
    cache.record(out_path, result.sha256)
    return MergeResult(
        write=result, keys=len(planned.entries), bytes_read=bytes_read() - start, seconds=time.monotonic() - started
    )


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
        [Path(p) for p, _ in roles],
        base=Path(base) if base else None,
        allow_vpred_mix=loaded.sdxl.allow_vpred_mix,
        scan=scan,
        families=MERGEABLE_FAMILIES,  # what the loader merges
    )
    LOG.info("%s", report.summary())
    return report


def _metadata(
    loaded: LoadedConfig,
    roles: Sequence[Tuple[str, str]],
    infos: Sequence[InputInfo],
    report: PreflightReport,
    out_path: str,
    keep_paths: bool,
) -> Dict[str, str]:
    config = loaded.config
    recipe = loaded.text if keep_paths else publishable_recipe(loaded.text, [p for p, _ in roles])
    return build_metadata(
        recipe,
        infos,
        method=config.merge_method,
        seed=str(dict(config.parameters or {}).get("seed", "")),
        dtype=str(config.dtype or ""),
        out_dtype=config.out_dtype or "float16",
        title=Path(out_path).stem,
        prediction_type=report.prediction_type,
        plugin_version=__version__,
        mergekit_version=mergekit_version(),
    )


def _identity(config_text: str, infos: Sequence[InputInfo], overrides: Optional[Mapping[str, Any]]) -> str:
    # The memory budget only changes how tensors are chunked, never the bytes: a merge killed
    # for lack of memory must be able to resume with a smaller --memory-budget.
    options = {k: v for k, v in (overrides or {}).items() if k != "memory_budget"}
    return fingerprint(
        config_text,
        [(i.path, i.size, os.stat(i.path).st_mtime_ns, i.sha256) for i in infos],
        json.dumps(options, sort_keys=True),
    )


def _make_output_folder(out_path: str) -> None:
    folder = os.path.dirname(os.path.abspath(out_path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise OutputError(describe_os_error(error, folder)) from error


def _role_label(role: str) -> str:
    return {"base": "the base model", "vae": "the VAE donor"}.get(role, "the input model")


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
