"""From a folder of downloaded checkpoints to a mergekit config: discover, filter, write YAML.

:func:`build_recipe` finds every ``*.safetensors`` under a directory (recursively, in the order of
their relative paths), inspects each one like ``mergekit-sdxl inspect`` does, excludes with a stated
reason what must not go into the merge, and renders a mergekit YAML config:

* ``models:`` in mergekit's *mapping* form ``- model: {model: {path: "..."}}`` (file names with ``+``
  or ``@`` would be misparsed by the string form as a LoRA or a revision), each preceded by a
  ``# sha256: ...  autov2: ...  size: ...`` comment that pins the exact file;
* ``base_model:`` the same mapping form (never listed again under ``models:``; mergekit adds it to
  the inputs itself for base-less methods such as ``linear`` and ``geometric_median``);
* the method's reference parameters (``tgmd``: the AstolfoMix-XL run), ``dtype: float64``,
  ``out_dtype: float16``, and ``sdxl: {method_version: {METHOD: N}}`` pinning the method's meaning;
* a header comment listing every excluded file with its reason.

Exclusion reasons (first that applies): unreadable/truncated; not an SDXL base-family checkpoint
(SD1/SD2/SD3/Flux/refiner/inpaint/unknown); required SDXL keys missing; tensor shapes that differ
from the SDXL manifest or from the base; the base itself; a duplicate (same sha256 as the base or
an earlier kept file); v-prediction mixed with epsilon (the base's prediction type wins) unless
``allow_vpred_mix``; NaN/inf values (only with ``scan``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field

from mergekit_sdxl.errors import UserError
from mergekit_sdxl.io.discover import Discovery, discover_safetensors
from mergekit_sdxl.io.provenance import InputInfo, legacy_hash
from mergekit_sdxl.method_versions import format_method_versions, method_versions
from mergekit_sdxl.sdxl.families import MERGEABLE_FAMILIES, family_label
from mergekit_sdxl.sdxl.header import CheckpointError
from mergekit_sdxl.text import printable
from mergekit_sdxl.workflow.lora_check import lora_exclusion_reason
from mergekit_sdxl.workflow.preflight import FileReport, canonical_shapes, inspect_file

logger = logging.getLogger(__name__)

__all__ = [
    "Method",
    "METHOD_PARAMETERS",
    "RecipeError",
    "RecipeOptions",
    "RecipeResult",
    "discover_checkpoints",
    "build_recipe",
    "render_recipe_yaml",
    "config_inputs",
    "config_loras",
    "config_input_infos",
]

PathLike = Union[str, "os.PathLike[str]"]

# How refusals name what can be merged ("SDXL base-family" today).
_MERGEABLE = " or ".join(family_label(f) for f in MERGEABLE_FAMILIES)


class Method(str, Enum):
    tgmd = "tgmd"
    dgmla = "dgmla"
    ties_soup = "ties_soup"
    linear = "linear"
    geometric_median = "geometric_median"
    task_arithmetic = "task_arithmetic"


# Reference parameters per method (top-level ``parameters:``; per-model parameters placed here apply
# to every model). ``tgmd`` = the AstolfoMix-XL TGMD run (drop 0.1, no trim, DROP rescale, identity
# vote, geometric median).
METHOD_PARAMETERS: Dict[str, Dict[str, Any]] = {
    "tgmd": {
        "drop_rate": 0.1,
        "density": 1.0,
        "rescale": 0.0,
        "sign_election": "count",
        "aggregate": "median",
        "eps": 1e-6,
        "maxiter": 100,
        "ftol": 1e-20,
        "lambda": 1.0,
        "seed": 240603,
    },
    "ties_soup": {
        "drop_rate": 0.0,
        "density": 1.0,
        "rescale": 0.0,
        "sign_election": "count",
        "aggregate": "mean",
        "lambda": 1.0,
        "seed": 240603,
    },
    "linear": {"weight": 1.0, "normalize": True},
    "geometric_median": {"eps": 1e-6, "maxiter": 100, "ftol": 1e-20},
    # mergekit's own: base + the sum of weight * task vector (the LoRA bake-in; weight = strength)
    "task_arithmetic": {"weight": 1.0, "normalize": False, "lambda": 1.0},
}
# AstolfoMix-XL's DGMLA run (x215a): DELLA drop p=0.1 with epsilon -0.1, otherwise TGMD's.
METHOD_PARAMETERS["dgmla"] = {
    "drop_method": "della",
    "drop_rate": 0.1,
    "epsilon": -0.1,
    **{k: v for k, v in METHOD_PARAMETERS["tgmd"].items() if k != "drop_rate"},
    "seed": 241011,
}

_METHOD_NOTES: Dict[str, str] = {
    "tgmd": "TGMD (AstolfoMix-XL reference): DROP p=0.1, TIES identity vote, geometric median of task vectors",
    "dgmla": "DGMLA (AstolfoMix-XL x215a): DELLA drop p=0.1, epsilon -0.1 (by magnitude rank), TIES identity vote, "
    "geometric median of task vectors",
    "ties_soup": "TIES-SOUP: TIES identity vote, disjoint mean of task vectors, no drop",
    "linear": "plain average; mergekit adds base_model to the averaged inputs",
    "geometric_median": "geometric median of the models; mergekit adds base_model to the inputs",
    "task_arithmetic": "base + the sum of each input's task vector times its weight (a LoRA's weight is its strength)",
}


class RecipeError(UserError, ValueError):
    """A recipe cannot be built (no such directory, unusable base, nothing left to merge)."""


class RecipeOptions(BaseModel):
    """What ``mergekit-sdxl recipe`` takes besides the directory and the base."""

    model_config = ConfigDict(extra="forbid")

    method: Method = Method.tgmd
    scan: bool = False
    allow_vpred_mix: bool = False
    seed: Optional[int] = None
    dtype: str = "float64"
    out_dtype: str = "float16"
    parameters: Dict[str, Any] = Field(default_factory=dict, description="overrides of the method's reference parameters")


@dataclass
class RecipeResult:
    kept: List[InputInfo]  # models, in config order (the base is not among them)
    excluded: List[Tuple[str, str]]  # (absolute path, reason), in discovery order
    yaml_text: str
    base: Optional[InputInfo] = None
    method: str = "tgmd"
    prediction_type: str = "epsilon"
    directory: str = ""
    reports: Dict[str, FileReport] = field(default_factory=dict)  # absolute path -> inspection

    @property
    def inputs(self) -> List[InputInfo]:
        """Base first, then the kept models: the order provenance records."""
        return ([self.base] if self.base else []) + list(self.kept)

    def summary_lines(self) -> List[str]:
        root = Path(self.directory) if self.directory else None

        def rel(p: str) -> str:  # escaped: file names may hold control characters
            try:
                return printable(Path(p).relative_to(root).as_posix() if root else p)
            except ValueError:
                return printable(p)

        lines = [
            f"{len(self.kept)} kept, {len(self.excluded)} excluded under {printable(self.directory or '.')}; "
            f"method {self.method}; base {printable(self.base.path) if self.base else '-'} ({self.prediction_type})"
        ]
        width = max([len(rel(i.path)) for i in self.kept] + [len(rel(p)) for p, _ in self.excluded] + [4])
        for i in self.kept:
            lines.append(f"  keep     {rel(i.path):<{width}}  autov2 {i.autov2}  sha256 {i.sha256}")
        for p, reason in self.excluded:
            lines.append(f"  exclude  {rel(p):<{width}}  {printable(reason)}")
        return lines


def _discover(directory: PathLike) -> Discovery:
    """:func:`~mergekit_sdxl.io.discover.discover_safetensors`, its problems logged."""
    root = Path(directory)
    try:
        found = discover_safetensors(root)
    except OSError as e:  # the folder itself: missing, not a folder, not accessible
        raise RecipeError(f"{printable(root)}: {e.strerror or 'not a directory'}") from None
    for path, reason in found.problems:
        logger.warning("%s: %s", printable(path), reason)
    return found


def discover_checkpoints(directory: PathLike) -> List[Path]:
    """Every ``*.safetensors`` file under ``directory`` (recursive, symlinks followed, each real
    folder and file once), sorted by relative POSIX path so the order is the same on every machine.
    Unreadable folders and files are logged as warnings (:func:`build_recipe` lists them as
    excluded). Raises :class:`RecipeError` when ``directory`` is not a directory."""
    return _discover(directory).files


# The first line of every recipe written here: how a recipe of ours is told from a user's config.
RECIPE_HEADER = "mergekit-sdxl recipe:"


def is_our_recipe(path: PathLike) -> bool:
    """True for a config file that :func:`build_recipe` wrote (so it may be rewritten)."""
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline(4096)
    except (OSError, UnicodeDecodeError):
        return False
    return first.startswith(f"# {RECIPE_HEADER}")


def refuse_writes_over_inputs(
    writes: Sequence[PathLike], directory: PathLike, base: PathLike, *, own_outputs_allowed: bool
) -> None:
    """Before any hashing: no path in ``writes`` may be the base or a checkpoint under
    ``directory`` (with ``own_outputs_allowed``, an earlier merge output under a written name is
    not an input: it is left out of the recipe instead)."""
    from mergekit_sdxl.io.output_guard import check_writes_do_not_clash
    from mergekit_sdxl.io.provenance import is_merge_output

    check_writes_do_not_clash(writes, [(base, "the base model")])
    found = _discover(directory).files
    inputs = [(f, "the checkpoint") for f in found if not (own_outputs_allowed and is_merge_output(f))]
    check_writes_do_not_clash(writes, inputs)


def _yaml_str(s: str) -> str:
    """A double-quoted YAML scalar (JSON string syntax is valid YAML). Characters that are not
    printable (bidi overrides, zero-width marks) are escaped so the YAML reads as it is."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else c for c in json.dumps(s, ensure_ascii=False))


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        r = repr(v)
        # YAML 1.1 (PyYAML) reads "1e-06" as a string: it needs a dot in the mantissa.
        if "e" in r and "." not in r.split("e")[0]:
            m, e = r.split("e")
            r = f"{m}.0e{e}"
        return r
    if isinstance(v, str):
        return v if v.replace("_", "").isalnum() and not v[0].isdigit() and v.lower() not in ("true", "false", "null", "yes", "no", "on", "off") else _yaml_str(v)
    return json.dumps(v)


