"""``mergekit-sdxl recipe DIR --base FILE [--method tgmd|ties_soup|linear|geometric_median|task_arithmetic]
[-o config.yaml] [--scan] [--allow-vpred-mix] [--seed N]``, or ``mergekit-sdxl recipe --loras DIR
--base FILE`` for a config that bakes the LoRA files under DIR into the base (``task_arithmetic``
unless ``--method`` says otherwise).

Writes the mergekit config (to ``-o`` or standard output) and prints what was kept and excluded,
with reasons (to standard error when the YAML goes to standard output, so it can be piped).
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mergekit_sdxl.text import printable
from mergekit_sdxl.workflow.recipe import Method, build_recipe

logger = logging.getLogger(__name__)

__all__ = ["recipe_command"]


def _command_line(
    directory: Optional[Path], base: Path, method: str, output: Optional[Path], scan: bool, allow: bool, seed: Optional[int],
    loras: Optional[Path] = None,
) -> str:
    parts: List[str] = ["mergekit-sdxl", "recipe"] + ([str(directory)] if directory is not None else [])
    if loras is not None:
        parts += ["--loras", str(loras)]
    parts += ["--base", str(base), "--method", method]
    if output is not None:
        parts += ["-o", str(output)]
    if scan:
        parts.append("--scan")
    if allow:
        parts.append("--allow-vpred-mix")
    if seed is not None:
        parts += ["--seed", str(seed)]
    return " ".join(shlex.quote(p) for p in parts)


def recipe_command(
    directory: Optional[Path] = typer.Argument(None, help="Folder of downloaded checkpoints (searched recursively for *.safetensors)."),
    base: Path = typer.Option(..., "--base", help="The base model (e.g. sd_xl_base_1.0.safetensors); never listed as a model."),
    method: Optional[Method] = typer.Option(
        None, "--method", help="Merge method (default tgmd; task_arithmetic with --loras); its reference parameters are written."
    ),
    loras: Optional[Path] = typer.Option(
        None, "--loras", help="Folder of LoRA/LyCORIS files to bake into the base (one model per LoRA), instead of DIR."
    ),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the config here (default: standard output)."),
    scan: bool = typer.Option(False, "--scan", help="Also read every value: exclude files with NaN/inf."),
    allow_vpred_mix: bool = typer.Option(False, "--allow-vpred-mix", help="Keep v-prediction models beside an epsilon base (or the reverse)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the DROP masks (tgmd default: 240603)."),
) -> None:
    """Discover, validate and filter checkpoints (or LoRAs); write a mergekit config pinned by sha256."""
    from mergekit_sdxl.errors import UsageError
    from mergekit_sdxl.io.output_guard import check_config_target, check_not_foreign
    from mergekit_sdxl.io.safe_write import atomic_write_text
    from mergekit_sdxl.workflow.lora_recipe import LORA_METHOD_DEFAULT, build_lora_recipe
    from mergekit_sdxl.workflow.recipe import is_our_recipe, refuse_writes_over_inputs

    if (directory is None) == (loras is None):
        raise UsageError("give either DIR (a folder of checkpoints) or --loras DIR (a folder of LoRA files)")
    folder = directory if directory is not None else loras
    assert folder is not None
    default = Method.tgmd.value if loras is None else LORA_METHOD_DEFAULT
    method_s = method.value if isinstance(method, Method) else str(method or default)
    cmd = _command_line(directory, base, method_s, output, scan, allow_vpred_mix, seed, loras)
    if output is not None:
        check_config_target(output)
        check_not_foreign(output, is_our_recipe, "a recipe")
        refuse_writes_over_inputs([output], folder, base, own_outputs_allowed=False)
    if loras is not None:
        result = build_lora_recipe(loras, base, method_s, scan=scan, seed=seed, command=cmd)
    else:
        result = build_recipe(folder, base, method_s, scan=scan, allow_vpred_mix=allow_vpred_mix, seed=seed, command=cmd)
    to_stdout = output is None
    for line in result.summary_lines():
        typer.echo(line, err=to_stdout)
    if output is None:
        sys.stdout.write(result.yaml_text)
        sys.stdout.flush()
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, result.yaml_text)
    typer.echo(f"wrote {printable(output)}: merge with `mergekit-sdxl merge {shlex.quote(str(output))} OUT.safetensors`")
