"""The ``mergekit-sdxl`` command: merge, run, inspect, recipe, demo."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import click
import typer
from typer.core import TyperGroup

from mergekit_sdxl.cli.exit_codes import report

# Idle OpenMP threads sleep instead of spinning: a merge runs thousands of small tensor ops, and
# spinning workers steal the cores they wait on (docs/benchmarks.md). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# typer vendors its own click; the ``merge`` command is a real click command (mergekit's
# options): each ending below comes in both kinds.
_EXITS = (click.exceptions.Exit, typer.Exit)
_ABORTS = (click.exceptions.Abort, typer.Abort)
_USAGE_ERRORS = (click.ClickException, typer.TyperException)


class _Group(TyperGroup):
    """The command group; every error a command raises becomes its message and exit code here,
    so ``mergekit-sdxl`` and a test's ``CliRunner`` see the same behaviour."""

    def invoke(self, ctx: Any) -> Any:
        # Inside typer's own handling, which would turn Ctrl-C into a silent Exit(130).
        try:
            return super().invoke(ctx)
        except _EXITS + _ABORTS + _USAGE_ERRORS:
            raise
        except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - mapped to exit codes, bugs shown in full
            raise typer.Exit(report(error)) from error

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone = kwargs.pop("standalone_mode", True)
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except _EXITS as done:
            code = done.exit_code
        except _USAGE_ERRORS as error:
            error.show()  # type: ignore[union-attr]
            code = error.exit_code  # type: ignore[union-attr]
        except _ABORTS as stop:
            interrupt = stop.__context__ if isinstance(stop.__context__, KeyboardInterrupt) else KeyboardInterrupt()
            code = report(interrupt)
        except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - mapped to exit codes, bugs shown in full
            code = report(error)
        code = code if isinstance(code, int) else 0
        if standalone:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_Group,
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
    directory: Path = typer.Argument(..., help="Folder of downloaded checkpoints."),
    out_path: Path = typer.Argument(..., help="Output .safetensors file."),
    base: Path = typer.Option(..., "--base", help="The base model (SDXL 1.0 base)."),
    method: str = typer.Option("tgmd", "--method", help="tgmd, ties_soup, geometric_median or linear."),
    scan: bool = typer.Option(False, "--scan", help="Read every value: exclude files with NaN/inf."),
    allow_vpred_mix: bool = typer.Option(False, "--allow-vpred-mix"),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="e.g. 4GB"),
    config_out: Optional[Path] = typer.Option(None, "--config-out", help="Where to keep the recipe (default OUT.yaml)."),
    include_merged: bool = typer.Option(
        False, "--include-merged", help="Also take mergekit-sdxl merge outputs found in the output folder as inputs."
    ),
    keep_paths: bool = typer.Option(False, "--keep-paths", help="Record full input paths in the output (private use)."),
) -> None:
    """Recipe + merge in one command: discover, validate, write the recipe, merge."""
    from mergekit_sdxl.cli.merge_cmd import check_memory_budget, published_command, report_result
    from mergekit_sdxl.host.driver import run_sdxl_merge
    from mergekit_sdxl.host.mergekit_api import MergeOptions
    from mergekit_sdxl.io.output_guard import (
        OwnOutputs,
        check_config_target,
        check_distinct,
        check_not_foreign,
        check_output_target,
        merge_output_paths,
    )
    from mergekit_sdxl.io.safe_write import atomic_write_text
    from mergekit_sdxl.workflow.recipe import build_recipe, is_our_recipe, refuse_writes_over_inputs

    check_memory_budget(memory_budget)
    check_output_target(out_path, suffix=".safetensors")
    config_path = config_out or out_path.with_suffix(".yaml")
    check_config_target(config_path)
    check_not_foreign(config_path, is_our_recipe, "a recipe")
    writes = [config_path, *merge_output_paths(out_path)]
    check_distinct(writes)
    refuse_writes_over_inputs(writes, directory, base, own_outputs_allowed=True)
    command = published_command(sys.argv, keep_paths=keep_paths)
    recipe = build_recipe(
        directory,
        base,
        method=method,
        scan=scan,
        allow_vpred_mix=allow_vpred_mix,
        command=command,
        skip=OwnOutputs(writes, None if include_merged else out_path.parent).reason,
    )
    for line in recipe.summary_lines():
        typer.echo(line)
    atomic_write_text(config_path, recipe.yaml_text)
    typer.echo(f"recipe written to {config_path}")
    result = run_sdxl_merge(
        recipe.yaml_text,
        str(out_path),
        MergeOptions(),
        overrides={"memory_budget": memory_budget, "allow_vpred_mix": allow_vpred_mix or None},
        command=command,
        config_name=config_path.name,
        source=str(config_path),
        keep_paths=keep_paths,
    )
    report_result(result, echo=typer.echo)


def _mount_surfaces() -> None:
    from mergekit_sdxl.cli.import_mecha_cmd import import_mecha_command
    from mergekit_sdxl.cli.inspect_cmd import inspect_command
    from mergekit_sdxl.cli.recipe_cmd import recipe_command
    from mergekit_sdxl.cli.report_cmd import report_command

    app.command("inspect")(inspect_command)
    app.command("recipe")(recipe_command)
    app.command("import-mecha")(import_mecha_command)
    app.command("report")(report_command)


_mount_surfaces()




def cli() -> TyperGroup:
    """The ``mergekit-sdxl`` command: the typer app plus the click ``merge`` command."""
    from mergekit_sdxl.cli.merge_cmd import merge_command

    command = typer.main.get_command(app)
    assert isinstance(command, TyperGroup)  # the app's cls, _Group
    # typer vendors its own click, whose stubs want its own Command; a real click command (mergekit's
    # options) works in its group at run time.
    command.add_command(merge_command, "merge")  # type: ignore[arg-type]
    return command


def prepare() -> None:
    """The slow part of start-up: import mergekit and register the plugin in it."""
    from mergekit_sdxl.host.plugin import register_all

    register_all()


def run() -> int:
    """Run the command line (after :func:`prepare`), return the exit code."""
    prepare()  # idempotent: a no-op after the entry point's call
    code = cli().main(prog_name="mergekit-sdxl", standalone_mode=False)
    return code if isinstance(code, int) else 0


def main() -> None:
    """Console-script entry point (kept for ``python -m``; the script uses ``cli.entry``)."""
    from mergekit_sdxl.cli.entry import main as entry_main

    entry_main()
