"""Validation of merge inputs before any tensor math, and per-file inspection.

* :func:`preflight` checks a list of input checkpoints (the base included or not) and raises one
  :class:`PreflightError` listing *every* problem, each naming the file (and the key where there is
  one): unreadable/truncated files, mixed architecture families, v-prediction mixed with epsilon,
  missing non-optional keys, shapes that disagree with the manifest or with the base. With
  ``scan=True`` it also reads every tensor once and reports NaN/inf counts.
* :func:`inspect_file` is what ``mergekit-sdxl inspect`` and ``mergekit-sdxl recipe`` show per file:
  header facts (:func:`~mergekit_sdxl.sdxl.detect.detect`), size, sha256/AutoV2 (cached), and the
  optional NaN/inf scan.
* :func:`scan_nonfinite` reads tensors one at a time through ``safetensors.safe_open``.

Nothing here needs mergekit: inputs are plain paths.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from mergekit_sdxl.errors import UserError
from mergekit_sdxl.sdxl import dtypes
from mergekit_sdxl.sdxl import keys as sdxl_keys
from mergekit_sdxl.sdxl.detect import Detection, detect
from mergekit_sdxl.sdxl.families import FAMILY_LABELS, MERGEABLE_FAMILIES, family_label
from mergekit_sdxl.sdxl.header import CheckpointError, SafetensorsHeader, read_header
from mergekit_sdxl.sdxl.keys import canonical_name
from mergekit_sdxl.sdxl.lora_detect import LoraDetection, detect_lora, is_lora_header
from mergekit_sdxl.sdxl.manifest import COMPONENT_PREFIXES, component_of

logger = logging.getLogger(__name__)

__all__ = [
    "PreflightError",
    "PreflightReport",
    "ScanResult",
    "FileReport",
    "preflight",
    "scan_nonfinite",
    "inspect_file",
    "MERGEABLE_FAMILIES",
    "FAMILY_LABELS",
    "canonical_shapes",
]

PathLike = Union[str, "os.PathLike[str]"]

# MERGEABLE_FAMILIES (what the loader merges; all inputs of one merge share it) and FAMILY_LABELS
# are re-exported from mergekit_sdxl.sdxl.families, the one place the family facts live.

_MAX_KEYS_LISTED = 8


class PreflightError(UserError, ValueError):
    """Inputs that must not be merged. ``problems`` lists each one (file and key named);
    ``report`` is the :class:`PreflightReport` gathered so far."""

    def __init__(self, problems: Sequence[str], report: Optional[PreflightReport] = None) -> None:
        self.problems = list(problems)
        self.report = report
        n = len(self.problems)
        head = f"preflight found {n} problem{'s' if n != 1 else ''} with the merge inputs:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


@dataclass
class ScanResult:
    """Non-finite values of one file: total per component, and per key (keys with any)."""

    per_component: Dict[str, int] = field(default_factory=dict)  # unet/clip_l/clip_g/vae/other
    per_key: Dict[str, int] = field(default_factory=dict)
    tensors_read: int = 0
    bytes_read: int = 0

    @property
    def total(self) -> int:
        return sum(self.per_component.values())

    def describe(self, limit: int = _MAX_KEYS_LISTED) -> str:
        comps = ", ".join(f"{c} {n}" for c, n in self.per_component.items() if n)
        keys = list(self.per_key)
        shown = ", ".join(f"{k} ({self.per_key[k]})" for k in keys[:limit])
        more = f" and {len(keys) - limit} more keys" if len(keys) > limit else ""
        return f"{self.total} NaN/inf values ({comps}) in {shown}{more}"


def scan_nonfinite(path: PathLike, header: Optional[SafetensorsHeader] = None) -> ScanResult:
    """Count NaN/inf per component, reading one tensor at a time (safetensors ``safe_open``).

    Integer tensors are skipped. Raises :class:`CheckpointError` naming the file (and key) when a
    tensor cannot be read.
    """
    import torch
    from safetensors import safe_open

    p = os.fspath(path)
    header = header if header is not None else read_header(p)
    result = ScanResult(per_component={c: 0 for c in COMPONENT_PREFIXES})
    result.per_component["other"] = 0
    # Real float dtypes this torch can load; integers and bools cannot hold NaN/inf.
    float_dtypes = {name for name in dtypes.READABLE if dtypes.is_float(name)}
    # File-offset order: one sequential pass over the file.
    names = sorted(header.tensors, key=lambda k: header.tensors[k].data_offsets[0])
    try:
        handle = safe_open(p, framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(p, f"cannot open for reading tensors: {e}") from e
    with handle as f:
        for key in names:
            info = header.tensors[key]
            if info.dtype not in float_dtypes or info.numel == 0:
                continue
            try:
                t = f.get_tensor(key)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(p, f"cannot read tensor: {e}", key=key) from e
            if t.element_size() == 1:
                # isfinite has no float8 kernels; float32 holds every float8 value (float16 would
                # overflow F8_E8M0's 2**127 to inf and report it as non-finite).
                t = t.to(torch.float32)
            bad = int(t.numel() - torch.isfinite(t).sum().item())
            result.tensors_read += 1
            result.bytes_read += info.nbytes
            del t
            if bad:
                comp = component_of(key) or "other"
                result.per_component[comp] += bad
                result.per_key[key] = bad
    return result


@dataclass
class FileReport:
    """One file as ``inspect`` shows it. ``error`` set means the file is unusable (the rest is empty)."""

    path: str
    size: int = 0
    detection: Optional[Detection] = None
    sha256: Optional[str] = None
    autov2: Optional[str] = None
    scan: Optional[ScanResult] = None
    error: Optional[str] = None
    header: Optional[SafetensorsHeader] = field(default=None, repr=False)
    lora: Optional[LoraDetection] = None  # set for a LoRA / LyCORIS file (not a checkpoint)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256, "autov2": self.autov2}
        if self.error is not None:
            d["error"] = self.error
            return d
        assert self.detection is not None
        d.update(self.detection.to_dict())
        if self.lora is not None:
            d["lora"] = self.lora.to_dict()
        d["n_missing"] = len(self.detection.missing)
        d["n_extra"] = len(self.detection.extra)
        d["n_wrong_shape"] = len(self.detection.wrong_shape)
        if self.scan is not None:
            d["nonfinite"] = {
                "total": self.scan.total,
                "per_component": dict(self.scan.per_component),
                "per_key": dict(self.scan.per_key),
            }
        return d


def inspect_file(path: PathLike, *, hash: bool = True, scan: bool = False, cache=None, progress: bool = False) -> FileReport:
    """Header facts, size, (cached) sha256 + AutoV2 and optionally a NaN/inf scan of one file.

    Never raises for a bad file: every :class:`CheckpointError` (read_header refuses any malformed
    header with one) and :class:`OSError` goes to ``FileReport.error`` ("file not found",
    "truncated: ...", ...). Anything else is a bug and propagates.
    """
    p = os.fspath(path)
    rep = FileReport(path=p)
    try:
        if not os.path.exists(p):
            raise CheckpointError(p, "file not found")
        if os.path.isdir(p):
            raise CheckpointError(p, "is a directory, not a .safetensors file")
        rep.size = os.path.getsize(p)
        rep.header = read_header(p)  # raises only CheckpointError
        rep.detection = detect(rep.header)
        if is_lora_header(rep.header):
            rep.lora = detect_lora(rep.header)
        if hash:
            from mergekit_sdxl.io.hashing import HashCache, autov2

            cache = cache if cache is not None else HashCache()
            rep.sha256 = cache.sha256(p, progress=progress)
            rep.autov2 = autov2(rep.sha256)
        if scan:
            rep.scan = scan_nonfinite(p, rep.header)
    except CheckpointError as e:
        key = e.key if e.key is None or len(e.key) <= 200 else e.key[:200] + "..."  # forged names can be huge
        rep.error = e.message + (f" [tensor {key!r}]" if key is not None else "")
        rep.detection = rep.header = None
    except OSError as e:
        rep.error = f"cannot read: {e.strerror or e}"
        rep.detection = rep.header = None
    return rep


@dataclass
class PreflightReport:
    """What preflight learned. Byte counts are for one full pass over the inputs."""

    files: List[str] = field(default_factory=list)  # unique inputs, base first when given
    base: Optional[str] = None
    families: Dict[str, str] = field(default_factory=dict)
    prediction_types: Dict[str, str] = field(default_factory=dict)  # "epsilon" | "v"
    missing_keys: Dict[str, List[str]] = field(default_factory=dict)  # non-optional, per file
    extra_keys: Dict[str, List[str]] = field(default_factory=dict)
    nonfinite: Dict[str, ScanResult] = field(default_factory=dict)  # only with scan=True
    detections: Dict[str, Detection] = field(default_factory=dict)
    bytes_to_read: int = 0
    largest_tensor: Tuple[str, int] = ("", 0)  # (key, elements)
    warnings: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    @property
    def n_inputs(self) -> int:
        return len(self.files)

    @property
    def family(self) -> Optional[str]:
        fams = set(self.families.values())
        return fams.pop() if len(fams) == 1 else None

    @property
    def prediction_type(self) -> str:
        """The merge's prediction type: the base's, else the inputs' common one (``epsilon`` default)."""
        if self.base and self.base in self.prediction_types:
            return self.prediction_types[self.base]
        kinds = set(self.prediction_types.values())
        return kinds.pop() if len(kinds) == 1 else "epsilon"

    def estimated_peak_bytes(
        self, memory_budget: Optional[int] = None, compute_dtype: str = "float64", out_dtype: str = "float16"
    ) -> int:
        """A rough peak of merge memory beyond the process baseline.

        In memory, the largest tensor needs its N inputs upcast plus as many masked deltas, and the
        result: ``L * (2N + 1) * compute bytes + L * out bytes``. With a budget, a tensor over it is
        merged in row chunks, so the working set is capped at the budget (plus the output tensor).
        """
        n = max(1, self.n_inputs)
        elems = self.largest_tensor[1]
        cb = dtypes.COMPUTE_DTYPE_BYTES.get(compute_dtype, 8)
        ob = dtypes.COMPUTE_DTYPE_BYTES.get(out_dtype, 2)
        in_memory = elems * (2 * n + 1) * cb
        if memory_budget is not None:
            in_memory = min(in_memory, int(memory_budget))
        return in_memory + elems * ob

    def summary(self, memory_budget: Optional[int] = None) -> str:
        return (
            f"{self.n_inputs} inputs, family {self.family or 'mixed'}, prediction {self.prediction_type}, "
            f"{self.bytes_to_read / 1e9:.2f} GB to read, largest tensor {self.largest_tensor[0]} "
            f"({self.largest_tensor[1]:,} elements), estimated peak "
            f"{self.estimated_peak_bytes(memory_budget) / 1e9:.2f} GB"
        )


