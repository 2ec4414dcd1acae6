#!/usr/bin/env python
"""Write the golden tensor digests of eight fixed merges (tests/data/golden_tensors_<commit>.json).

``tests/e2e/test_golden_outputs.py`` reruns the same merges with the code under test and compares the
OUTPUT TENSORS (name, dtype, shape, raw bytes) with these digests. File sha256s are not compared:
the metadata of an output may legitimately change; its tensors may not.

Run it against a clean tree of the reference commit, never against a checkout being edited::

    mkdir -p /tmp/golden_22f19e4
    git -C /work/main archive 22f19e4 | tar -x -C /tmp/golden_22f19e4
    .venv/bin/python bench/make_golden_outputs.py --tree /tmp/golden_22f19e4 --commit 22f19e4 \
        --out tests/data/golden_tensors_22f19e4.json

``--tree`` re-runs this script with the tree first on ``PYTHONPATH`` (so the import hook of
``mergekit_sdxl_hook.pth`` and every ``mergekit_sdxl`` module come from it, not from the editable
install) and refuses to go on if ``mergekit_sdxl`` still resolves elsewhere. Without ``--tree``
the importable ``mergekit_sdxl`` is used. ``--check JSON`` compares with an existing file instead
of writing one (what the test does). Takes about a minute on 2 cores.

What is merged (all inputs float16, ``write_synthetic_sdxl(path, width=1/16, seed=i, base=...)``:
``base`` seed 0, ``model_1..3`` = base + 0.02 * randn, seeds 1..3):

    tgmd_f64           tgmd, dtype float64, drop_rate 0.1, seed 240603
    tgmd_f32           the same, dtype float32
    tgmd_f64_chunked   tgmd_f64 with --memory-budget 64MB: the largest keys (token embeddings,
                       ~4M elements at width 1/16) are merged in row chunks
    ties_soup          ties_soup (TIES-SOUP recipe of configs/ties-soup.yaml), dtype float32, seed 7
    geometric_median   geometric_median of model_1..3, dtype float32 (no base)
    linear_gradient    linear with block-weight gradients (the grammar of configs/block-weights.yaml)
    ties               mergekit's own ties, float32, density 0.5, weights 0.5/0.3/0.2
    ties_mergekit_yaml the same config through the stock ``mergekit-yaml CONFIG OUTDIR``

The tgmd merges name their inputs by bare file names (run in the inputs' folder): the DROP masks
are a function of (seed, tensor name, model as written in the config), so with absolute paths
their bytes would depend on where the inputs lie. The other merges use absolute paths.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

WIDTH = "1/16"
INPUTS = [  # (file name, seed, base file name or None)
    ("base.safetensors", 0, None),
    ("model_1.safetensors", 1, "base.safetensors"),
    ("model_2.safetensors", 2, "base.safetensors"),
    ("model_3.safetensors", 3, "base.safetensors"),
]
DIR = "@INPUTS@"  # replaced by the absolute inputs folder

_TGMD = """\
merge_method: tgmd
base_model: {{model: {{path: base.safetensors}}}}
models:
  - model: {{model: {{path: model_1.safetensors}}}}
  - model: {{model: {{path: model_2.safetensors}}}}
  - model: {{model: {{path: model_3.safetensors}}}}
parameters:
  drop_rate: 0.1
  seed: 240603
dtype: {dtype}
out_dtype: float16
"""

_TIES = f"""\
merge_method: ties
base_model: {{model: {{path: {DIR}/base.safetensors}}}}
models:
  - model: {{model: {{path: {DIR}/model_1.safetensors}}}}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {{model: {{path: {DIR}/model_2.safetensors}}}}
    parameters: {{weight: 0.3, density: 0.5}}
  - model: {{model: {{path: {DIR}/model_3.safetensors}}}}
    parameters: {{weight: 0.2, density: 0.5}}
