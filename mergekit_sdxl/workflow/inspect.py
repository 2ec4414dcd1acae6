"""What ``mergekit-sdxl inspect`` shows: per-file reports of files and folders, as a table.

LoRA / LyCORIS files are recognised (:func:`~mergekit_sdxl.sdxl.lora_detect.detect_lora`): their
row gives the family they were trained for, and the details their network type, rank, the
components they touch and why a merge would refuse them.

Header only by default (names, shapes, dtypes, metadata), plus each file's sha256 and AutoV2
from the hash cache; ``scan`` reads every tensor once to count NaN/inf. Everything taken from a
file is shown through :func:`~mergekit_sdxl.text.printable`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from mergekit_sdxl.sdxl.families import MERGEABLE_FAMILIES, family_label
from mergekit_sdxl.text import printable
from mergekit_sdxl.workflow.preflight import FileReport, inspect_file

logger = logging.getLogger(__name__)

__all__ = ["inspect_paths", "format_table", "expand_paths"]


def is_dir(p: Path) -> bool:
    """``p.is_dir()`` that says False instead of raising (e.g. a path inside an unreadable folder)."""
    try:
        return p.is_dir()
    except OSError:
        return False


def _expand(paths: Sequence[Path]) -> List[Union[Path, FileReport]]:
    """Files as given; directories expanded to their ``*.safetensors`` (recursive, sorted), with
    what could not be read there (folders, files) as error reports in path order."""
    from mergekit_sdxl.io.discover import discover_safetensors

    out: List[Union[Path, FileReport]] = []
    for p in paths:
        if not is_dir(p):
            out.append(p)
            continue
        try:
            found = discover_safetensors(p)
        except OSError as e:  # vanished or became inaccessible since _is_dir
            out.append(FileReport(path=str(p), error=e.strerror or str(e)))
            continue
        if not found.files and not found.problems:
            logger.warning("%s: no .safetensors files found", printable(p))
        items: List[Tuple[str, Union[Path, FileReport]]] = [(f.as_posix(), f) for f in found.files]
        for path, reason in found.problems:
            logger.warning("%s: %s", printable(path), reason)
            items.append((path.as_posix(), FileReport(path=str(path), error=reason)))
        out.extend(item for _, item in sorted(items, key=lambda kv: kv[0]))
    return out


def expand_paths(paths: Sequence[Path]) -> List[Path]:
    """Files as given; directories expanded to their ``*.safetensors`` (recursive, sorted).
    Folders and files that could not be read are logged (:func:`inspect_paths` reports them)."""
    return [p for p in _expand(paths) if isinstance(p, Path)]


def inspect_paths(paths: Sequence[Path], *, hash: bool = True, scan: bool = False, cache=None) -> List[FileReport]:
    """One :class:`FileReport` per file (directories expanded); unreadable folders and files found
    there are reports with ``error`` set, in path order."""
    if hash and cache is None:
        from mergekit_sdxl.io.hashing import HashCache

        cache = HashCache()
    progress = hash and sys.stderr.isatty()  # a progress bar while hashing files not yet cached
    return [
        item if isinstance(item, FileReport) else inspect_file(item, hash=hash, scan=scan, cache=cache, progress=progress)
        for item in _expand(paths)
    ]


def _size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{n} B"


def _pred(rep: FileReport) -> str:
    d = rep.detection
    assert d is not None
    s = "v" if d.v_pred else "eps"
    return s + ("+ztsnr" if d.ztsnr else "")


def _nonfinite(rep: FileReport) -> str:
    if rep.scan is None:
        return "-"
    if not rep.scan.total:
        return "0"
    return ",".join(f"{c}:{n}" for c, n in rep.scan.per_component.items() if n)


def format_table(reports: Sequence[FileReport], *, show_scan: bool = False, base_dir: Optional[Path] = None) -> str:
    """Plain-text table with aligned columns, then details (notes, merge recipes) per file."""
    headers = ["file", "family", "pred", "dtype", "size", "missing", "extra", "shape", "autov2", "sha256"]
    if show_scan:
        headers.insert(8, "nan/inf")
    rows: List[List[str]] = []
    errors: List[tuple] = []
    for rep in reports:
        name = rep.path
        if base_dir is not None:
            try:
                name = Path(rep.path).relative_to(base_dir).as_posix()
            except ValueError:
                pass
        name = printable(name)  # before measuring widths: escapes are what gets printed
        if not rep.ok:
            errors.append((name, printable(rep.error)))
            continue
        d = rep.detection
        assert d is not None
        if rep.lora is not None:  # a LoRA: its base family; key counts against SDXL say nothing
            row = [
                name, f"{rep.lora.family} LoRA", "-", d.dtype, _size(rep.size), "-", "-", "-",
                rep.autov2 or "-", rep.sha256 or "-",
            ]
            if show_scan:
                row.insert(8, _nonfinite(rep))
            rows.append([printable(c) for c in row])
            continue
        fam = d.family + (" (scaled)" if d.scaled else "")
        row = [
            name, fam, _pred(rep), d.dtype, _size(rep.size), str(len(d.missing)), str(len(d.extra)),
            str(len(d.wrong_shape)), rep.autov2 or "-", rep.sha256 or "-",
        ]
        if show_scan:
            row.insert(8, _nonfinite(rep))
        rows.append([printable(c) for c in row])
    lines: List[str] = []
    if rows:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        right = {"size", "missing", "extra", "shape"}

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(
                (c.rjust(w) if h in right else c.ljust(w)) for c, w, h in zip(cells, widths, headers, strict=True)
            ).rstrip()

        lines.append(fmt(headers))
        lines.append(fmt(["-" * w for w in widths]))
        lines.extend(fmt(r) for r in rows)
    for name, err in errors:
        lines.append(f"{name}  error: {err}")
    # details
    for rep in reports:
        if not rep.ok or rep.detection is None:
            continue
        d = rep.detection
        if rep.lora is not None:
            lines.append("")
            lines.append(f"{rep.path}:")
            lines.extend(f"  {x}" for x in _lora_details(rep))
            continue
        details: List[str] = list(d.notes)
        if d.missing:
            details.append(f"missing: {', '.join(d.missing[:5])}" + (f" (+{len(d.missing) - 5})" if len(d.missing) > 5 else ""))
        if d.missing_optional:
            details.append(
                f"{len(d.missing_optional)} optional keys absent: {', '.join(d.missing_optional[:3])}"
                + (f" (+{len(d.missing_optional) - 3})" if len(d.missing_optional) > 3 else "")
            )
        if d.extra:
            kinds = ", ".join(f"{k} {n}" for k, n in d.extra_kinds.items())
            details.append(f"{len(d.extra)} keys outside the SDXL manifest ({kinds}): ignored by merges")
        if d.wrong_shape:
            k, e, g = d.wrong_shape[0]
            details.append(f"wrong shape: {k} {list(g)} (expected {list(e)})" + (f" (+{len(d.wrong_shape) - 1})" if len(d.wrong_shape) > 1 else ""))
        if rep.scan is not None and rep.scan.total:
            details.append(rep.scan.describe(limit=4))
        rec = d.merged_recipe
        if not details and rec is None:
            continue
        lines.append("")
        lines.append(f"{rep.path}:")
        lines.extend(f"  {x}" for x in details)
        if rec is not None:
            lines.extend(_format_provenance(rec))
    # Everything above may carry text from the files (names, keys, metadata, recipes): no line
    # reaches the terminal with a control character, bidi override or lone surrogate in it.
    return "\n".join(printable(line) for line in lines)


def _lora_details(rep: FileReport) -> List[str]:
    """What a LoRA file is: network, rank, components touched, base family and problems."""
    lora = rep.lora
    assert lora is not None
    out = [f"LoRA: {lora.describe()}"]
    if lora.family not in MERGEABLE_FAMILIES and lora.family != "unknown":
        out.append(f"a LoRA for {family_label(lora.family)}: it cannot be merged with an SDXL base")
    if lora.unmapped:
        shown = ", ".join(sorted(lora.unmapped)[:3])
        out.append(f"{len(lora.unmapped)} modules map to no SDXL key (e.g. {shown}): refused by merges")
    out.extend(f"problem: {p}" for p in lora.problems[:3])
    if rep.scan is not None and rep.scan.total:
        out.append(rep.scan.describe(limit=4))
    out.extend(lora.notes)
    return out


def _json_excerpt(value: Any, limit: int = 300) -> str:
    """Compact JSON of a recipe parsed from a file's metadata, cut to ``limit`` characters."""
    try:
        text = json.dumps(value, sort_keys=True)
    except (TypeError, ValueError, RecursionError):  # odd keys, or nesting deep enough to overflow
        text = repr(value)[:limit] if not isinstance(value, (dict, list)) else "<unprintable recipe>"
    return text[:limit]


