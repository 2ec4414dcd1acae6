"""Provenance of a merged checkpoint: safetensors ``__metadata__``, a sidecar JSON, a model card.

Everything here is deterministic: no dates, no host names, sorted JSON keys. The same recipe and
the same inputs give byte-identical metadata, so the merged file itself is reproducible bit for bit
(and its sha256/AutoV2 with it).

Metadata written by :func:`build_metadata` (every value a string):

=================================  =============================================================
``mergekit_sdxl.recipe``           the merge config YAML, verbatim
``mergekit_sdxl.version``          plugin version
``mergekit.version``               mergekit version
``mergekit_sdxl.method``           ``merge_method``
``mergekit_sdxl.method_version``   JSON {method: version} of every method the config uses
                                   (``mergekit_sdxl/method_versions.py``)
``mergekit_sdxl.seed``             seed ("" when the method takes none)
``mergekit_sdxl.dtype``            compute dtype; ``mergekit_sdxl.out_dtype`` output dtype
``mergekit_sdxl.inputs``           JSON list, config order: name, size, sha256, autov2 (+ role)
``sd_merge_recipe``                A1111-style recipe JSON (``type: "mergekit-sdxl"``)
``sd_merge_models``                A1111-style JSON keyed by sha256: name, legacy_hash, sd_merge_recipe
``modelspec.*``                    Stability AI model spec 1.0.0: sai_model_spec, architecture,
                                   implementation, title, resolution, prediction_type
=================================  =============================================================
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from mergekit_sdxl.method_versions import MethodVersion, config_methods, method_versions

# The metadata vocabulary (key names, read_provenance) is a format fact of the sdxl layer;
# re-exported here, where callers have always imported it from.
from mergekit_sdxl.sdxl.merge_metadata import (
    A1111_MODELS,
    A1111_RECIPE,
    META_DTYPE,
    META_INPUTS,
    META_MERGEKIT_VERSION,
    META_METHOD,
    META_METHOD_VERSION,
    META_OUT_DTYPE,
    META_RECIPE,
    META_SEED,
    META_VERSION,
    MODELSPEC_PREDICTION_TYPE,
    MODELSPEC_PREFIX,
    normalise_prediction_type,
    read_provenance,
)

logger = logging.getLogger(__name__)

__all__ = [
    "InputInfo",
    "build_metadata",
    "write_sidecars",
    "read_provenance",
    "legacy_hash",
    "input_info",
    "pending_input_info",
    "with_sha256",
    "sidecar_paths",
    "META_RECIPE",
    "META_INPUTS",
    "META_VERSION",
    "META_MERGEKIT_VERSION",
    "MODELSPEC_ARCHITECTURE",
]

PathLike = Union[str, "os.PathLike[str]"]

MODELSPEC_VERSION = "1.0.0"
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base"
MODELSPEC_IMPLEMENTATION = "sgm"
MODELSPEC_RESOLUTION = "1024x1024"


@dataclass(frozen=True)
class InputInfo:
    """One input checkpoint as provenance records it.

    ``path`` is where it was read from (not written into the metadata: only its file name is);
    ``role`` is ``"base"`` or ``"model"`` (or ``""`` when unknown); ``legacy_hash`` is A1111's old
    8-hex model hash (sha256 of 64 KiB at offset 1 MiB), computed by :func:`input_info`.
    """

    path: str
    size: int
    sha256: str
    autov2: str
    role: str = ""
    legacy_hash: str = ""

    @property
    def name(self) -> str:
        return Path(self.path).name

    def to_record(self) -> Dict[str, Any]:
        rec: Dict[str, Any] = {"name": self.name, "size": int(self.size), "sha256": self.sha256, "autov2": self.autov2}
        if self.role:
            rec["role"] = self.role
        return rec


def legacy_hash(path: PathLike) -> str:
    """A1111's legacy model hash: first 8 hex of sha256(64 KiB read at offset 0x100000)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        h.update(f.read(0x10000))
    return h.hexdigest()[:8]


def input_info(path: PathLike, *, role: str = "", cache=None) -> InputInfo:
    """:class:`InputInfo` of a file: size, sha256 (through a ``HashCache``), AutoV2, legacy hash."""
    from mergekit_sdxl.io.hashing import HashCache, autov2

    cache = cache if cache is not None else HashCache()
    p = os.fspath(path)
    digest = cache.sha256(p)
    return InputInfo(
        path=p, size=os.path.getsize(p), sha256=digest, autov2=autov2(digest), role=role, legacy_hash=legacy_hash(p)
    )