def _comment(s: str) -> str:
    """One comment line's worth of text: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _pin(info: InputInfo) -> str:
    return f"# sha256: {info.sha256}  autov2: {info.autov2}  size: {info.size}"


def render_recipe_yaml(
    base: InputInfo,
    kept: Sequence[InputInfo],
    excluded: Sequence[Tuple[str, str]],
    *,
    method: str,
    parameters: Dict[str, Any],
    dtype: str = "float64",
    out_dtype: str = "float16",
    allow_vpred_mix: bool = False,
    header_lines: Sequence[str] = (),
) -> str:
    """The mergekit YAML text (with pin and exclusion comments)."""
    out: List[str] = []
    for line in header_lines:
        out.append(f"# {_comment(line)}" if line else "#")
    out.append(f"# method: {_METHOD_NOTES.get(method, method)}")
    out.append(f"# kept: {len(kept)} models + base; excluded: {len(excluded)}")
    if excluded:
        out.append("# excluded:")
        for p, reason in excluded:
            out.append(f"#   {_comment(p)}: {_comment(reason)}")
    out.append("")
    out.append(f"merge_method: {method}")
    out.append(_pin(base))
    out.append(f"base_model: {{model: {{path: {_yaml_str(base.path)}}}}}")
    out.append("models:")
    for info in kept:
        out.append(f"  {_pin(info)}")
        out.append(f"  - model: {{model: {{path: {_yaml_str(info.path)}}}}}")
    out.append("parameters:")
    for k, v in parameters.items():
        out.append(f"  {k}: {_yaml_scalar(v)}")
    out.append(f"dtype: {dtype}")
    out.append(f"out_dtype: {out_dtype}")
    out.append("sdxl:")
    # The meaning the config was written for: a later mergekit-sdxl that changed it refuses the pin.
    out.append(f"  method_version: {format_method_versions(method_versions([method]))}")
    if allow_vpred_mix:
        out.append("  allow_vpred_mix: true")
    return "\n".join(out) + "\n"


def _info(rep: FileReport, role: str) -> InputInfo:
    assert rep.sha256 is not None and rep.autov2 is not None
    try:
        lh = legacy_hash(rep.path)
    except OSError:
        lh = ""
    return InputInfo(path=rep.path, size=rep.size, sha256=rep.sha256, autov2=rep.autov2, role=role, legacy_hash=lh)


def _nonfinite_reason(rep: FileReport) -> Optional[str]:
    if rep.scan is None or not rep.scan.total:
        return None
    comps = ", ".join(f"{c} {n}" for c, n in rep.scan.per_component.items() if n)
    first = next(iter(rep.scan.per_key))
    return f"{rep.scan.total} NaN/inf values ({comps}; first in {first})"


def build_recipe(
    directory: PathLike,
    base: PathLike,
    method: Union[str, Method] = "tgmd",
    *,
    scan: bool = False,
    allow_vpred_mix: bool = False,
    seed: Optional[int] = None,
    parameters: Optional[Dict[str, Any]] = None,
    dtype: str = "float64",
    out_dtype: str = "float16",
    cache=None,
    command: Optional[str] = None,
    skip: Optional[Callable[[Path], Optional[str]]] = None,
) -> RecipeResult:
    """Discover, validate and filter the checkpoints under ``directory``; render the config.

    ``skip(path)`` gives a reason to leave a discovered file out before it is read (the
    command's own outputs, see :class:`~mergekit_sdxl.io.output_guard.OwnOutputs`).

    Raises :class:`RecipeError` when the directory does not exist, the base is unusable (unreadable,
    not SDXL base-family, missing keys) or no model is left. ``cache`` is a
    :class:`~mergekit_sdxl.io.hashing.HashCache` (default: the user cache).
    """
    opts = _recipe_options(
        method, scan=scan, allow_vpred_mix=allow_vpred_mix, seed=seed, dtype=dtype, out_dtype=out_dtype, parameters=parameters
    )
    method_s = opts.method.value
    if cache is None:
        from mergekit_sdxl.io.hashing import HashCache

        cache = HashCache()
    root = Path(directory).resolve()
    found = _discover(root)
    base_path = Path(base).resolve()
    base_rep = _checked_base(base_path, scan, cache)
    base_info = _info(base_rep, "base")
    chosen = _choose_models(root, found, base_path, base_rep, base_info, cache, scan, allow_vpred_mix, skip)
    base_pred = chosen.base_pred
    params = _method_parameters(method_s, opts.parameters, seed)
    header = _header_lines(method_s, len(chosen.kept), root, command, base_pred, allow_vpred_mix)
    text = render_recipe_yaml(
        base_info, chosen.kept, chosen.excluded, method=method_s, parameters=params, dtype=opts.dtype,
        out_dtype=opts.out_dtype, allow_vpred_mix=allow_vpred_mix, header_lines=header,
    )
    return RecipeResult(
        kept=chosen.kept, excluded=chosen.excluded, yaml_text=text, base=base_info, method=method_s,
        prediction_type=base_pred, directory=str(root), reports=chosen.reports,
    )


def _recipe_options(
    method: Union[str, Method],
    *,
    scan: bool,
    allow_vpred_mix: bool,
    seed: Optional[int],
    dtype: str,
    out_dtype: str,
    parameters: Optional[Dict[str, Any]],
) -> RecipeOptions:
    """The recipe's options, validated (an unknown method raises ``ValueError``)."""
    method_s = Method(method).value if not isinstance(method, Method) else method.value
    return RecipeOptions(
        method=Method(method_s), scan=scan, allow_vpred_mix=allow_vpred_mix, seed=seed,
        dtype=dtype, out_dtype=out_dtype, parameters=dict(parameters or {}),
    )


def _checked_base(base_path: Path, scan: bool, cache: Any) -> FileReport:
    """The base's inspection (hashed, scanned with ``scan``); :class:`RecipeError` when the base is
    unreadable, not SDXL base-family, missing keys or holding NaN/inf values."""
    base_rep = inspect_file(base_path, hash=True, scan=scan, cache=cache)
    if not base_rep.ok:
        raise RecipeError(f"base model {base_path}: {base_rep.error}")
    bdet = base_rep.detection
    assert bdet is not None
    if bdet.family not in MERGEABLE_FAMILIES:
        raise RecipeError(
            f"base model {base_path}: {family_label(bdet.family)} checkpoint (family {bdet.family}); "
            f"the base must be an {_MERGEABLE} checkpoint"
        )
    if bdet.missing:
        raise RecipeError(f"base model {base_path}: {len(bdet.missing)} required SDXL keys missing, e.g. {bdet.missing[0]}")
    if base_rep.scan is not None and base_rep.scan.total:
        raise RecipeError(f"base model {base_path}: {base_rep.scan.describe()}")
    return base_rep


@dataclass
class _Choice:
    """The discovered files sorted into kept and excluded ones."""

    base_pred: str
    kept: List[InputInfo] = field(default_factory=list)
    excluded: List[Tuple[str, str]] = field(default_factory=list)
    reports: Dict[str, FileReport] = field(default_factory=dict)
    seen: Dict[str, str] = field(default_factory=dict)  # sha256 -> what has it (for duplicates)


def _choose_models(
    root: Path,
    found: Discovery,
    base_path: Path,
    base_rep: FileReport,
    base_info: InputInfo,
    cache: Any,
    scan: bool,
    allow_vpred_mix: bool,
    skip: Optional[Callable[[Path], Optional[str]]],
) -> _Choice:
    """Keep or exclude (with its reason) every discovered file, in path order; :class:`RecipeError`
    when no model is kept."""
    assert base_rep.detection is not None and base_rep.header is not None
    base_shapes = canonical_shapes(base_rep.header)
    chosen = _Choice(
        base_pred=base_rep.detection.prediction_type,
        reports={str(base_path): base_rep},
        seen={base_info.sha256: f"the base model {base_path.name}"},
    )
    # Folders and files discovery could not read are excluded rows too (never silently dropped),
    # in path order among the files.
    problems = {str(path): problem for path, problem in found.problems}
    order = sorted([(_rel(path, root), str(path)) for path in found.files] + [(_rel(Path(p), root), p) for p in problems])
    for rel, p in order:
        if p in problems:
            chosen.excluded.append((p, f"unreadable: {problems[p]}"))
            continue
        own = skip(Path(p)) if skip is not None else None
        if own is not None:
            chosen.excluded.append((p, own))
            continue
        _choose_file(chosen, rel, p, cache, scan, base_shapes, allow_vpred_mix, base_path)
    if not chosen.kept:
        detail = "; ".join(f"{Path(p).name}: {r}" for p, r in chosen.excluded) or "no .safetensors files found"
        raise RecipeError(f"no usable SDXL checkpoints under {root} besides the base ({detail})")
    return chosen


def _choose_file(
    chosen: _Choice,
    rel: str,
    p: str,
    cache: Any,
    scan: bool,
    base_shapes: Dict[str, Tuple[int, ...]],
    allow_vpred_mix: bool,
    base_path: Path,
) -> None:
    """Keep one discovered file or exclude it with its reason."""
    base_pred = chosen.base_pred
    # A bad file is an excluded row with its reason, whatever is wrong with it: inspect_file
    # turns CheckpointError/OSError into rep.error; what is left here is plain file access.
    try:
        reason, rep = _file_verdict(p, cache, scan, chosen.seen, base_shapes, base_pred, allow_vpred_mix, base_path)
    except CheckpointError as e:
        reason, rep = f"unreadable: {e.message}", None
    except OSError as e:
        reason, rep = f"unreadable: {e.strerror or e}", None
    if rep is not None:
        chosen.reports[p] = rep
    if reason is not None:
        logger.info("excluding %s: %s", printable(rel), reason)
        chosen.excluded.append((p, reason))
        return
    assert rep is not None
    assert rep.sha256 is not None
    chosen.seen[rep.sha256] = rel
    if rep.detection is not None and rep.detection.extra:
        logger.warning("%s: %d keys outside the SDXL manifest will be ignored by the merge", printable(rel), len(rep.detection.extra))
    if rep.detection is not None and rep.detection.prediction_type != base_pred:
        logger.warning("%s: %s model kept beside a %s base (allow_vpred_mix)", printable(rel), rep.detection.prediction_type, base_pred)
    chosen.kept.append(_info(rep, "model"))


def _method_parameters(method_s: str, overrides: Dict[str, Any], seed: Optional[int]) -> Dict[str, Any]:
    """The method's reference parameters, with the overrides and the seed (for a method that takes one)."""
    params = dict(METHOD_PARAMETERS[method_s])
    params.update(overrides)
    if seed is not None:
        if "seed" in params:
            params["seed"] = int(seed)
        else:
            logger.warning("method %s takes no seed; --seed %s ignored", method_s, seed)
    return params


def _header_lines(
    method_s: str, n_kept: int, root: Path, command: Optional[str], base_pred: str, allow_vpred_mix: bool
) -> List[str]:
    """The comment lines at the top of the recipe."""
    return [
        f"{RECIPE_HEADER} {method_s} over {n_kept} models under {root}",
        f"generated by: {command}" if command else "generated by: mergekit-sdxl recipe",
        f"base prediction type: {base_pred}" + (" (v-pred/eps mixing allowed)" if allow_vpred_mix else ""),
        "every input is pinned by the sha256 of the whole file; AutoV2 = its first 10 hex (CivitAI)",
        "merge with: mergekit-sdxl merge THIS.yaml OUT.safetensors",
    ]


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _file_verdict(
    p: str,
    cache: Any,
    scan: bool,
    seen: Dict[str, str],
    base_shapes: Dict[str, Tuple[int, ...]],
    base_pred: str,
    allow_vpred_mix: bool,
    base_path: Path,
) -> Tuple[Optional[str], Optional[FileReport]]:
    """(reason to exclude or None, the file's report) for one discovered file."""
    try:
        p.encode("utf-8")
    except UnicodeEncodeError:  # an undecodable file name (surrogate escapes) cannot go into the YAML
        return "file name is not valid UTF-8 (rename it to use it in a config)", None
    if os.path.exists(p) and os.path.samefile(p, base_path):
        return "is the base model (already base_model)", None
    rep = inspect_file(p, hash=False, scan=False, cache=cache)
    reason = _exclusion_reason(rep, base_shapes, base_pred, allow_vpred_mix, base_path)
    if reason is None:
        rep = inspect_file(p, hash=True, scan=scan, cache=cache)
        if not rep.ok:
            reason = f"unreadable: {rep.error}"
        elif rep.sha256 in seen:
            reason = f"duplicate of {seen[rep.sha256]} (same sha256 {rep.autov2})"
        else:
            reason = _nonfinite_reason(rep)
    return reason, rep


def _exclusion_reason(
    rep: FileReport, base_shapes: Dict[str, Tuple[int, ...]], base_pred: str, allow_vpred_mix: bool, base_path: Path
) -> Optional[str]:
    """Header-level reason to exclude a file (before hashing), or None."""
    if not rep.ok:
        return f"unreadable: {rep.error}"
    lora_reason = lora_exclusion_reason(rep)
    if lora_reason is not None:
        return lora_reason
    det = rep.detection
    assert det is not None and rep.header is not None
    if det.family not in MERGEABLE_FAMILIES:
        label = family_label(det.family)
        extra = f"; {det.notes[0]}" if det.notes and det.family == "unknown" else ""
        return f"not an {_MERGEABLE} checkpoint: {label} (family {det.family}){extra}"
    if det.missing:
        return f"{len(det.missing)} required SDXL keys missing (e.g. {det.missing[0]})"
    if det.wrong_shape:
        k, e, g = det.wrong_shape[0]
        return f"{len(det.wrong_shape)} tensors with wrong shapes (e.g. {k}: {list(g)}, SDXL expects {list(e)})"
    shapes = canonical_shapes(rep.header)
    diff = [k for k, s in shapes.items() if k in base_shapes and base_shapes[k] != s]
    if diff:
        k = diff[0]
        return f"{len(diff)} tensors differ in shape from the base (e.g. {k}: {list(shapes[k])} vs {list(base_shapes[k])})"
    if det.prediction_type != base_pred and not allow_vpred_mix:
        what = "v-prediction" if det.v_pred else "epsilon-prediction"
        other = "v-prediction" if base_pred == "v" else "epsilon-prediction"
        return f"{what} model, but the base is {other} (pass --allow-vpred-mix to keep it)"
    return None


def config_inputs(config: Any) -> List[Tuple[str, str]]:
    """``(path, role)`` of every input a mergekit config references, in a stable order: the base
    first (``"base"``), then ``models:`` / slices / modules in the order written (``"model"``),
    each LoRA file right after the model it is applied to (``"lora"``), each path once.
    Duck-typed on ``MergeConfiguration`` (``base_model``, ``models``, ``slices``, ``modules``), so
    it works before or after mergekit normalises the config.

    Use it for provenance instead of ``MergeConfiguration.referenced_models()`` (a set: its order
    changes from run to run, and so would the metadata and the output's sha256).
    """
    out: List[Tuple[str, str]] = []

    def add(ref: Any, role: str) -> None:
        if ref is None:
            return
        path = ref.model.path if hasattr(ref, "model") else str(ref)
        if all(p != path for p, _ in out):
            out.append((path, role))
        lora = getattr(ref, "lora", None)
        if lora is not None and all(p != lora.path for p, _ in out):
            out.append((lora.path, "lora"))

    add(getattr(config, "base_model", None), "base")
    for m in getattr(config, "models", None) or []:
        add(m.model, "model")
    for s in getattr(config, "slices", None) or []:
        add(getattr(s, "base_model", None), "base")
        for src in s.sources:
            add(src.model, "model")
    for mod in (getattr(config, "modules", None) or {}).values():
        for m in mod.models or []:
            add(m.model, "model")
        for s in mod.slices or []:
            add(getattr(s, "base_model", None), "base")
            for src in s.sources:
                add(src.model, "model")
    return out


def config_loras(config: Any) -> List[Tuple[str, str]]:
    """``(model path, LoRA path)`` of every model reference of a config that carries a LoRA, in
    :func:`config_inputs` order, each pair once."""
    out: List[Tuple[str, str]] = []
    refs: List[Any] = [getattr(config, "base_model", None)]
    refs += [m.model for m in getattr(config, "models", None) or []]
    for s in getattr(config, "slices", None) or []:
        refs += [getattr(s, "base_model", None)] + [src.model for src in s.sources]
    for mod in (getattr(config, "modules", None) or {}).values():
        refs += [m.model for m in mod.models or []]
        for s in mod.slices or []:
            refs += [getattr(s, "base_model", None)] + [src.model for src in s.sources]
    for ref in refs:
        lora = getattr(ref, "lora", None) if ref is not None else None
        if lora is not None and (ref.model.path, lora.path) not in out:
            out.append((ref.model.path, lora.path))
    return out


def config_input_infos(config: Any, cache=None, extra_paths: Sequence[Tuple[str, str]] = ()) -> List[InputInfo]:
    """:class:`InputInfo` (size, cached sha256, AutoV2, legacy hash, role) of every input of a
    config in :func:`config_inputs` order, for :func:`~mergekit_sdxl.io.provenance.build_metadata`.
    ``extra_paths``: more ``(path, role)`` pairs, e.g. ``(vae_source, "vae")``."""
    from mergekit_sdxl.io.provenance import input_info

    if cache is None:
        from mergekit_sdxl.io.hashing import HashCache

        cache = HashCache()
    pairs = config_inputs(config)
    for p, role in extra_paths:
        if all(q != p for q, _ in pairs):
            pairs.append((p, role))
    return [input_info(p, role=role, cache=cache) for p, role in pairs]
