"""Golden regression: eight fixed merges give output TENSORS identical to those of commit 22f19e4.

``tests/data/golden_tensors_22f19e4.json`` (written by ``bench/make_golden_outputs.py`` from a
clean tree of 22f19e4) holds the configs, the input generator and, per merge, a sha256 over every
output tensor's name, dtype, shape and raw bytes. Metadata is not compared: it may legitimately
change; the merged values may not. The JSON is this test's only link to the old code.

The tgmd configs name their inputs by bare file names, run in the inputs' folder: the DROP masks
depend on the model as written in the config, so absolute tmp paths would change their bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

from tests.paths import DATA

GOLDEN = DATA / "golden_tensors_22f19e4.json"
_DOC = json.loads(GOLDEN.read_text(encoding="utf-8"))
MERGES = list(_DOC["merges"])

pytestmark = pytest.mark.slow


def _tensor_records(path: Path):
    """(name, dtype, shape, raw bytes) of a safetensors file in sorted name order."""
    with open(path, "rb") as handle:
        (n,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(n))
        data = handle.read()
    header.pop("__metadata__", None)
    for name in sorted(header):
        info = header[name]
        start, end = info["data_offsets"]
        yield name, info["dtype"], list(info["shape"]), data[start:end]


def _digest(path: Path, sample: Sequence[str] = ()) -> dict:
    """The digests of bench/make_golden_outputs.py (see ``produced_by.digest`` in the JSON)."""
    total = hashlib.sha256()
    checks: List[str] = []
    names: List[str] = []
    found: Dict[str, str] = {}
    for name, dtype, shape, raw in _tensor_records(path):
        head = json.dumps([name, dtype, shape]).encode("utf-8")
        total.update(struct.pack("<Q", len(head)) + head + struct.pack("<Q", len(raw)))
        total.update(raw)
        checks.append(hashlib.sha256(head + raw).hexdigest()[:2])
        names.append(name)
        if name in sample:
            found[name] = f"{dtype}[{','.join(map(str, shape))}]:{hashlib.sha256(raw).hexdigest()}"
    return {
        "sha256": total.hexdigest(),
        "tensors": len(names),
        "names_sha256": hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest(),
        "checks": "".join(checks),
        "sample": [found.get(name, "absent") for name in sample],
        "names": names,
    }


def _explain(label: str, got: dict, want: dict, sample_keys: Sequence[str]) -> str:
    """Which tensors differ, as far as the golden file can tell."""
    lines = [f"{label}: output tensors differ from 22f19e4 (sha256 {got['sha256']} != {want['sha256']})"]
    if got["tensors"] != want["tensors"] or got["names_sha256"] != want["names_sha256"]:
        lines.append(f"  tensor names differ: {got['tensors']} tensors vs {want['tensors']} in the golden output")
    else:
        differing = [
            i for i in range(0, len(want["checks"]), 2) if got["checks"][i : i + 2] != want["checks"][i : i + 2]
        ]
        names = got["names"]
        if differing:
            first = names[differing[0] // 2]
            lines.append(
                f"  first differing tensor: {first}; at least {len(differing)} of {got['tensors']} tensors differ "
                f"(per-tensor checks are 8 bits: about 1 in 256 changed tensors goes unnoticed by them)"
            )
            lines.append("  e.g. " + ", ".join(names[i // 2] for i in differing[:8]))
        else:
            lines.append(
                "  every per-tensor check byte matches: the difference hides in a tensor the 8-bit checks miss"
            )
    for key, g, w in zip(sample_keys, got["sample"], want["sample"], strict=True):
        if g != w:
            lines.append(
                f"  sample {key}: {g.split(':')[0]} {g[-64:][:16]}... vs golden {w.split(':')[0]} {w[-64:][:16]}..."
            )
    return "\n".join(lines)


def _clear_loader_cache() -> None:
    if sys.modules.get("mergekit.io.tasks") is None:
        return
    from mergekit.io.tasks import LoaderCache

    loaders = getattr(LoaderCache, "loaders", None)
    if loaders is not None:
        loaders.clear()


def _mergekit_sdxl(argv: Sequence[str]) -> int:
    """``mergekit-sdxl ARGV`` in this process: ``cli.main.run`` (current code) or, on trees that
    predate it, ``cli.main.main`` (which exits)."""
    import mergekit_sdxl.cli.main as cli

    saved = sys.argv
    sys.argv = ["mergekit-sdxl", *argv]
    try:
        if hasattr(cli, "run"):
            return int(cli.run() or 0)
        try:
            cli.main()
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        return 0
    finally:
        sys.argv = saved
        _clear_loader_cache()


@pytest.fixture(scope="module")
def golden_inputs(tmp_path_factory) -> Path:
    """The four float16 inputs of the golden merges, checked against the golden digests."""
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    generator = _DOC["generator"]
    folder = tmp_path_factory.mktemp("golden_inputs")
    width = float(Fraction(generator["width"]))
    for spec in generator["files"]:
        base = folder / spec["base"] if spec["base"] else None
        write_synthetic_sdxl(folder / spec["name"], width=width, seed=spec["seed"], base=base)
    return folder


def test_generated_inputs_match_golden(golden_inputs):
    """If this fails, the synthetic generator changed and every merge below is meaningless."""
    import mergekit_sdxl

    print(f"mergekit_sdxl under test: {mergekit_sdxl.__file__}")
    for name, want in _DOC["inputs"].items():
        got = _digest(golden_inputs / name)
        assert got["sha256"] == want["sha256"], f"input {name}: write_synthetic_sdxl no longer writes the 22f19e4 bytes"


@pytest.mark.parametrize("name", MERGES)
def test_merge_output_tensors_match_golden(name, golden_inputs, tmp_path, monkeypatch):
    for input_name, want in _DOC["inputs"].items():
        if _digest(golden_inputs / input_name)["sha256"] != want["sha256"]:
            pytest.fail(f"input {input_name} differs from the golden one (generator changed): not a merge regression")
    spec = _DOC["merges_spec"][name]
    config = tmp_path / f"{name}.yaml"
    config.write_text(spec["config"].replace(_DOC["placeholder"], str(golden_inputs)), encoding="utf-8")
    monkeypatch.setenv("MERGEKIT_SDXL_CACHE_DIR", str(tmp_path / "hash-cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.chdir(golden_inputs)  # the tgmd configs name inputs relative to their folder
    if spec["tool"] == "mergekit-sdxl":
        out = tmp_path / f"{name}.safetensors"
        code = _mergekit_sdxl(["merge", str(config), str(out), *spec["args"]])
    else:
        assert spec["tool"] == "mergekit-yaml", spec["tool"]
        out = tmp_path / name / "model.safetensors"
        # A child process, like the console script: the plugin arrives through the .pth hook.
        script = "import sys; from mergekit.scripts.run_yaml import main; sys.argv[0] = 'mergekit-yaml'; main()"
        done = subprocess.run(
            [sys.executable, "-c", script, str(config), str(tmp_path / name), *spec["args"]],
            capture_output=True,
            text=True,
        )
        code = done.returncode
        if code != 0:
            print(done.stdout[-4000:], done.stderr[-4000:])
    assert code == 0 and out.is_file(), f"{name}: {spec['tool']} failed with exit code {code}"
    want = _DOC["merges"][name]
    got = _digest(out, _DOC["sample_keys"])
    if got["sha256"] != want["sha256"]:
        pytest.fail(_explain(name, got, want, _DOC["sample_keys"]), pytrace=False)