# A placeholder has a real digest's length (64 characters; its AutoV2, the first 10), so that the header
# written with placeholders has the final header's length; never hex, so never a real digest.
PENDING_SHA256_PREFIX = "pending-sha256-of-input-"


def pending_sha256(index: int) -> str:
    """The placeholder for the sha256 of input ``index`` (0-based, config order) until it is known."""
    placeholder = f"{PENDING_SHA256_PREFIX}{index:040d}"
    if len(placeholder) != 64:
        raise ValueError(f"input index {index} out of range")
    return placeholder


def pending_input_info(path: PathLike, *, role: str = "", index: int) -> InputInfo:
    """:class:`InputInfo` of a file whose sha256 is not known yet: size and legacy hash (cheap), and
    same-length placeholders for sha256 and AutoV2 (see :func:`with_sha256`)."""
    p = os.fspath(path)
    placeholder = pending_sha256(index)
    return InputInfo(
        path=p, size=os.path.getsize(p), sha256=placeholder, autov2=placeholder[:10], role=role, legacy_hash=legacy_hash(p)
    )


def with_sha256(info: InputInfo, sha256_hex: str) -> InputInfo:
    """``info`` with its sha256 (and AutoV2) known."""
    from mergekit_sdxl.io.hashing import autov2

    return replace(info, sha256=sha256_hex.lower(), autov2=autov2(sha256_hex))


def public_names(paths: Sequence[str]) -> Dict[str, str]:
    """Each input path -> the shortest trailing part of it that is unique among ``paths``
    (usually the file name): what a published recipe shows instead of the user's folders."""
    parts = {p: Path(p).parts for p in paths}
    names: Dict[str, str] = {}
    for p, split in parts.items():
        for depth in range(1, len(split) + 1):
            tail = split[-depth:]
            if sum(1 for other in parts.values() if other[-depth:] == tail) == 1 or depth == len(split):
                names[p] = Path(*tail).as_posix()
                break
    return names