def _list_keys(keys: Sequence[str], limit: int = _MAX_KEYS_LISTED) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def canonical_shapes(header: SafetensorsHeader) -> Dict[str, Tuple[int, ...]]:
    """Manifest key -> shape after key hygiene (``text_projection.weight`` under its sgm name and
    orientation, 2-D VAE attention as 4-D, ``position_ids`` [1, 77]): what the merge will see."""
    return sdxl_keys.canonical_shapes(header.tensors)


def preflight(
    inputs: Sequence[PathLike],
    *,
    base: Optional[PathLike] = None,
    allow_vpred_mix: bool = False,
    scan: bool = False,
    require_keys: bool = True,
    families: Sequence[str] = MERGEABLE_FAMILIES,
    nonfinite_is_error: bool = False,
) -> PreflightReport:
    """Check merge inputs from their headers (and values with ``scan``) before any tensor math.

    ``inputs`` may include ``base`` (it is counted once). Raises :class:`PreflightError` listing every
    problem; otherwise returns the :class:`PreflightReport` (warnings included, also logged).

    Refused: a missing/unreadable/truncated file; a family outside ``families`` or different from
    the base's (or, without a base, from the first input's); v-prediction mixed with epsilon unless
    ``allow_vpred_mix``; missing non-optional SDXL keys (``require_keys``; else a warning); shapes
    that differ from the SDXL manifest (full-size files) or from the base. With ``scan``: NaN/inf
    values are warnings (the merge methods leave such an input out of that key), errors with
    ``nonfinite_is_error``.
    """
    report = PreflightReport()
    report.files = _unique_inputs(inputs, base)
    if base is not None:
        report.base = report.files[0]
    if not report.files:
        raise PreflightError(["no input checkpoints given"], report)
    headers = _read_headers(report)
    ref = _reference(report)
    _check_families(report, ref, families)
    _check_prediction_types(report, ref, allow_vpred_mix)
    _check_keys_shapes_dtypes(report, headers, ref, families, require_keys)
    if scan:
        _check_values(report, headers, nonfinite_is_error)
    return _concluded(report)


