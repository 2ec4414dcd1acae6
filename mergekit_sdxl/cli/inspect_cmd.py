"""``mergekit-sdxl inspect FILE_OR_DIR... [--scan] [--json] [--no-hash]``.

Header only by default (names, shapes, dtypes, metadata: no tensor reads), plus the file's sha256
and AutoV2 from the hash cache (computed once per (path, size, mtime)). ``--scan`` reads every
tensor once to count NaN/inf per component. Exit code 1 when any file could not be read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import typer

from mergekit_sdxl.workflow.inspect import format_table, inspect_paths, is_dir

__all__ = ["inspect_command"]


def inspect_command(
    paths: List[Path] = typer.Argument(..., help="Checkpoint files and/or folders (searched recursively for *.safetensors)."),
    scan: bool = typer.Option(False, "--scan", help="Also read every tensor and count NaN/inf per component."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON (key names included)."),
    no_hash: bool = typer.Option(False, "--no-hash", help="Skip sha256/AutoV2 (header only: instant)."),
) -> None:
    """Family, v-pred/ztsnr, dtype, key differences, size, sha256/AutoV2 (and NaN/inf) per checkpoint."""
    reports = inspect_paths(paths, hash=not no_hash, scan=scan)
    base_dir = paths[0] if len(paths) == 1 and is_dir(paths[0]) else None
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