def publishable_recipe(recipe_yaml: str, input_paths: Sequence[str]) -> str:
    """The recipe with every input path replaced by its public name (see :func:`public_names`).

    Re-rendered from the parsed YAML (comments, which may hold the user's paths, are dropped;
    the sha256 of every input is in the inputs record beside it).
    """
    import yaml

    names = public_names(list(dict.fromkeys(input_paths)))

    def rename(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (names.get(v, v) if k == "path" and isinstance(v, str) else rename(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [rename(v) for v in node]
        if isinstance(node, str) and node in names:
            return names[node]
        return node

    doc = rename(yaml.safe_load(recipe_yaml))
    body = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=None, width=120)
    return "# inputs named by file name; each one's sha256 is in mergekit_sdxl.inputs\n" + body


def _legacy(info: InputInfo) -> str:
    if info.legacy_hash:
        return info.legacy_hash
    try:
        return legacy_hash(info.path)
    except OSError:
        return ""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _recipe_doc(recipe_yaml: str) -> Dict[str, Any]:
    try:
        import yaml

        doc = yaml.safe_load(recipe_yaml)
    except Exception:  # noqa: BLE001 - a recipe that is not YAML still gets recorded verbatim
        return {}
    return doc if isinstance(doc, dict) else {}


def _recipe_parameters(recipe_yaml: str) -> Dict[str, Any]:
    params = _recipe_doc(recipe_yaml).get("parameters") or {}
    return params if isinstance(params, dict) else {}


def _method_versions(recipe_yaml: str, method: str, mergekit_version: str) -> Dict[str, MethodVersion]:
    """The version of ``method`` and of every other method the recipe uses (per-component merges)."""
    return method_versions((method, *config_methods(_recipe_doc(recipe_yaml))), mergekit_version)


def _normalise_prediction(prediction_type: str) -> str:
    p = normalise_prediction_type(prediction_type)
    if p is None:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v', got {prediction_type!r}")
    return p


def build_metadata(
    recipe_yaml: str,
    inputs: Sequence[InputInfo],
    *,
    method: str,
    seed: Union[str, int, None] = "",
    dtype: Optional[str] = "",
    out_dtype: Optional[str] = "float16",
    title: str = "",
    prediction_type: str = "epsilon",
    plugin_version: Optional[str] = None,
    mergekit_version: Optional[str] = None,
    description: str = "",
) -> Dict[str, str]:
    """The ``__metadata__`` dict of a merged SDXL checkpoint (every value a str, no dates).

    ``inputs`` in config order (the base first by convention, ``role="base"``).
    """
    if plugin_version is None:
        # version.py, not the package root: the root's register() reaches host/ and mergekit.
        from mergekit_sdxl.version import __version__ as plugin_version
    if mergekit_version is None:
        mergekit_version = _package_version("mergekit")
    seed_s = "" if seed is None else str(seed)
    pred = _normalise_prediction(prediction_type)
    title = title or "mergekit-sdxl merge"
    records = [i.to_record() for i in inputs]
    base = next((i for i in inputs if i.role == "base"), None)
    recipe_a1111: Dict[str, Any] = {
        "type": "mergekit-sdxl",
        "merge_method": method,
        "base_model_hash": base.sha256 if base else None,
        "model_hashes": [i.sha256 for i in inputs if i is not base],
        "parameters": _recipe_parameters(recipe_yaml),
        "seed": seed_s,
        "dtype": dtype or "",
        "out_dtype": out_dtype or "",
        "custom_name": title,
        "mergekit_sdxl_version": plugin_version,
        "mergekit_version": mergekit_version,
    }
    models: Dict[str, Any] = {}
    for i in inputs:
        if i.sha256 not in models:
            models[i.sha256] = {"name": i.name, "legacy_hash": _legacy(i), "sd_merge_recipe": None}
    meta: Dict[str, str] = {
        META_RECIPE: recipe_yaml,
        META_VERSION: str(plugin_version),
        META_MERGEKIT_VERSION: str(mergekit_version),
        META_METHOD: str(method),
        META_METHOD_VERSION: _dumps(_method_versions(recipe_yaml, str(method), str(mergekit_version))),
        META_SEED: seed_s,
        META_DTYPE: str(dtype or ""),
        META_OUT_DTYPE: str(out_dtype or ""),
        META_INPUTS: _dumps(records),
        A1111_RECIPE: _dumps(recipe_a1111),
        A1111_MODELS: _dumps(models),
        MODELSPEC_PREFIX + "sai_model_spec": MODELSPEC_VERSION,
        MODELSPEC_PREFIX + "architecture": MODELSPEC_ARCHITECTURE,
        MODELSPEC_PREFIX + "implementation": MODELSPEC_IMPLEMENTATION,
        MODELSPEC_PREFIX + "title": title,
        MODELSPEC_PREFIX + "resolution": MODELSPEC_RESOLUTION,
        MODELSPEC_PREDICTION_TYPE: pred,
    }
    if description:
        meta[MODELSPEC_PREFIX + "description"] = description
    for k, v in meta.items():
        if not isinstance(v, str):  # pragma: no cover - guarded by construction
            raise TypeError(f"metadata {k} is {type(v).__name__}, not str")
    return meta


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def sidecar_paths(out_path: PathLike) -> Tuple[Path, Path]:
    """``OUT.safetensors`` -> (``OUT.safetensors.json``, ``OUT.md``)."""
    out = Path(out_path)
    return out.with_name(out.name + ".json"), out.with_suffix(".md")


def _fmt_size(n: int) -> str:
    size: float = n
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000.0
    return str(size)  # pragma: no cover


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def render_model_card(
    out_path: PathLike,
    metadata: Mapping[str, str],
    result_sha256: str,
    autov2: str,
    inputs: Sequence[InputInfo],
    *,
    command: Optional[str] = None,
    config_name: Optional[str] = None,
) -> str:
    """Markdown model card (deterministic) for ``out_path``."""
    out = Path(out_path)
    recipe = metadata.get(META_RECIPE, "")
    method = metadata.get(META_METHOD, "")
    params = _recipe_parameters(recipe)
    title = metadata.get(MODELSPEC_PREFIX + "title") or out.stem
    pred = metadata.get(MODELSPEC_PREDICTION_TYPE, "epsilon")
    cfg = config_name or "config.yaml"
    cmd = command or f"mergekit-sdxl merge {shlex.quote(cfg)} {shlex.quote(out.name)}"
    lines: List[str] = [
        *CARD_FIRST_LINES,
        f"- {method}" if method else "- merge-method-unknown",
        "---",
        "",
        f"# {title}",
        "",
        f"A merge of {len(inputs)} Stable Diffusion XL checkpoints made with "
        f"mergekit-sdxl {metadata.get(META_VERSION, '')} on mergekit "
        f"{metadata.get(META_MERGEKIT_VERSION, '')}.",
        "",
        "| | |",
        "|---|---|",
        f"| file | `{out.name}` |",
        f"| sha256 | `{result_sha256}` |",
        f"| AutoV2 | `{autov2}` |",
        f"| architecture | {metadata.get(MODELSPEC_PREFIX + 'architecture', MODELSPEC_ARCHITECTURE)} |",
        f"| prediction type | {pred} |",
        f"| merge method | `{method}` |",
        f"| seed | {metadata.get(META_SEED, '') or '-'} |",
        f"| compute dtype / output dtype | {metadata.get(META_DTYPE, '') or '-'} / {metadata.get(META_OUT_DTYPE, '') or '-'} |",
        "",
        "## Parameters",
        "",
    ]
    if params:
        lines += ["| parameter | value |", "|---|---|"]
        for k in sorted(params):
            lines.append(f"| `{k}` | `{_md_escape(json.dumps(params[k], sort_keys=True))}` |")
    else:
        lines.append("The method's defaults (no top-level `parameters:`).")
    lines += [
        "",
        "## Inputs",
        "",
        "In config order. AutoV2 is CivitAI's short hash (the first 10 hex of the file's sha256).",
        "",
        "| # | role | file | size | sha256 | AutoV2 |",
        "|---:|---|---|---:|---|---|",
    ]
    for n, i in enumerate(inputs, 1):
        lines.append(
            f"| {n} | {i.role or '-'} | {_md_escape(i.name)} | {_fmt_size(int(i.size))} | `{i.sha256}` | `{i.autov2}` |"
        )
    lines += [
        "",
        "## How to reproduce",
        "",
        "Save the config below as `" + cfg + "`, put the input files (same sha256) at the paths it names, then:",
        "",
        "```sh",
        f"pip install 'mergekit-sdxl=={metadata.get(META_VERSION, '')}' 'mergekit=={metadata.get(META_MERGEKIT_VERSION, '')}'",
        cmd,
        "```",
        "",
        f"The output is deterministic: the same config and inputs give the same sha256 (`{result_sha256}`).",
        "",
        f"`{cfg}`:",
        "",
        "```yaml",
        recipe.rstrip("\n"),
        "```",
        "",
        f"The full metadata (recipe, inputs, hashes) is in `{out.name}.json` and in the file's safetensors header "
        "(`mergekit-sdxl inspect " + out.name + "`).",
        "",
    ]
    return "\n".join(lines)


def write_sidecars(
    out_path: PathLike,
    metadata: Mapping[str, str],
    result_sha256: str,
    autov2: Optional[str] = None,
    inputs: Sequence[InputInfo] = (),
    *,
    command: Optional[str] = None,
    config_name: Optional[str] = None,
    extra: Optional[Mapping[str, Any]] = None,
    size: Optional[int] = None,
) -> Tuple[Path, Path]:
    """Write ``OUT.safetensors.json`` (metadata + output hashes + inputs) and ``OUT.md`` (model card).

    Returns both paths. Each file is written to a fresh temporary name and renamed. ``size``:
    the output's size when the output is not yet under its name.
    """
    out = Path(out_path)
    if autov2 is None:
        autov2 = result_sha256[:10]
    json_path, md_path = sidecar_paths(out)
    if size is None:
        size = out.stat().st_size if out.exists() else None
    doc: Dict[str, Any] = {
        "file": out.name,
        "size": size,
        "sha256": result_sha256,
        "autov2": autov2,
        "inputs": [i.to_record() for i in inputs],
        "metadata": dict(metadata),
    }
    if extra:
        doc.update(dict(extra))
    _atomic_text(json_path, json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    card = render_model_card(out, metadata, result_sha256, autov2, inputs, command=command, config_name=config_name)
    _atomic_text(md_path, card)
    logger.info("wrote %s and %s", json_path, md_path)
    return json_path, md_path


# How every model card of ours begins: how a card under an output's name is told from a user's file.
CARD_FIRST_LINES = ("---", "tags:", "- stable-diffusion-xl", "- merge", "- mergekit-sdxl")
_MAX_SIDECAR = 64 * 1024 * 1024


def is_our_sidecar(path: PathLike) -> bool:
    """True for a model card or provenance JSON that :func:`write_sidecars` wrote."""
    try:
        if os.path.getsize(path) > _MAX_SIDECAR:
            return False
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError):
        return False
    if os.fspath(path).endswith(".md"):
        return text.splitlines()[: len(CARD_FIRST_LINES)] == list(CARD_FIRST_LINES)
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("metadata"), dict) and META_RECIPE in doc["metadata"]


def _atomic_text(path: Path, text: str) -> None:
    from mergekit_sdxl.io.safe_write import atomic_write_text

    atomic_write_text(path, text)


def is_merge_output(path: PathLike) -> bool:
    """True when ``path`` is a safetensors file whose metadata says mergekit-sdxl merged it."""
    from mergekit_sdxl.sdxl.header import CheckpointError, read_header

    try:
        return META_RECIPE in read_header(path).metadata
    except CheckpointError:
        return False