def _format_provenance(rec: Dict[str, Any]) -> List[str]:
    """Lines about how a file was merged (every value from the file; the caller escapes them)."""
    out: List[str] = []
    if rec.get("tool") == "mergekit-sdxl":
        out.append(
            f"  merged by mergekit-sdxl {rec.get('version')} (mergekit {rec.get('mergekit_version')}): "
            f"method {rec.get('method')}, seed {rec.get('seed') or '-'}, dtype {rec.get('dtype') or '-'} -> {rec.get('out_dtype') or '-'}"
        )
    else:
        out.append(f"  merge recipe ({rec.get('tool')}): {_json_excerpt(rec.get('recipe'))}")
    inputs = rec.get("inputs") or []
    if inputs:
        out.append(f"  inputs ({len(inputs)}):")
        for n, i in enumerate(inputs, 1):
            if not isinstance(i, dict):
                continue
            role = i.get("role") or ""
            out.append(
                f"    {n:>3}. {role + ' ' if role else ''}{i.get('name')}  sha256 {i.get('sha256')}  autov2 {i.get('autov2') or '-'}"
            )
    if rec.get("tool") == "mergekit-sdxl" and rec.get("recipe"):
        out.append("  recipe:")
        # split on "\n" only: str.splitlines() would also split on \r, \x0b, \x1c... and hide them
        out.extend(f"    {line}" for line in str(rec["recipe"]).rstrip("\n").split("\n"))
    return out


