"""The streamed output is not buffered: peak memory grows with one tensor, not with the model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # every test here starts mergekit-sdxl / mergekit-yaml processes

BIN = Path(sys.executable).parent

MEASURE = (
    "import resource, subprocess, sys; "
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "sys.stderr.write(r.stderr); "
    "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def _peak_rss_kib(args) -> int:
    """Peak RSS of one child process, measured in a fresh parent so no other child is counted."""
    result = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True)
    code, peak = result.stdout.split()
    assert code == "0", result.stderr
    return int(peak)


def _merge_peak(tmp_path: Path, width: float, tag: str) -> tuple[int, int]:
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    a, b = tmp_path / f"{tag}_a.safetensors", tmp_path / f"{tag}_b.safetensors"
    write_synthetic_sdxl(a, width=width, seed=1)
    write_synthetic_sdxl(b, width=width, seed=2, base=a)
    config = tmp_path / f"{tag}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": {"model": {"path": str(p)}}, "parameters": {"weight": 0.5}} for p in (a, b)],
                "dtype": "float32",
            }
        )
    )
    out = tmp_path / f"{tag}_out.safetensors"
    peak = _peak_rss_kib([str(BIN / "mergekit-sdxl"), "merge", str(config), str(out), "--memory-budget", "128MB", "--quiet"])
    return peak * 1024, out.stat().st_size


def test_peak_memory_does_not_hold_the_output(tmp_path):
    small_peak, small_size = _merge_peak(tmp_path, 1 / 32, "small")
    large_peak, large_size = _merge_peak(tmp_path, 1 / 8, "large")
    grown = large_size - small_size
    assert grown > 100e6  # the larger merge writes > 100 MB more output
    # A writer that buffered the model would add at least the output's growth to the peak (plus
    # the per-tensor working set, which grows too); streaming adds only the working set.
    assert large_peak - small_peak < grown, (small_peak, large_peak, grown)
