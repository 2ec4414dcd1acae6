"""``mergekit-sdxl inspect FILE_OR_DIR... [--scan] [--json] [--no-hash]``.

Header only by default (names, shapes, dtypes, metadata: no tensor reads), plus the file's sha256
and AutoV2 from the hash cache (computed once per (path, size, mtime)). ``--scan`` reads every
tensor once to count NaN/inf per component. Exit code 1 when any file could not be read.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import typer

from mergekit_sdxl.host.preflight import FileReport, inspect_file

logger = logging.getLogger(__name__)

__all__ = ["inspect_command", "inspect_paths", "format_table", "expand_paths"]


def expand_paths(paths: Sequence[Path]) -> List[Path]:
    """Files as given; directories expanded to their ``*.safetensors`` (recursive, sorted)."""
    from mergekit_sdxl.host.recipe import discover_checkpoints

    out: List[Path] = []
    for p in paths:
        if p.is_dir():
            found = discover_checkpoints(p)
            if not found:
                logger.warning("%s: no .safetensors files found", p)
            out.extend(found)
        else:
            out.append(p)
    return out


def inspect_paths(paths: Sequence[Path], *, hash: bool = True, scan: bool = False, cache=None) -> List[FileReport]:
    """One :class:`FileReport` per file (directories expanded)."""
    if hash and cache is None:
        from mergekit_sdxl.io.hashing import HashCache

        cache = HashCache()
    progress = hash and sys.stderr.isatty()  # a progress bar while hashing files not yet cached
    return [inspect_file(p, hash=hash, scan=scan, cache=cache, progress=progress) for p in expand_paths(paths)]


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
        if not rep.ok:
            errors.append((name, rep.error))
            continue
        d = rep.detection
        assert d is not None
        fam = d.family + (" (scaled)" if d.scaled else "")
        row = [
            name, fam, _pred(rep), d.dtype, _size(rep.size), str(len(d.missing)), str(len(d.extra)),
            str(len(d.wrong_shape)), rep.autov2 or "-", rep.sha256 or "-",
        ]
        if show_scan:
            row.insert(8, _nonfinite(rep))
        rows.append(row)
    lines: List[str] = []
    if rows:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        right = {"size", "missing", "extra", "shape"}

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(
                (c.rjust(w) if h in right else c.ljust(w)) for c, w, h in zip(cells, widths, headers)
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
    return "\n".join(lines)


def _format_provenance(rec: Dict[str, Any]) -> List[str]:
    out: List[str] = []
    if rec.get("tool") == "mergekit-sdxl":
        out.append(
            f"  merged by mergekit-sdxl {rec.get('version')} (mergekit {rec.get('mergekit_version')}): "
            f"method {rec.get('method')}, seed {rec.get('seed') or '-'}, dtype {rec.get('dtype') or '-'} -> {rec.get('out_dtype') or '-'}"
        )
    else:
        out.append(f"  merge recipe ({rec.get('tool')}): {json.dumps(rec.get('recipe'), sort_keys=True)[:300]}")
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
        out.extend(f"    {line}" for line in str(rec["recipe"]).rstrip("\n").splitlines())
    return out


def inspect_command(
    paths: List[Path] = typer.Argument(..., help="Checkpoint files and/or folders (searched recursively for *.safetensors)."),
    scan: bool = typer.Option(False, "--scan", help="Also read every tensor and count NaN/inf per component."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON (key names included)."),
    no_hash: bool = typer.Option(False, "--no-hash", help="Skip sha256/AutoV2 (header only: instant)."),
) -> None:
    """Family, v-pred/ztsnr, dtype, key differences, size, sha256/AutoV2 (and NaN/inf) per checkpoint."""
    reports = inspect_paths(paths, hash=not no_hash, scan=scan)
    base_dir = paths[0] if len(paths) == 1 and paths[0].is_dir() else None
    if as_json:
        doc = []
        for rep in reports:
            d = rep.to_dict()
            if base_dir is not None:
                try:
                    d["relative_path"] = Path(rep.path).relative_to(base_dir).as_posix()
                except ValueError:
                    pass
            doc.append(d)
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        if not reports:
            typer.echo("no checkpoint files found", err=True)
        else:
            typer.echo(format_table(reports, show_scan=scan, base_dir=base_dir))
    failed = [r for r in reports if not r.ok]
    if failed or not reports:
        if not as_json and failed:
            typer.echo(f"{len(failed)} of {len(reports)} files could not be read", err=True)
        raise typer.Exit(code=1)
