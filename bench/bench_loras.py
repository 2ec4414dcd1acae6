#!/usr/bin/env python
"""Benchmark: bake N small LoRAs into one SDXL base under a fixed ``--memory-budget``: TGMD against
the classic ``task_arithmetic`` bake, time and peak memory, measured in the same run.

Every method goes through the same I/O, ``mergekit-sdxl merge CONFIG OUT.safetensors --memory-budget
B --quiet``, run as a child process (one at a time) under ``/usr/bin/time -v`` (psutil polling of
VmHWM when that is missing), so the peak RSS is the child's own. A third child only imports what a
merge imports (torch, mergekit, the plugin): its peak RSS is the floor every merge starts from.

Inputs
    base     a width-scaled synthetic SDXL (``write_synthetic_sdxl``, ``--width``, default 1/16:
             ~40 MB, all 2515 keys), ``WORKDIR/base_w<width>.safetensors``;
    LoRAs    N kohya LoRA files of rank ``--rank`` (fp16 factors, alpha = rank / 2, i.e. scale 0.5),
             each adapting a seeded random three quarters of the same ``--modules`` candidate
             modules (linear attention / MLP modules of UNet blocks IN07-IN08, M00, OUT00-OUT02 and
             of both text encoders' first two layers, the names kohya's SDXL trainer writes), so
             LoRAs overlap on some keys and leave most keys alone. A module's factors are factors
             shared by every LoRA plus half as much of the LoRA's own (LoRAs of one style agree
             in part: a robust merge keeps what they share). File i depends only on (i, width,
             modules, rank): ``WORKDIR/loras/w<width>_m<modules>_r<rank>/lora_XXXX.safetensors``,
             reused by every later run with the same settings.
    Every input is hashed once up front into the child's hash cache, so no timed merge hashes.

Configs (``WORKDIR/runs/``), one model per LoRA, ``{model: {model: base, lora: loraN}}``
    task_arithmetic  mergekit's built-in: base + the sum of each LoRA's change (weight 1 each:
                     kohya's merge_lora.py bake), dtype float32, out_dtype float16
    tgmd             the AstolfoMix-XL reference parameters (DROP p = 0.1, density 1, count
                     vote, geometric median, lambda 1, seed 240603), dtype float64, out_dtype
                     float16; a LoRA abstains on the keys it leaves alone

Measured per run
    wall s           wall time of the child (interpreter start, validation, preflight, planning,
                     the merge, writing)
    peak RSS MB      maximum resident set size of the child (MB = 10^6 bytes)
    over imports MB  peak RSS minus the imports-only child's: what the merge itself held
    x task_arith     wall time and peak RSS / those of ``task_arithmetic`` in the same invocation
    keys changed     output keys that differ from the base (every key some LoRA changes must);
                     every other key must equal the base bit for bit ("untouched = base")

Usage
    python bench/bench_loras.py                                   # N = 1000, budget 1GB
    python bench/bench_loras.py --count 200 --budget 512MB --workdir /tmp/bench-loras
    python bench/bench_loras.py --count 1000 --methods tgmd --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_merge  # noqa: E402 - the child runner of the merge benchmark

METHODS = ("task_arithmetic", "tgmd")
_BLOCKS = re.compile(r"^lora_(unet_(input_blocks_[78]|middle_block|output_blocks_[012])_|te[12]_text_model_encoder_layers_(0|1)_)")
_TGMD = {"drop_rate": 0.1, "density": 1.0, "sign_election": "count", "aggregate": "median", "lambda": 1.0, "seed": 240603}


# The merge benchmark's helpers: width parsing and tags (the same file names), prehashing, cleaning.
parse_width = bench_merge.parse_width
width_tag = bench_merge.width_tag
prehash = bench_merge.prehash
_clean_output = bench_merge._clean_output


# ----------------------------------------------------------------------------- inputs


def _candidates(shapes: Dict[str, Tuple[int, ...]], limit: int) -> List[Tuple[str, Any]]:
    from mergekit_sdxl.sdxl.tiny_lora import kohya_modules

    found = [(n, t) for n, t in kohya_modules(shapes, conv=False) if _BLOCKS.match(n)]
    random.Random(0).shuffle(found)
    return sorted(found[:limit], key=lambda item: item[0])


def ensure_loras(folder: Path, shapes: Dict[str, Tuple[int, ...]], count: int, modules: int, rank: int) -> Tuple[List[Path], Set[str]]:
    """The first ``count`` LoRA files (written where missing) and the keys they change."""
    from mergekit_sdxl.sdxl.tiny_lora import lora_factors, module_shape, write_lora

    folder.mkdir(parents=True, exist_ok=True)
    candidates = _candidates(shapes, modules)
    touched: Set[str] = set()
    paths: List[Path] = []
    written = 0
    started = time.monotonic()
    shared = {
        name: lora_factors("lora", module_shape(target, shapes), rank, seed=1_000_000 + j, alpha=rank / 2, std=0.1)
        for j, (name, target) in enumerate(candidates)
    }
    for i in range(count):
        chosen = random.Random(i).sample(candidates, max(1, 3 * len(candidates) // 4))
        touched.update(target.weight for _, target in chosen)
        path = folder / f"lora_{i:04d}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        parts = {}
        for j, (name, target) in enumerate(chosen):
            own = lora_factors("lora", module_shape(target, shapes), rank, seed=i * 1000 + j, alpha=rank / 2, std=0.05)
            parts[name] = {c: (v if c == "alpha" else shared[name][c] + v) for c, v in own.items()}
        tmp = path.with_suffix(".tmp")
        write_lora(tmp, parts, metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": str(rank)})
        os.replace(tmp, path)
        written += 1
    if written:
        print(f"# wrote {written} LoRA files into {folder} in {time.monotonic() - started:.1f} s", flush=True)
    return paths, touched


def make_config(method: str, base: Path, loras: List[Path]) -> Dict[str, Any]:
    models: List[Dict[str, Any]] = []
    for path in loras:
        entry: Dict[str, Any] = {"model": {"model": {"path": str(base)}, "lora": {"path": str(path)}}}
        if method == "task_arithmetic":
            entry["parameters"] = {"weight": 1.0}  # the LoRA's strength
        models.append(entry)
    config: Dict[str, Any] = {"merge_method": method, "base_model": {"model": {"path": str(base)}}, "models": models}
    if method == "tgmd":
        config.update(parameters=dict(_TGMD), dtype="float64", out_dtype="float16")
    else:
        config.update(dtype="float32", out_dtype="float16")
    return config


# ----------------------------------------------------------------------------- children


# The child runner of the merge benchmark: the same /usr/bin/time -v (or VmHWM polling) measurement.
run_child = bench_merge.run_child
_mergekit_sdxl = bench_merge._mergekit_sdxl


def imports_only(env: Dict[str, str], log: Path) -> Dict[str, Any]:
    """The peak RSS of a child that imports what a merge imports, and nothing more."""
    code = "import torch, mergekit.merge, mergekit_sdxl.host.driver, mergekit_sdxl.host.plugin"
    return run_child([sys.executable, "-c", code], env, log)


def check_output(out: Path, base: Path, touched: Set[str]) -> Dict[str, Any]:
    """Keys that differ from the base, and whether every key no LoRA changes is the base's."""
    from safetensors.torch import load_file

    merged, original = load_file(str(out)), load_file(str(base))
    differ = {k for k in merged if k in original and not _equal(merged[k], original[k])}
    return {"keys_changed": len(differ & touched), "untouched_equal_base": not (differ - touched)}


