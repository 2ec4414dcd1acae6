"""``mergekit-sdxl merge CONFIG OUT.safetensors``: every mergekit option, plus SDXL ones.

A click command (not typer) so that mergekit's own ``add_merge_options`` decorator
supplies all of ``mergekit-yaml``'s options unchanged.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click

from mergekit_sdxl.host.mergekit_api import MergeOptions, add_merge_options
from mergekit_sdxl.text import printable

LOG = logging.getLogger(__name__)


def check_memory_budget(value: Optional[str]) -> None:
    """``--memory-budget`` must be a size (refused before any work)."""
    from mergekit_sdxl.errors import UsageError
    from mergekit_sdxl.workflow.options import parse_bytes

    if value is not None:
        try:
            parse_bytes(value)
        except ValueError as error:
            raise UsageError(f"--memory-budget {value}: {error}") from error


def _budget(value: Optional[str]) -> Optional[str]:
    from mergekit_sdxl.errors import UsageError

    try:
        check_memory_budget(value)
    except UsageError as error:
        raise click.BadParameter(str(error)) from error
    return value


def check_device_options(options: MergeOptions) -> None:
    """Device and thread options mergekit would only trip over in the middle of a merge."""
    import torch

    from mergekit_sdxl.errors import UsageError

    if options.num_threads is not None and options.num_threads < 1:
        raise UsageError(f"--num-threads {options.num_threads}: give at least 1 thread")
    device = str(options.device or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--cuda / --device {device}: this torch has no usable CUDA device (torch {torch.__version__})")
    if device not in ("cpu",) and not device.startswith(("cuda", "xpu", "mps")):
        raise UsageError(f"--device {device}: unknown device (cpu, cuda, cuda:N)")


def published_command(argv: Sequence[str], *, keep_paths: bool) -> str:
    """The command that was run, as the model card shows it: ``mergekit-sdxl SUBCOMMAND ARGS``,
    with paths shortened to their file names unless ``keep_paths`` (they are the user's)."""
    args = list(argv[1:])
    if not keep_paths:
        args = [os.path.basename(a) if os.sep in a and not a.startswith("-") else a for a in args]
    return " ".join(shlex.quote(a) for a in ["mergekit-sdxl", *args])


def report_result(result, echo=click.echo) -> None:
    """Print what a user publishes: path, size, sha256, AutoV2."""
    write = result.write
    echo(f"wrote {write.path} ({write.size / 1e9:.3f} GB, {result.keys} tensors, {result.seconds:.1f} s)")
    rate = result.bytes_read / max(result.seconds, 1e-9) / 1e6
    echo(f"read {result.bytes_read / 1e9:.3f} GB from the inputs ({rate:.1f} MB/s)")
    echo(f"sha256 {write.sha256}")
    echo(f"AutoV2 {write.autov2}")


def _report_reads(config_file: str, out_path: str) -> List[Tuple[str, str]]:
    """``(path, what)`` of every file a merge with ``--report`` reads or writes, for the folder checks."""
    from mergekit_sdxl.host.driver import input_paths, load_config, read_config_text

    loaded = load_config(read_config_text(config_file), None, source=config_file)
    reads = [(path, f"the {role} input") for path, role in input_paths(loaded.config, loaded.sdxl)]
    return [*reads, (config_file, "the config file"), (out_path, "the merge output")]


def _check_report_dir(report_dir: str, config_file: str, out_path: str) -> None:
    """Refuse a report folder that would write over an input or the output, before the merge."""
    from mergekit_sdxl.io.report_files import prepare_report_dir

    prepare_report_dir(Path(report_dir), _report_reads(config_file, out_path))


def _write_recorded_report(
    result: Any, report_dir: str, config_file: str, out_path: str, overrides: Dict[str, Any]
) -> Tuple[Path, Dict[str, Any]]:
    """Write the report the merge collected (returns the page and the report); keys an earlier
    run of a resumed merge wrote are added by a pass over them (inputs and the finished output)."""
    from mergekit_sdxl.host.driver import read_config_text
    from mergekit_sdxl.io.report_files import write_report

    recorder = result.report
    collector = recorder.collector
    missing = [k for k in recorder.resumed if k not in recorder.seen]
    if missing:
        from mergekit_sdxl.errors import UserError
        from mergekit_sdxl.host.report_pass import add_keys_from_output, prepare_report

        try:
            job = prepare_report(read_config_text(config_file), source=config_file, overrides=overrides, merged=out_path)
            add_keys_from_output(job, collector, missing)
            collector.statistics_from += f"; {len(missing)} keys written by an earlier run of this resumed merge: a pass over them"
        except UserError as error:
            LOG.warning("report: %d keys written by an earlier run are left out of the report (%s)", len(missing), error)
    if recorder.reread_bytes:
        LOG.info("report: %.1f MB read again for rows the merge did not read for every input together", recorder.reread_bytes / 1e6)
    report = collector.build()
    return write_report(Path(report_dir), report, _report_reads(config_file, out_path)), report


@click.command("merge")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path", type=click.Path())
@click.option("--memory-budget", default=None, callback=lambda ctx, param, value: _budget(value), help="Working memory bound, e.g. 4GB, 512MB (default: half the free RAM, at most 8 GiB).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads for the math inside one tensor.")
@click.option("--vae", "vae_source", default=None, help="VAE source: base (default), merge, or a checkpoint path.")
@click.option("--allow-vpred-mix", is_flag=True, default=None, help="Allow merging v-prediction and epsilon models.")
@click.option("--scan", is_flag=True, default=False, help="Preflight also reads every value (NaN/inf check).")
@click.option("--restart", is_flag=True, default=False, help="Discard an interrupted merge of this output and start over.")
@click.option("--no-verify-pins", is_flag=True, default=False, help="Do not check the inputs against the sha256 pins of the recipe.")
@click.option("--allow-base-in-models", is_flag=True, default=False, help="Accept the base model listed again under models:.")
@click.option("--keep-paths", is_flag=True, default=False, help="Record full input paths in the output's metadata and card (private use).")
@click.option("--ray-address", default=None, help="Merge the keys on a Ray cluster: local (start one here), auto, or HOST:PORT; the inputs need the same paths on every node (pip install 'mergekit-sdxl[ray]').")
@click.option("--ray-workers", type=click.IntRange(min=1), default=None, help="With --ray-address: keys merged at once (local: worker processes; default: the CPUs).")
@click.option("--report", "report_dir", default=None, type=click.Path(file_okay=False), help="Also write the merge's report (report.json, figures, index.html) into this folder (pip install 'mergekit-sdxl[report]').")
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
    no_verify_pins: bool,
    allow_base_in_models: bool,
    keep_paths: bool,
    ray_address: Optional[str],
    ray_workers: Optional[int],
    report_dir: Optional[str],
) -> None:
    """Merge the checkpoints of CONFIG_FILE into ONE single-file SDXL checkpoint OUT_PATH."""
    from mergekit_sdxl.host.driver import read_config_text, run_sdxl_merge
    from mergekit_sdxl.host.ray_merge import ray_settings

    ray = ray_settings(ray_address, ray_workers)  # before any work: Ray may not be installed
    if report_dir is not None:
        from mergekit_sdxl.io.report_figures import require_matplotlib

        require_matplotlib()  # before any work, not after an hour of merging
        _check_report_dir(report_dir, config_file, out_path)
    if threads is not None:
        merge_options = merge_options.model_copy(update={"num_threads": threads})
    check_device_options(merge_options)
    merge_options.apply_global_options()
    if merge_options.verbosity == 0:
        logging.getLogger("mergekit_sdxl").setLevel(logging.WARNING)
    overrides = {
        "memory_budget": memory_budget,
        "allow_vpred_mix": allow_vpred_mix,
        "vae": {"source": vae_source} if vae_source else None,
    }
    result = run_sdxl_merge(
        read_config_text(config_file),
        out_path,
        merge_options,
        overrides=overrides,
        restart=restart,
        preflight_scan=scan,
        command=published_command(sys.argv, keep_paths=keep_paths),
        config_name=os.path.basename(config_file),
        source=config_file,
        verify_pins=not no_verify_pins,
        allow_base_in_models=allow_base_in_models,
        keep_paths=keep_paths,
        ray=ray,
        collect_report=report_dir is not None,
    )
    report_result(result)
    if report_dir is not None:
        from mergekit_sdxl.cli.report_cmd import summary_lines, write_merge_report

        if result.report is not None:
            page, report = _write_recorded_report(result, report_dir, config_file, out_path, overrides)
            for line in summary_lines(report):
                click.echo("    " + line)
        else:
            # With Ray the keys are merged in other processes: a pass over the inputs (mostly
            # from the page cache by now) and the output just written.
            page = write_merge_report(
                read_config_text(config_file),
                Path(report_dir),
                source=config_file,
                merged=out_path,
                overrides=overrides,
                quiet=merge_options.quiet,
            )
        click.echo(f"report written to {printable(page)}")
