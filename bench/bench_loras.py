#!/usr/bin/env python
"""Bake N small LoRAs into one SDXL base with TGMD under a fixed memory budget: time and peak memory.

Workload: a width-scaled synthetic SDXL base (``write_synthetic_sdxl``, 1/16 width, ~40 MB, all
2515 keys), and N kohya LoRAs of rank 4 (fp16, alpha 2), each adapting a seeded random half of
the same ``--modules`` attention / MLP modules kohya's SDXL trainer adapts (UNet blocks IN07-IN08,
M00, OUT00-OUT02, and both text encoders). Every LoRA is one model of the config,
``{model: base, lora: loraN}``; the merge is ``mergekit-sdxl merge`` of a ``tgmd`` config with
the AstolfoMix reference parameters, ``--memory-budget`` fixed, run as a child process.

Reported: the time to write the LoRAs, the merge's wall time (validation, hashing, preflight,
planning and the merge itself), the child's peak resident memory (``ru_maxrss``) against the
budget, the keys the LoRAs change, and a check of the output (keys no LoRA changes are the
base's; every changed key differs from it).

Usage
    python bench/bench_loras.py                      # N = 1000, budget 1GB
    python bench/bench_loras.py --count 50 --budget 512MB --workdir /tmp/loras
    python bench/bench_loras.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, _ROOT)
for _name in [m for m in sys.modules if m == "mergekit_sdxl" or m.startswith("mergekit_sdxl.")]:
    del sys.modules[_name]

import torch  # noqa: E402
import yaml  # noqa: E402

from mergekit_sdxl.sdxl.tiny import synthetic_shapes, write_synthetic_sdxl  # noqa: E402
from mergekit_sdxl.sdxl.tiny_lora import kohya_modules, lora_factors, module_shape, write_lora  # noqa: E402

_BLOCKS = re.compile(r"^lora_(unet_(input_blocks_[78]|middle_block|output_blocks_[012])_|te[12]_text_model_encoder_layers_(0|1)_)")


def _candidates(shapes, limit):
    found = [(n, t) for n, t in kohya_modules(shapes, conv=False) if _BLOCKS.match(n)]
    random.Random(0).shuffle(found)
    return sorted(found[:limit])


def write_loras(folder: Path, shapes, count: int, modules: int):
    candidates = _candidates(shapes, modules)
    touched = set()
    paths = []
    for i in range(count):
        chosen = random.Random(i).sample(candidates, max(1, len(candidates) // 2))
        parts = {}
        for j, (name, target) in enumerate(chosen):
            parts[name] = lora_factors("lora", module_shape(target, shapes), 4, seed=i * 1000 + j, alpha=2.0, std=0.02)
            touched.add(target.weight)
        paths.append(write_lora(folder / f"lora_{i:04d}.safetensors", parts, metadata={"ss_base_model_version": "sdxl_base_v1-0"}))
    return paths, touched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--modules", type=int, default=48, help="candidate modules; each LoRA adapts half of them")
    parser.add_argument("--budget", default="1GB")
    parser.add_argument("--threads", type=int, default=0, help="--num-threads for the merge (0: mergekit's default)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_loras_"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base.safetensors"
    if not base.exists():
        write_synthetic_sdxl(base, seed=0)
    shapes = synthetic_shapes(1 / 16)
    started = time.perf_counter()
    loras, touched = write_loras(work / "loras", shapes, args.count, args.modules)
    written = time.perf_counter() - started
    lora_bytes = sum(p.stat().st_size for p in loras)

    config = {
        "merge_method": "tgmd",
        "base_model": {"model": {"path": str(base)}},
        "models": [{"model": {"model": {"path": str(base)}, "lora": {"path": str(p)}}} for p in loras],
        "parameters": {"drop_rate": 0.1, "density": 1.0, "sign_election": "count", "aggregate": "median", "lambda": 1.0, "seed": 240603},
        "dtype": "float64",
        "out_dtype": "float16",
    }
    config_path = work / "tgmd_loras.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = work / "merged.safetensors"
    for stale in work.glob("merged.safetensors*"):
        stale.unlink()
    command = [str(Path(sys.executable).parent / "mergekit-sdxl"), "merge", str(config_path), str(out), "--memory-budget", args.budget]
    if args.threads:
        command += ["--num-threads", str(args.threads)]
    env = dict(os.environ, MERGEKIT_SDXL_CACHE_DIR=str(work / "hash-cache"))
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if result.returncode != 0:
        print(result.stdout, result.stderr, file=sys.stderr)
        return result.returncode

    from safetensors.torch import load_file

    merged, original = load_file(str(out)), load_file(str(base))
    unchanged_ok = all(torch.equal(merged[k], original[k]) for k in merged if k not in touched)
    changed = sum(not torch.equal(merged[k], original[k]) for k in touched)
    from mergekit_sdxl.workflow.options import parse_bytes

    report = {
        "count": args.count,
        "modules_per_lora": max(1, min(args.modules, len(_candidates(shapes, args.modules))) // 2),
        "lora_bytes": lora_bytes,
        "keys_changed_by_loras": len(touched),
        "keys_changed_in_output": changed,
        "untouched_keys_equal_base": unchanged_ok,
        "write_loras_s": round(written, 2),
        "merge_s": round(seconds, 2),
        "peak_rss_bytes": peak,
        "budget_bytes": parse_bytes(args.budget),
        "threads": args.threads or torch.get_num_threads(),
    }
    print(
        f"{args.count} LoRAs ({lora_bytes / 1e6:.1f} MB, {report['modules_per_lora']} modules each, {len(touched)} keys changed): "
        f"written in {written:.1f} s; tgmd merge {seconds:.1f} s, peak RSS {peak / 2**20:.0f} MiB "
        f"(budget {report['budget_bytes'] / 2**20:.0f} MiB); untouched keys = base: {unchanged_ok}; "
        f"changed keys differing from base: {changed}/{len(touched)}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if unchanged_ok and changed == len(touched) else 1


if __name__ == "__main__":
    raise SystemExit(main())