dtype: float32
out_dtype: float16
"""

# name -> (tool, config text, extra CLI arguments). tool: "mergekit-sdxl" (mergekit-sdxl merge
# CONFIG OUT.safetensors) or "mergekit-yaml" (mergekit-yaml CONFIG OUTDIR, OUTDIR/model.safetensors).
MERGES: Dict[str, dict] = {
    "tgmd_f64": {"tool": "mergekit-sdxl", "config": _TGMD.format(dtype="float64"), "args": []},
    "tgmd_f32": {"tool": "mergekit-sdxl", "config": _TGMD.format(dtype="float32"), "args": []},
    "tgmd_f64_chunked": {
        "tool": "mergekit-sdxl",
        "config": _TGMD.format(dtype="float64"),
        "args": ["--memory-budget", "64MB"],
    },
    "ties_soup": {
        "tool": "mergekit-sdxl",
        "config": f"""\
merge_method: ties_soup
base_model: {{model: {{path: {DIR}/base.safetensors}}}}
models:
  - model: {{model: {{path: {DIR}/model_1.safetensors}}}}
  - model: {{model: {{path: {DIR}/model_2.safetensors}}}}
  - model: {{model: {{path: {DIR}/model_3.safetensors}}}}
parameters:
  drop_rate: 0.0
  density: 1.0
  rescale: 0.0
  sign_election: count
  aggregate: mean
  lambda: 1.0
  seed: 7
dtype: float32
out_dtype: float16
""",
        "args": [],
    },
    "geometric_median": {
        "tool": "mergekit-sdxl",
        "config": f"""\
merge_method: geometric_median
models:
  - model: {{model: {{path: {DIR}/model_1.safetensors}}}}
  - model: {{model: {{path: {DIR}/model_2.safetensors}}}}
  - model: {{model: {{path: {DIR}/model_3.safetensors}}}}
dtype: float32
out_dtype: float16
""",
        "args": [],
    },
    "linear_gradient": {
        "tool": "mergekit-sdxl",
        "config": f"""\
merge_method: linear
base_model: {{model: {{path: {DIR}/base.safetensors}}}}
models:
  - model: {{model: {{path: {DIR}/model_1.safetensors}}}}
    parameters:
      weight: [0.0, 0.5, 1.0]
  - model: {{model: {{path: {DIR}/model_2.safetensors}}}}
    parameters:
      weight:
        - filter: "input_blocks"
          value: 0.2
        - filter: "output_blocks.8."
          value: 0.0
        - filter: "conditioner.embedders"
          value: 0.0
        - value: 0.6
  - model: {{model: {{path: {DIR}/model_3.safetensors}}}}
    parameters:
      weight: [1.0, 0.25, 0.75, 0.0]
parameters:
  weight: 1.0
  normalize: true