def _equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a, b.to(a.dtype)))


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--count", type=int, default=1000, help="number of LoRA files (default 1000)")
    parser.add_argument("--modules", type=int, default=48, help="candidate modules; each LoRA adapts a random 3/4 (default 48)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--width", type=parse_width, default=1 / 16, help="width factor of the base, e.g. 1/16 (default)")
    parser.add_argument("--budget", default="1GB", help="--memory-budget of every merge (default 1GB)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    parser.add_argument("--threads", type=int, default=None, help="passed to mergekit-sdxl merge --threads")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergekit-sdxl-bench-loras"), help="inputs, hash cache, configs, outputs")
    parser.add_argument("--keep-output", action="store_true", help="keep the merged files (default: delete after checking)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw measurements here")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m}")
    if args.count < 1:
        parser.error("--count must be >= 1")
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    import yaml

    from mergekit_sdxl.sdxl.tiny import synthetic_shapes, write_synthetic_sdxl

    print(f"# load average {os.getloadavg()}, nproc {os.cpu_count()}", flush=True)
    tag = width_tag(args.width)
    base = work / f"base_w{tag}.safetensors"
    if not base.exists():
        write_synthetic_sdxl(base.with_suffix(".tmp"), width=args.width, seed=0)
        os.replace(base.with_suffix(".tmp"), base)
    shapes = synthetic_shapes(args.width)
    loras, touched = ensure_loras(work / "loras" / f"w{tag}_m{args.modules}_r{args.rank}", shapes, args.count, args.modules, args.rank)
    env = dict(os.environ, MERGEKIT_SDXL_CACHE_DIR=str(work / "hash-cache"))
    env.setdefault("TQDM_DISABLE", "1")
    prehash([base] + loras, work / "hash-cache")
    runs = work / "runs"
    runs.mkdir(exist_ok=True)

    floor = imports_only(env, runs / "imports_only.log")
    print(f"# imports only: peak RSS {floor['peak'] / 1e6:.0f} MB", flush=True)
    rows: List[Dict[str, Any]] = []
    for method in methods:
        config = runs / f"{method}_n{args.count}.yaml"
        config.write_text(yaml.safe_dump(make_config(method, base, loras), sort_keys=False), encoding="utf-8")
        out = runs / f"{method}_n{args.count}.safetensors"
        _clean_output(out)
        argv = [_mergekit_sdxl(), "merge", str(config), str(out), "--quiet", "--memory-budget", args.budget]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        print(f"# {method}: {len(loras)} LoRA models ...", flush=True)
        r = run_child(argv, env, out.with_suffix(".log"))
        r["method"] = method
        if r["rc"] == 0:
            r.update(check_output(out, base, touched))
        if not args.keep_output:
            _clean_output(out)
        status = "ok" if r["rc"] == 0 else f"FAILED rc {r['rc']} (see {r['log']})"
        print(f"#   {status}: {r['wall']:.1f} s, peak RSS {r['peak'] / 1e6:.0f} MB", flush=True)
        rows.append(r)

    from mergekit_sdxl.workflow.options import parse_bytes

    budget = parse_bytes(args.budget)
    reference = next((r for r in rows if r["method"] == "task_arithmetic" and r["rc"] == 0), None)
    lora_bytes = sum(p.stat().st_size for p in loras)
    per_lora = max(1, 3 * len(_candidates(shapes, args.modules)) // 4)
    print()
    print(
        f"{args.count} LoRAs (rank {args.rank}, {per_lora} modules each, {lora_bytes / 1e6:.1f} MB in all) on a "
        f"{str(Fraction(args.width).limit_denominator(1024))}-width SDXL base ({base.stat().st_size / 1e6:.1f} MB); "
        f"the LoRAs change {len(touched)} keys; --memory-budget {args.budget} ({budget / 1e6:.0f} MB); "
        f"imports alone: {floor['peak'] / 1e6:.0f} MB; nproc {os.cpu_count()}"
    )
    print()
    print("| LoRAs | method | budget | wall s | peak RSS MB | over imports MB | x task_arith (time) | x task_arith (RSS) | keys changed | untouched = base | load 1m |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---|---|")
    ok = True
    for r in rows:
        failed = r["rc"] != 0
        ok = ok and not failed and r.get("untouched_equal_base", False) and r.get("keys_changed") == len(touched)
        ratio_t = f"{r['wall'] / reference['wall']:.2f}" if reference and not failed else "-"
        ratio_m = f"{r['peak'] / reference['peak']:.2f}" if reference and not failed else "-"
        print(
            f"| {args.count} | {r['method']} | {args.budget} | {r['wall']:.1f}{' (failed)' if failed else ''} | {r['peak'] / 1e6:.0f} | "
            f"{(r['peak'] - floor['peak']) / 1e6:.0f} | {ratio_t} | {ratio_m} | "
            f"{r.get('keys_changed', '-')}/{len(touched)} | {r.get('untouched_equal_base', '-')} | {r['load'][0]:.2f}->{r['load'][1]:.2f} |"
        )
    print()
    print("Command: `.venv/bin/python bench/bench_loras.py " + " ".join(sys.argv[1:]) + "`")
    if args.json:
        report = {
            "count": args.count, "rank": args.rank, "modules_per_lora": per_lora, "width": args.width, "lora_bytes": lora_bytes,
            "keys_changed_by_loras": len(touched), "budget": args.budget, "budget_bytes": budget, "imports_only_peak": floor["peak"],
            "runs": rows,
        }
        args.json.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