def _unique_inputs(inputs: Sequence[PathLike], base: Optional[PathLike]) -> List[str]:
    """The inputs as strings, base first when given, each file once (same file by inode)."""
    ordered: List[str] = []
    base_s = os.fspath(base) if base is not None else None
    for p in ([base_s] if base_s is not None else []) + [os.fspath(x) for x in inputs]:
        if not any(_same_file(p, q) for q in ordered):
            ordered.append(p)
    return ordered


def _read_headers(report: PreflightReport) -> Dict[str, SafetensorsHeader]:
    """Header and detection of every readable file; a problem for each one that is not."""
    headers: Dict[str, SafetensorsHeader] = {}
    for p in report.files:
        role = "base model" if p == report.base else "input"
        try:
            if not os.path.exists(p):
                raise CheckpointError(p, f"{role} file not found")
            if os.path.isdir(p):
                raise CheckpointError(p, f"{role} is a directory, not a .safetensors checkpoint file")
            headers[p] = read_header(p)
        except CheckpointError as e:
            report.problems.append(str(e))
            continue
        det = detect(headers[p])
        report.detections[p] = det
        report.families[p] = det.family
        report.prediction_types[p] = det.prediction_type
    return headers


def _reference(report: PreflightReport) -> Optional[str]:
    """The file the others are compared with: the base if readable, else the first readable input."""
    return report.base if report.base in report.detections else next(iter(report.detections), None)


