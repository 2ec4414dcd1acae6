"""The ``mergekit-sdxl`` command: merge, run, inspect, recipe, demo."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import click
import typer

# Idle OpenMP threads sleep instead of spinning: a merge runs thousands of small tensor ops, and
# spinning workers steal the cores they wait on (docs/benchmarks.md). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    name="mergekit-sdxl",
    help="Merge Stable Diffusion XL checkpoints with mergekit: inspect, recipe, merge, publish.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root(verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging (-v info, -vv debug).")) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@app.command("demo")
def demo_command(
    outdir: Path = typer.Argument(..., help="Folder for the demo checkpoints, config and merged model."),
    models: int = typer.Option(4, help="Number of fine-tuned demo models besides the base."),
    method: str = typer.Option("tgmd", help="Merge method for the demo recipe."),
) -> None:
    """Build tiny SDXL checkpoints, write a recipe, merge them, and load the result."""
    from mergekit_sdxl.cli.demo import run_demo

    run_demo(outdir, n_models=models, method=method)


@app.command("run")
def run_command(
    directory: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder of downloaded checkpoints."),
    out_path: Path = typer.Argument(..., help="Output .safetensors file."),
    base: Path = typer.Option(..., "--base", exists=True, dir_okay=False, help="The base model (SDXL 1.0 base)."),
    method: str = typer.Option("tgmd", "--method", help="tgmd, ties_soup, geometric_median or linear."),
    scan: bool = typer.Option(False, "--scan", help="Read every value: exclude files with NaN/inf."),
    allow_vpred_mix: bool = typer.Option(False, "--allow-vpred-mix"),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="e.g. 4GB"),
    config_out: Optional[Path] = typer.Option(None, "--config-out", help="Where to keep the recipe (default OUT.yaml)."),
) -> None:
    """Recipe + merge in one command: discover, validate, write the recipe, merge."""
    from mergekit.options import MergeOptions

    from mergekit_sdxl.cli.merge_cmd import report_result
    from mergekit_sdxl.host.driver import run_sdxl_merge
    from mergekit_sdxl.host.recipe import RecipeError, build_recipe

    command = " ".join(shlex.quote(a) for a in ["mergekit-sdxl", *sys.argv[1:]])
    try:
        recipe = build_recipe(directory, base, method=method, scan=scan, allow_vpred_mix=allow_vpred_mix, command=command)
        for line in recipe.summary_lines():
            typer.echo(line)
        config_path = config_out or out_path.with_suffix(".yaml")
        config_path.write_text(recipe.yaml_text, encoding="utf-8")
        typer.echo(f"recipe written to {config_path}")
        result = run_sdxl_merge(
            recipe.yaml_text,
            str(out_path),
            MergeOptions(),
            overrides={"memory_budget": memory_budget, "allow_vpred_mix": allow_vpred_mix or None},
            command=command,
            config_name=config_path.name,
        )
    except (RecipeError, ValueError, RuntimeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1)
    report_result(result, echo=typer.echo)


def _mount_surfaces() -> None:
    from mergekit_sdxl.cli.inspect_cmd import inspect_command
    from mergekit_sdxl.cli.recipe_cmd import recipe_command

    app.command("inspect")(inspect_command)
    app.command("recipe")(recipe_command)


_mount_surfaces()


def main() -> None:
    """Console-script entry point: the typer app plus the click ``merge`` command."""
    from mergekit_sdxl.cli.merge_cmd import merge_command
    from mergekit_sdxl.host.plugin import register_all

    register_all()
    command = typer.main.get_command(app)
    command.add_command(merge_command, "merge")  # type: ignore[attr-defined]
    # Handled here rather than by click's standalone mode: typer's group does not catch the
    # Exit/UsageError raised by the plain click ``merge`` command (a traceback after --help).
    try:
        # Without standalone mode click returns the exit code of ctx.exit()/typer.Exit.
        code = command.main(prog_name="mergekit-sdxl", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()
