"""``mergekit-sdxl demo OUTDIR``: the whole workflow on tiny, self-made SDXL checkpoints.

Writes a base and a few fine-tunes (plus an SD1-like file and a duplicate, so the
recipe has something to exclude), inspects them, writes the recipe, merges, and
loads the result in diffusers when it is installed. Without diffusers (a plain install,
no test extra) the checkpoints are synthetic SDXL files: the same keys, mergeable, not
loadable; the load is skipped with one line. It ends with the merge's report
(``OUTDIR/report/index.html``, its path printed) when the ``report`` extra (matplotlib) is
installed; without it, one line says how to get it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional, Protocol, Tuple

import torch
import typer

LOG = logging.getLogger(__name__)


class _Writer(Protocol):
    def __call__(self, path: Path, *, seed: int, base: Optional[Path] = None) -> None: ...


def diffusers_available() -> bool:
    """Whether diffusers can be imported (it is in the test extra, not in a plain install)."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def _checkpoint_writer(loadable: bool) -> Tuple[_Writer, str]:
    """The writer of the demo's checkpoints and what it writes.

    The tiny diffusers-loadable SDXL is built from diffusers' model classes; without diffusers
    the synthetic SDXL (the same 2515 keys, width-scaled shapes) merges the same way but cannot
    be loaded.
    """
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl, write_tiny_sdxl

    if loadable:
        return write_tiny_sdxl, "tiny SDXL"
    return write_synthetic_sdxl, "synthetic SDXL"


def _write_models(models_dir: Path, n_models: int, write: _Writer) -> Path:
    """A base, n fine-tunes of it, and two files the recipe must exclude."""
    from safetensors.torch import save_file

    models_dir.mkdir(parents=True, exist_ok=True)
    base = models_dir.parent / "sdxl_base.safetensors"
    write(base, seed=0)
    for index in range(n_models):
        write(models_dir / f"finetune_{index + 1:02d}.safetensors", seed=index + 1, base=base)
    shutil.copyfile(models_dir / "finetune_01.safetensors", models_dir / "finetune_01_copy.safetensors")
    save_file(
        {
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 8),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        },
        models_dir / "sd15_model.safetensors",
    )
    return base


def _denoise(out: Path, config_dir: Path) -> None:
    from mergekit_sdxl.sdxl.diffusers_check import denoise_two_steps
    from mergekit_sdxl.sdxl.tiny import write_tiny_config_dir

    image = denoise_two_steps(out, write_tiny_config_dir(config_dir))
    finite = bool(torch.isfinite(torch.as_tensor(image)).all())
    typer.echo(f"diffusers: loaded {out.name} and ran 2 denoising steps -> image {tuple(image.shape)}, finite={finite}")
    if not finite:
        raise typer.Exit(code=1)


def run_demo(outdir: Path, n_models: int = 4, method: str = "tgmd") -> None:
    from mergekit_sdxl.cli.merge_cmd import report_result
    from mergekit_sdxl.host.driver import run_sdxl_merge
    from mergekit_sdxl.host.mergekit_api import MergeOptions
    from mergekit_sdxl.workflow.recipe import build_recipe

    outdir = Path(outdir)
    models_dir = outdir / "models"
    loadable = diffusers_available()
    write, kind = _checkpoint_writer(loadable)
    if not loadable:
        typer.echo("    diffusers is not installed: the demo writes synthetic SDXL checkpoints (mergeable, not loadable)")
    typer.echo(f"1/4 writing {n_models} {kind} fine-tunes, a base, a duplicate and an SD1 file to {models_dir}")
    base = _write_models(models_dir, n_models, write)
    typer.echo("2/4 recipe: discover, validate, exclude")
    recipe = build_recipe(models_dir, base, method=method)
    for line in recipe.summary_lines():
        typer.echo("    " + line)
    config = outdir / "recipe.yaml"
    config.write_text(recipe.yaml_text, encoding="utf-8")
    typer.echo(f"    recipe written to {config}")
    out = outdir / "merged.safetensors"
    typer.echo(f"3/4 merging with {method} into {out}")
    result = run_sdxl_merge(recipe.yaml_text, str(out), MergeOptions(quiet=True), overrides={"memory_budget": "1GB"})
    report_result(result, echo=typer.echo)
    typer.echo(f"    provenance: {out}.json and {out.with_suffix('.md')}")
    typer.echo("4/4 loading the merge in diffusers")
    if not loadable:
        typer.echo("    diffusers is not installed (pip install -e '.[test]'); skipped")
    else:
        _denoise(out, outdir / "diffusers_config")
    _report(config, out, outdir / "report")


def _report(config: Path, out: Path, folder: Path) -> None:
    """The report of the demo's merge (from the merged file: no second merge); needs the report extra."""
    from mergekit_sdxl.cli.report_cmd import write_merge_report
    from mergekit_sdxl.io.report_figures import REPORT_EXTRA_HINT, MissingExtraError, require_matplotlib

    try:
        require_matplotlib()
    except MissingExtraError:
        typer.echo(f"report: skipped, matplotlib is not installed ({REPORT_EXTRA_HINT})")
        return
    page = write_merge_report(
        config.read_text(encoding="utf-8"), folder, source=str(config), merged=str(out), overrides={"memory_budget": "1GB"}
    )
    typer.echo(f"report written to {page}")