def _check_families(report: PreflightReport, ref: Optional[str], families: Sequence[str]) -> None:
    """One architecture family, and a mergeable one."""
    ref_family = report.families.get(ref) if ref else None
    for p, fam in report.families.items():
        label = family_label(fam)
        if fam not in families:
            report.problems.append(
                f"{p}: {label} checkpoint (family {fam}); only {', '.join(families)} checkpoints can be merged"
                " here — remove it from the config"
            )
        elif ref_family is not None and fam != ref_family and ref_family in families:
            report.problems.append(
                f"{p}: family {fam} does not match family {ref_family} of {ref}; mixing architectures is refused"
            )


def _check_prediction_types(report: PreflightReport, ref: Optional[str], allow_vpred_mix: bool) -> None:
    """v-prediction mixed with epsilon: a problem, or a warning with ``allow_vpred_mix``."""
    ref_pred = report.prediction_types.get(ref) if ref else None
    mixed = [p for p, t in report.prediction_types.items() if ref_pred is not None and t != ref_pred]
    for p in mixed:
        what = "v-prediction" if report.prediction_types[p] == "v" else "epsilon-prediction"
        other = "v-prediction" if ref_pred == "v" else "epsilon-prediction"
        ref_role = "base " if ref == report.base else ""
        msg = f"{p}: {what} model mixed with {other} {ref_role}{ref}"
        if allow_vpred_mix:
            report.warnings.append(msg + " (allowed by allow_vpred_mix)")
        else:
            report.problems.append(msg + "; pass --allow-vpred-mix (sdxl: {allow_vpred_mix: true}) if this is intended")


