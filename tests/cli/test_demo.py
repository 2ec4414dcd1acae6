"""``mergekit-sdxl demo`` from a plain install: without diffusers (a test extra) it merges synthetic
checkpoints and skips the diffusers load with one line, instead of failing."""

from __future__ import annotations

import subprocess
import sys

import pytest

# diffusers made unimportable before the CLI starts, as in an install without the test extra.
_NO_DIFFUSERS = """
import sys

class _NoDiffusers:
    def find_spec(self, name, path=None, target=None):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ImportError(f"No module named {name!r} (hidden by the test)")
        return None

sys.meta_path.insert(0, _NoDiffusers())
sys.argv = ["mergekit-sdxl", "demo", sys.argv[1], "--models", "2"]
from mergekit_sdxl.cli.entry import main
main()
"""


@pytest.mark.slow
def test_demo_without_diffusers_merges_synthetic_checkpoints(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-c", _NO_DIFFUSERS, str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "diffusers is not installed: the demo writes synthetic SDXL checkpoints" in done.stdout
    assert "1/4 writing 2 synthetic SDXL fine-tunes" in done.stdout
    assert "diffusers is not installed (pip install -e '.[test]'); skipped" in done.stdout
    assert "Traceback" not in done.stderr
    assert (out / "merged.safetensors").is_file() and (out / "recipe.yaml").is_file()
