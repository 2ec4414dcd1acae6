"""``mergekit-sdxl report CONFIG -o REPORT_DIR [--merged OUT.safetensors] [--memory-budget 4GB]``.

Writes ``report.json``, PNG figures and an offline ``index.html`` of what each input of the merge
contributed (host/report_pass.py computes, io/report_files.py writes). Needs the ``report`` extra
(matplotlib); without it the command stops before any work with one line saying how to get it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import typer

from mergekit_sdxl.text import printable

__all__ = ["report_command", "write_merge_report", "summary_lines"]


def summary_lines(report: Mapping[str, Any]) -> list:
    """The flags of a report as short lines for the terminal."""
    flags = report.get("flags") or {}
    lines = []
    for entry in flags.get("near_duplicates", []):
        a, b = entry["inputs"]
        lines.append(f"near-duplicates: {printable(a)} and {printable(b)} (cosine {entry['cosine']:.4f})")
    for entry in flags.get("near_base", []):
        lines.append(f"almost the base: {printable(entry['input'])} (relative norm {entry['relative_norm']:.2e})")
    for entry in flags.get("median_outliers", []):
        lines.append(f"median outlier: {printable(entry['input'])} (weight {entry['weight']:.4f}, mean {entry['mean']:.4f})")
    return lines


def write_merge_report(
    config_text: str,
    folder: Path,
    *,
    source: str,
    merged: Optional[str] = None,
    overrides: Optional[Dict[str, Any]] = None,
    quiet: bool = True,
    echo: Callable[[str], None] = typer.echo,
) -> Path:
    """Check, compute and write the report of a config's merge; returns the page's path."""
    from mergekit_sdxl.host.report_pass import prepare_report, run_report
    from mergekit_sdxl.io.report_figures import require_matplotlib
    from mergekit_sdxl.io.report_files import prepare_report_dir, write_report

    require_matplotlib()  # before any work: the figures are the point
    job = prepare_report(config_text, source=source, overrides=overrides, merged=merged)
    prepare_report_dir(folder, job.reads())
    report = run_report(job, quiet=quiet)
    page = write_report(folder, report, job.reads())
    for line in summary_lines(report):
        echo("    " + line)
    return page


def report_command(
    config: Path = typer.Argument(..., help="The merge's config (YAML), as given to mergekit-sdxl merge."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for report.json, the figures and index.html."),
    merged: Optional[Path] = typer.Option(
        None, "--merged", help="A finished merge of CONFIG: block change from it (default: the merge is run in memory)."
    ),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Working memory bound, e.g. 4GB."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Report what each input contributed: similarity, median weights, change and sign agreement per block."""
    from mergekit_sdxl.cli.merge_cmd import check_memory_budget
    from mergekit_sdxl.host.driver import read_config_text

    check_memory_budget(memory_budget)
    page = write_merge_report(
        read_config_text(os.fspath(config)),
        output,
        source=os.fspath(config),
        merged=os.fspath(merged) if merged is not None else None,
        overrides={"memory_budget": memory_budget},
        quiet=quiet,
    )
    typer.echo(f"report written to {printable(page)}")