def _check_keys_shapes_dtypes(
    report: PreflightReport,
    headers: Dict[str, SafetensorsHeader],
    ref: Optional[str],
    families: Sequence[str],
    require_keys: bool,
) -> None:
    """Per mergeable file, in order: its keys, its shapes (against SDXL and the reference), its
    dtypes; and the bytes to read and the largest tensor over all of them."""
    ref_shapes = canonical_shapes(headers[ref]) if ref in headers else {}
    largest = ("", 0)
    for p, det in report.detections.items():
        if det.family not in families:
            continue
        _check_keys(report, p, det, require_keys)
        _check_shapes(report, p, det, headers[p], ref, ref_shapes)
        largest = _check_dtypes_and_count(report, p, headers[p], largest)
    report.largest_tensor = largest


def _check_keys(report: PreflightReport, p: str, det: Detection, require_keys: bool) -> None:
    """Missing non-optional keys (a problem, or a warning without ``require_keys``); extra keys (a warning)."""
    if det.missing:
        report.missing_keys[p] = list(det.missing)
        msg = f"{p}: {len(det.missing)} required SDXL keys missing: {_list_keys(det.missing)}"
        if require_keys:
            report.problems.append(msg)
        else:
            report.warnings.append(msg + " (they are taken from the other inputs)")
    if det.extra:
        report.extra_keys[p] = list(det.extra)
        report.warnings.append(
            f"{p}: {len(det.extra)} keys outside the SDXL manifest will be ignored: {_list_keys(det.extra, 4)}"
        )


def _check_shapes(
    report: PreflightReport,
    p: str,
    det: Detection,
    header: SafetensorsHeader,
    ref: Optional[str],
    ref_shapes: Dict[str, Tuple[int, ...]],
) -> None:
    """Shapes that differ from the SDXL manifest, then those that differ from the reference's."""
    for key, expected, got in det.wrong_shape:
        report.problems.append(f"{p}: key {key} has shape {list(got)}, SDXL expects {list(expected)}")
    if p != ref and ref_shapes:
        shapes = canonical_shapes(header)
        for key, shape in shapes.items():
            rs = ref_shapes.get(key)
            if rs is not None and rs != shape and not any(k == key for k, _, _ in det.wrong_shape):
                report.problems.append(f"{p}: key {key} has shape {list(shape)} but {ref} has {list(rs)}")


def _check_dtypes_and_count(
    report: PreflightReport, p: str, header: SafetensorsHeader, largest: Tuple[str, int]
) -> Tuple[str, int]:
    """Dtypes the merge cannot read (what the loader can turn into a tensor: the names of
    io.writer.TORCH_DTYPES); adds the file's bytes to read; returns the largest tensor so far."""
    for name, info in header.tensors.items():
        if canonical_name(name) is not None:
            if info.dtype not in dtypes.READABLE:
                report.problems.append(f"{p}: key {name} has dtype {info.dtype}, which the merge cannot read")
            report.bytes_to_read += info.nbytes
            if info.numel > largest[1]:
                largest = (name, info.numel)
    return largest


def _check_values(report: PreflightReport, headers: Dict[str, SafetensorsHeader], nonfinite_is_error: bool) -> None:
    """Read every tensor once: NaN/inf values are warnings, or problems with ``nonfinite_is_error``."""
    for p, h in headers.items():
        try:
            res = scan_nonfinite(p, h)
        except CheckpointError as e:
            report.problems.append(str(e))
            continue
        report.nonfinite[p] = res
        if res.total:
            msg = f"{p}: {res.describe()}"
            (report.problems if nonfinite_is_error else report.warnings).append(msg)


def _concluded(report: PreflightReport) -> PreflightReport:
    """Log the warnings; raise :class:`PreflightError` listing the problems, if any."""
    for w in report.warnings:
        logger.warning("%s", w)
    if report.problems:
        raise PreflightError(report.problems, report)
    logger.info("preflight: %s", report.summary())
    return report
