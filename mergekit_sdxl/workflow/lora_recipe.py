"""From a folder of LoRA files to a mergekit config that bakes them into a base.

:func:`build_lora_recipe` finds every ``*.safetensors`` under a folder (recursively, in the order
of their relative paths), keeps the LoRA / LyCORIS files that fit the base (checked from the
headers like a merge checks them: the family they were trained for, every module mapping to an
SDXL key, factor shapes that fit the base's keys), excludes the rest with a stated reason, and
writes one model per LoRA in mergekit's own grammar::

    # sha256: ...  autov2: ...  size: ...
    - model: {model: {path: "base.safetensors"}, lora: {path: "style.safetensors"}}
      parameters: {weight: 1.0}

with ``task_arithmetic`` by default (base + the sum of each LoRA's change times its weight:
kohya's ``merge_lora.py`` bake, the weight being the LoRA's strength). Any other method of
:class:`~mergekit_sdxl.workflow.recipe.Method` (``tgmd`` ...) merges the LoRAs' task vectors
instead. Each LoRA and the base are pinned by sha256.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from mergekit_sdxl.io.provenance import InputInfo
from mergekit_sdxl.sdxl.header import CheckpointError
from mergekit_sdxl.text import printable
from mergekit_sdxl.workflow.lora_check import check_lora
from mergekit_sdxl.workflow.preflight import FileReport, canonical_shapes, inspect_file
from mergekit_sdxl.workflow.recipe import (
    RECIPE_HEADER,
    Method,
    RecipeError,
    RecipeResult,
    _checked_base,
    _comment,
    _discover,
    _info,
    _method_parameters,
    _pin,
    _rel,
    _yaml_scalar,
    _yaml_str,
)

logger = logging.getLogger(__name__)

__all__ = ["build_lora_recipe", "render_lora_recipe_yaml", "LORA_METHOD_DEFAULT"]

LORA_METHOD_DEFAULT = "task_arithmetic"
_STRENGTH_METHODS = ("task_arithmetic",)  # where an entry's weight is the LoRA's strength


@dataclass
class _Chosen:
    kept: List[InputInfo] = field(default_factory=list)
    excluded: List[Tuple[str, str]] = field(default_factory=list)
    reports: Dict[str, FileReport] = field(default_factory=dict)
    seen: Dict[str, str] = field(default_factory=dict)  # sha256 -> what has it


def render_lora_recipe_yaml(
    base: InputInfo,
    loras: Sequence[InputInfo],
    excluded: Sequence[Tuple[str, str]],
    *,
    method: str,
    parameters: Dict[str, Any],
    dtype: str,
    out_dtype: str,
    header_lines: Sequence[str] = (),
) -> str:
    """The YAML text: one ``{model: base, lora: file}`` model per LoRA, each pinned."""
    out: List[str] = [f"# {_comment(line)}" if line else "#" for line in header_lines]
    out.append(f"# kept: {len(loras)} LoRAs on the base; excluded: {len(excluded)}")
    if excluded:
        out.append("# excluded:")
        out.extend(f"#   {_comment(p)}: {_comment(reason)}" for p, reason in excluded)
    out.append("")
    out.append(f"merge_method: {method}")
    out.append(_pin(base))
    base_ref = f"{{path: {_yaml_str(base.path)}}}"
    out.append(f"base_model: {{model: {base_ref}}}")
    out.append("models:")
    per_entry = "weight" in parameters and method in _STRENGTH_METHODS
    for info in loras:
        out.append(f"  {_pin(info)}")
        out.append(f"  - model: {{model: {base_ref}, lora: {{path: {_yaml_str(info.path)}}}}}")
        if per_entry:
            out.append(f"    parameters: {{weight: {_yaml_scalar(parameters['weight'])}}}")
    shared = {k: v for k, v in parameters.items() if not (per_entry and k == "weight")}
    if shared:
        out.append("parameters:")
        out.extend(f"  {k}: {_yaml_scalar(v)}" for k, v in shared.items())
    out.append(f"dtype: {dtype}")
    out.append(f"out_dtype: {out_dtype}")
    return "\n".join(out) + "\n"


def build_lora_recipe(
    directory: Union[str, os.PathLike[str]],
    base: Union[str, os.PathLike[str]],
    method: Union[str, Method] = LORA_METHOD_DEFAULT,
    *,
    scan: bool = False,
    seed: Optional[int] = None,
    parameters: Optional[Dict[str, Any]] = None,
    dtype: str = "float32",
    out_dtype: str = "float16",
    cache: Any = None,
    command: Optional[str] = None,
) -> RecipeResult:
    """Discover the LoRA files under ``directory``, keep those that fit ``base``, render the config.

    Raises :class:`~mergekit_sdxl.workflow.recipe.RecipeError` when the folder does not exist, the
    base is unusable or no LoRA is kept (the reasons of every exclusion named).
    """
    method_s = Method(method).value if not isinstance(method, Method) else method.value
    if cache is None:
        from mergekit_sdxl.io.hashing import HashCache

        cache = HashCache()
    root = Path(directory).resolve()
    found = _discover(root)
    base_path = Path(base).resolve()
    base_rep = _checked_base(base_path, scan, cache)
    base_info = _info(base_rep, "base")
    assert base_rep.header is not None
    shapes = canonical_shapes(base_rep.header)
    chosen = _Chosen(reports={str(base_path): base_rep}, seen={base_info.sha256: f"the base model {base_path.name}"})
    problems = {str(path): problem for path, problem in found.problems}
    order = sorted([(_rel(p, root), str(p)) for p in found.files] + [(_rel(Path(p), root), p) for p in problems])
    for rel, p in order:
        if p in problems:
            chosen.excluded.append((p, f"unreadable: {problems[p]}"))
            continue
        if os.path.exists(p) and os.path.samefile(p, base_path):
            chosen.excluded.append((p, "is the base model"))
            continue
        reason = _verdict(chosen, p, rel, shapes, base_path.name, scan, cache)
        if reason is not None:
            logger.info("excluding %s: %s", printable(rel), reason)
            chosen.excluded.append((p, reason))
    if not chosen.kept:
        detail = "; ".join(f"{Path(p).name}: {r}" for p, r in chosen.excluded) or "no .safetensors files found"
        raise RecipeError(f"no LoRA under {root} fits the base {base_path.name} ({detail})")
    params = _method_parameters(method_s, dict(parameters or {}), seed)
    header = [
        f"{RECIPE_HEADER} {method_s} of {len(chosen.kept)} LoRAs under {root} on {base_path.name}",
        f"generated by: {command}" if command else "generated by: mergekit-sdxl recipe --loras",
        "each model is the base with one LoRA (kohya's scale: alpha / rank)"
        + ("; an entry's weight is that LoRA's strength" if method_s in _STRENGTH_METHODS else ""),
        "every input is pinned by the sha256 of the whole file; AutoV2 = its first 10 hex (CivitAI)",
        "merge with: mergekit-sdxl merge THIS.yaml OUT.safetensors",
    ]
    text = render_lora_recipe_yaml(
        base_info, chosen.kept, chosen.excluded, method=method_s, parameters=params, dtype=dtype,
        out_dtype=out_dtype, header_lines=header,
    )
    return RecipeResult(
        kept=chosen.kept, excluded=chosen.excluded, yaml_text=text, base=base_info, method=method_s,
        prediction_type=base_rep.detection.prediction_type if base_rep.detection else "epsilon",
        directory=str(root), reports=chosen.reports,
    )


def _verdict(
    chosen: _Chosen, p: str, rel: str, shapes: Dict[str, Tuple[int, ...]], base_name: str, scan: bool, cache: Any
) -> Optional[str]:
    """Keep one discovered file (appended to ``chosen.kept``) or give the reason to exclude it."""
    try:
        p.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (rename it to use it in a config)"
    rep = inspect_file(p, hash=False, scan=False, cache=cache)
    if not rep.ok:
        return f"unreadable: {rep.error}"
    if rep.lora is None:
        family = rep.detection.family if rep.detection is not None else "unknown"
        return f"not a LoRA file (a {family} checkpoint or another file)"
    try:
        check_lora(p, shapes, base_name)
    except CheckpointError as error:
        return error.message + (f" [{error.key}]" if error.key else "")
    rep = inspect_file(p, hash=True, scan=scan, cache=cache)
    if not rep.ok:
        return f"unreadable: {rep.error}"
    assert rep.sha256 is not None
    if rep.sha256 in chosen.seen:
        return f"duplicate of {chosen.seen[rep.sha256]} (same sha256 {rep.autov2})"
    if rep.scan is not None and rep.scan.total:
        return f"{rep.scan.total} NaN/inf values"
    chosen.reports[p] = rep
    chosen.seen[rep.sha256] = rel
    chosen.kept.append(_info(rep, "lora"))
    return None
