"""``mergekit-sdxl import-mecha RECIPE.mecha --models-dir DIR [-o CONFIG.yaml]
[--vote-semantics 2024|2025] [--allow-missing]``.

Translates an sd-mecha recipe into a mergekit config (to ``-o`` or standard output) and prints
what it became (to standard error when the YAML goes to standard output, so it can be piped).
Inputs missing from DIR are listed one per line and refuse the import unless ``--allow-missing``.
"""

from __future__ import annotations

import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from mergekit_sdxl.text import printable

__all__ = ["import_mecha_command"]


class VoteSemantics(str, Enum):
    y2024 = "2024"
    y2025 = "2025"


def _command_line(recipe: Path, models_dir: Path, output: Optional[Path], vote: Optional[str], allow: bool) -> str:
    parts: List[str] = ["mergekit-sdxl", "import-mecha", str(recipe), "--models-dir", str(models_dir)]
    if output is not None:
        parts += ["-o", str(output)]
    if vote is not None:
        parts += ["--vote-semantics", vote]
    if allow:
        parts.append("--allow-missing")
    return " ".join(shlex.quote(p) for p in parts)


def import_mecha_command(
    recipe: Path = typer.Argument(..., help="The sd-mecha recipe (.mecha), legacy or 'version 0.1.0' format."),
    models_dir: Path = typer.Option(..., "--models-dir", help="Folder holding the recipe's models (matched by file name, recursively)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the config here (default: standard output)."),
    vote_semantics: Optional[VoteSemantics] = typer.Option(
        None,
        "--vote-semantics",
        help="How to read vote_sgn/apply_stock: 2024 (sd-mecha before 4b8b88d: vote_sgn>0 = count vote) or "
        "2025 (after: vote_sgn=true = sum vote). Default: what the recipe's content shows.",
    ),
    allow_missing: bool = typer.Option(
        False, "--allow-missing", help="Write the config even when inputs are not found (placeholder paths under DIR)."
    ),
) -> None:
    """Translate an sd-mecha recipe into a mergekit config for the models under DIR."""
    from mergekit_sdxl.io.output_guard import check_config_target, check_not_foreign
    from mergekit_sdxl.io.safe_write import atomic_write_text
    from mergekit_sdxl.workflow.mecha_import import MissingInputsError, import_mecha
    from mergekit_sdxl.workflow.recipe import is_our_recipe

    vote = vote_semantics.value if isinstance(vote_semantics, VoteSemantics) else vote_semantics
    to_stdout = output is None
    if output is not None:
        check_config_target(output)
        check_not_foreign(output, is_our_recipe, "a recipe")
    cmd = _command_line(recipe, models_dir, output, vote, allow_missing)
    try:
        result = import_mecha(recipe, models_dir, vote_semantics=vote, allow_missing=allow_missing, command=cmd)
    except MissingInputsError as error:
        for m in error.missing:
            typer.echo(f"  not found: {printable(m.written)} (line {m.line})", err=True)
        raise
    for line in result.summary_lines():
        typer.echo(line, err=to_stdout)
    if output is None:
        sys.stdout.write(result.yaml_text)
        sys.stdout.flush()
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, result.yaml_text)
    typer.echo(f"wrote {printable(output)}: merge with `mergekit-sdxl merge {shlex.quote(str(output))} OUT.safetensors`")
