"""``mergekit-sdxl merge CONFIG OUT.safetensors``: every mergekit option, plus SDXL ones.

A click command (not typer) so that mergekit's own ``add_merge_options`` decorator
supplies all of ``mergekit-yaml``'s options unchanged.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from typing import Optional

import click
from mergekit.options import MergeOptions, add_merge_options

LOG = logging.getLogger(__name__)


def report_result(result, echo=click.echo) -> None:
    """Print what a user publishes: path, size, sha256, AutoV2."""
    write = result.write
    echo(f"wrote {write.path} ({write.size / 1e9:.3f} GB, {result.keys} tensors, {result.seconds:.1f} s)")
    rate = result.bytes_read / max(result.seconds, 1e-9) / 1e6
    echo(f"read {result.bytes_read / 1e9:.3f} GB from the inputs ({rate:.1f} MB/s)")
    echo(f"sha256 {write.sha256}")
    echo(f"AutoV2 {write.autov2}")


@click.command("merge")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path", type=click.Path(dir_okay=False))
@click.option("--memory-budget", default=None, help="Working memory bound, e.g. 4GB, 512MB (default: half the free RAM, at most 8 GiB).")
@click.option("--threads", type=int, default=None, help="Torch threads for the math inside one tensor.")
@click.option("--vae", "vae_source", default=None, help="VAE source: base (default), merge, or a checkpoint path.")
@click.option("--allow-vpred-mix", is_flag=True, default=None, help="Allow merging v-prediction and epsilon models.")
@click.option("--scan", is_flag=True, default=False, help="Preflight also reads every value (NaN/inf check).")
@click.option("--restart", is_flag=True, default=False, help="Discard an interrupted merge of this output and start over.")
@add_merge_options
def merge_command(
    merge_options: MergeOptions,
    config_file: str,
    out_path: str,
    memory_budget: Optional[str],
    threads: Optional[int],
    vae_source: Optional[str],
    allow_vpred_mix: Optional[bool],
    scan: bool,
    restart: bool,
) -> None:
    """Merge the checkpoints of CONFIG_FILE into ONE single-file SDXL checkpoint OUT_PATH."""
    from mergekit_sdxl.host.driver import run_sdxl_merge
    from mergekit_sdxl.io.journal import ResumeMismatch

    if threads is not None:
        merge_options = merge_options.model_copy(update={"num_threads": threads})
    merge_options.apply_global_options()
    if merge_options.verbosity == 0:
        logging.getLogger("mergekit_sdxl").setLevel(logging.WARNING)
    overrides = {
        "memory_budget": memory_budget,
        "allow_vpred_mix": allow_vpred_mix,
        "vae": {"source": vae_source} if vae_source else None,
    }
    with open(config_file, encoding="utf-8") as handle:
        text = handle.read()
    try:
        result = run_sdxl_merge(
            text,
            out_path,
            merge_options,
            overrides=overrides,
            restart=restart,
            preflight_scan=scan,
            command=" ".join(shlex.quote(a) for a in ["mergekit-sdxl", *sys.argv[2:]]),
            config_name=os.path.basename(config_file),
        )
    except ResumeMismatch as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to resume", err=True)
        sys.exit(130)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    report_result(result)