dtype: float32
out_dtype: float16
""",
        "args": [],
    },
    "ties": {"tool": "mergekit-sdxl", "config": _TIES, "args": []},
    "ties_mergekit_yaml": {"tool": "mergekit-yaml", "config": _TIES, "args": ["--no-copy-tokenizer"]},
}

# Per-tensor sha256 kept in the JSON for these keys (diagnostics; the merge digest covers all).
SAMPLE_KEYS = [
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
    "conditioner.embedders.1.model.logit_scale",
    "conditioner.embedders.1.model.text_projection",
    "conditioner.embedders.1.model.token_embedding.weight",
    "conditioner.embedders.1.model.positional_embedding",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
    "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight",
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.label_emb.0.0.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "model.diffusion_model.output_blocks.2.2.conv.weight",
    "model.diffusion_model.output_blocks.8.0.out_layers.3.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.decoder.conv_out.weight",
    "first_stage_model.encoder.down.0.block.0.conv1.weight",
]


# ---------------------------------------------------------------------------------------------
# Digests (the test has its own copy of these few lines: the JSON is its only link to this file)
# ---------------------------------------------------------------------------------------------


def tensor_records(path: Path):
    """Yield (name, dtype, shape, raw bytes) of a safetensors file in sorted name order."""
    with open(path, "rb") as handle:
        (n,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(n))
        data = handle.read()
    header.pop("__metadata__", None)
    for name in sorted(header):
        info = header[name]
        start, end = info["data_offsets"]
        yield name, info["dtype"], list(info["shape"]), data[start:end]


def digest_file(path: Path, sample: Sequence[str] = ()) -> dict:
    """The digests of one file's tensors (metadata excluded).

    ``sha256``: over every tensor in sorted name order, each as u64le len(H), H, u64le len(B), B
    with H = json.dumps([name, dtype, shape]) (the safetensors dtype, e.g. "F16") and B its raw
    bytes. ``checks``: per tensor in sorted name order, the first byte (2 hex digits) of
    sha256(H + B), to name the first differing tensor. ``sample``: "DTYPE[shape]:sha256(B)" of
    each ``sample`` key, in that order.
    """
    total = hashlib.sha256()
    checks: List[str] = []
    names: List[str] = []
    found: Dict[str, str] = {}
    for name, dtype, shape, raw in tensor_records(path):
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
    }


# ---------------------------------------------------------------------------------------------
# Running the merges
# ---------------------------------------------------------------------------------------------


def write_inputs(folder: Path) -> Dict[str, Path]:
    from fractions import Fraction

    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    folder.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, Path] = {}
    for name, seed, base in INPUTS:
        path = folder / name
        write_synthetic_sdxl(path, width=float(Fraction(WIDTH)), seed=seed, base=paths[base] if base else None)
        paths[name] = path
    return paths


def run_mergekit_sdxl(argv: Sequence[str]) -> int:
    """``mergekit-sdxl ARGV`` in this process (the current ``cli.main.run``, or the older
    ``cli.main.main`` that exits)."""
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


def _clear_loader_cache() -> None:
    try:
        from mergekit.io.tasks import LoaderCache
    except ImportError:
        return
    loaders = getattr(LoaderCache, "loaders", None)
    if loaders is not None:
        loaders.clear()


def run_merge(name: str, spec: dict, inputs: Path, work: Path) -> Path:
    """Run one merge with the importable code; return the output .safetensors."""
    config = work / f"{name}.yaml"
    config.write_text(spec["config"].replace(DIR, str(inputs)), encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(inputs)  # the tgmd configs name their inputs relative to this folder
    try:
        if spec["tool"] == "mergekit-sdxl":
            out = work / f"{name}.safetensors"
            code = run_mergekit_sdxl(["merge", str(config), str(out), *spec["args"]])
        elif spec["tool"] == "mergekit-yaml":
            outdir = work / name
            out = outdir / "model.safetensors"
            # A child process, as the console script runs: the plugin comes in via the .pth hook.
            script = "import sys; from mergekit.scripts.run_yaml import main; sys.argv[0] = 'mergekit-yaml'; main()"
            code = subprocess.run([sys.executable, "-c", script, str(config), str(outdir), *spec["args"]]).returncode
        else:
            raise ValueError(f"unknown tool {spec['tool']!r}")
    finally:
        os.chdir(cwd)
    if code != 0 or not out.is_file():
        raise RuntimeError(f"merge {name} failed (exit {code}, output {'present' if out.is_file() else 'missing'})")
    return out


def _chunk_probe():
    """Record which keys the planner merges in row chunks (diagnostics, if the planner has the hook)."""
    try:
        import mergekit_sdxl.host.planner as planner
    except ImportError:
        return None
    original = getattr(planner, "_maybe_chunked", None)
    if original is None:
        return None
    seen: List[str] = []

    def probe(p, task, *args, **kwargs):
        result = original(p, task, *args, **kwargs)
        if result is not None:
            seen.append(f"{task.output_weight.name} (rows_per_chunk {getattr(result, 'rows_per_chunk', '?')})")
        return result

    planner._maybe_chunked = probe
    return seen


def produce(work: Path, only: Optional[Sequence[str]] = None) -> dict:
    import mergekit_sdxl

    os.environ.setdefault("MERGEKIT_SDXL_CACHE_DIR", str(work / "hash-cache"))
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars only
    inputs = work / "inputs"
    started = time.monotonic()
    paths = write_inputs(inputs)
    result = {
        "inputs": {name: digest_file(path) for name, path in paths.items()},
        "merges": {},
        "chunked_keys": {},
        "seconds": {"inputs": round(time.monotonic() - started, 1)},
    }
    for entry in result["inputs"].values():
        del entry["sample"], entry["checks"]
    probe = _chunk_probe()
    for name, spec in MERGES.items():
        if only and name not in only:
            continue
        t0 = time.monotonic()
        if probe is not None:
            probe.clear()
        out = run_merge(name, spec, inputs, work)
        result["merges"][name] = digest_file(out, SAMPLE_KEYS)
        result["seconds"][name] = round(time.monotonic() - t0, 1)
        if probe is not None and spec["tool"] == "mergekit-sdxl":
            result["chunked_keys"][name] = list(probe)
        print(f"{name}: {result['merges'][name]['sha256']} ({result['seconds'][name]} s)", flush=True)
    result["mergekit_sdxl_file"] = mergekit_sdxl.__file__
    return result


def _reexec_with_tree(tree: Path) -> None:
    tree = tree.resolve()
    if os.environ.get("_GOLDEN_TREE") == str(tree):
        import mergekit_sdxl

        where = Path(mergekit_sdxl.__file__).resolve()
        if tree not in where.parents:
            sys.exit(f"mergekit_sdxl resolves to {where}, not under --tree {tree}")
        return
    env = dict(os.environ, _GOLDEN_TREE=str(tree))
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    sys.exit(subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env).returncode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, help="source tree of the reference commit (put first on PYTHONPATH)")
    parser.add_argument("--commit", default="22f19e4", help="the commit the tree is (recorded in the JSON)")
    parser.add_argument("--out", type=Path, help="JSON to write (default tests/data/golden_tensors_<commit>.json)")
    parser.add_argument("--check", type=Path, help="compare with this JSON instead of writing one")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--only", help="comma-separated merge names (with --check)")
    args = parser.parse_args()
    if args.tree is not None:
        _reexec_with_tree(args.tree)

    import tempfile

    with tempfile.TemporaryDirectory(prefix="golden-") as scratch:
        work = (args.work or Path(scratch)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        only = args.only.split(",") if args.only else None
        result = produce(work, only)
    if args.check:
        golden = json.loads(args.check.read_text(encoding="utf-8"))
        bad = [n for n, d in result["inputs"].items() if d["sha256"] != golden["inputs"][n]["sha256"]]
        bad += [n for n, d in result["merges"].items() if d["sha256"] != golden["merges"][n]["sha256"]]
        print("differ: " + ", ".join(bad) if bad else "all digests match")
        sys.exit(1 if bad else 0)
    from importlib.metadata import version

    import torch

    document = {
        "produced_by": {
            "commit": args.commit,
            "script": "bench/make_golden_outputs.py",
            "command": f"python bench/make_golden_outputs.py --tree TREE --commit {args.commit}",
            "mergekit_sdxl_file": result["mergekit_sdxl_file"],
            "versions": {
                "torch": torch.__version__,
                "mergekit": version("mergekit"),
                "safetensors": version("safetensors"),
            },
            "python": sys.version.split()[0],
            "digest": (
                "sha256: over the tensors in sorted name order, each as u64le len(H), H, u64le len(B), B; "
                "H = json.dumps([name, dtype, shape]) (safetensors dtype, e.g. 'F16'), B = raw bytes; "
                "checks: per tensor in sorted name order the first byte (hex) of sha256(H + B); "
                "sample: 'DTYPE[shape]:sha256(B)' of each sample_keys entry"
            ),
            "seconds": result["seconds"],
        },
        "generator": {
            "function": "mergekit_sdxl.sdxl.tiny.write_synthetic_sdxl(path, width=WIDTH, seed=SEED, base=BASE)",
            "width": WIDTH,
            "dtype": "float16",
            "files": [{"name": n, "seed": s, "base": b} for n, s, b in INPUTS],
        },
        "merges_spec": {
            name: {
                "tool": spec["tool"],
                "config": spec["config"],
                "args": spec["args"],
                "cwd": "the inputs folder (bare file names are relative to it)",
            }
            for name, spec in MERGES.items()
        },
        "placeholder": DIR,
        "sample_keys": SAMPLE_KEYS,
        "chunked_keys": result["chunked_keys"],
        "inputs": result["inputs"],
        "merges": result["merges"],
    }
    out = args.out or Path(__file__).resolve().parents[1] / "tests" / "data" / f"golden_tensors_{args.commit}.json"
    out.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
