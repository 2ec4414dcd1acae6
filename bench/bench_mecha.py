#!/usr/bin/env python
"""Benchmark: the TGMD merge in sd-mecha 1.1.8 against mergekit-sdxl, same inputs, same run.

Inputs: ``bench_merge.py``'s synthetic SDXL checkpoints (its cached files and generator: exact
2515 keys, widths scaled, ``model_000`` the base), N files, base included.

sd-mecha runs in its own interpreter (``--mecha-python``: a separate venv, never the project's)::

    python3 -m venv /tmp/mecha-venv && /tmp/mecha-venv/bin/pip install torch==2.13.0 sd-mecha==1.1.8

with the AstolfoMix-XL recipe written the sd-mecha way (``sdxl-sgm`` model config)::

    deltas = [subtract(model_i, base) for the N - 1 models]
    merged = ties_sum_with_dropout(*deltas, probability=0.1, rescale=False, k=1.0, vote_sgn=False,
                                   apply_stock=False, apply_median=True, eps=1e-6, maxiter=100,
                                   ftol=1e-20, seed=240603)
    recipe = omit_component(add_difference(base, merged, alpha=1.0), "vae") | base
    merge(recipe, output=OUT, merge_dtype=float64, output_dtype=float16, threads=--mecha-threads)

(the VAE comes from the base, as in mergekit-sdxl; ``add_difference`` is sd-mecha's
``linear.add_difference`` method: its wrapper of the same name fails on this graph in 1.1.8).
mergekit-sdxl runs ``bench_merge.py``'s ``tgmd`` config (drop_rate 0.1, seed 240603, density 1,
float64, fp16 out) as ``mergekit-sdxl merge CONFIG OUT --memory-budget B``. Each is a child
process under ``/usr/bin/time -v`` (peak RSS: its own ``Maximum resident set size``; MB = 10^6
bytes); the inputs are read once beforehand so both find them in the page cache, and prehashed
into mergekit-sdxl's hash cache (no timed run hashes inputs).

Printed: wall s, peak RSS, sd-mecha's own merge time, and sd-mecha / mergekit-sdxl ratios (time and
memory; issue 11 asks for >= 10x faster with <= 1/5 of the memory at N = 32). A sanity line
compares the mean |merged - base| of the two outputs (different random DROP masks, so not equal,
but the same recipe gives the same magnitude to within a few percent).

Usage
    python bench/bench_mecha.py --n 32 --mecha-python /tmp/mecha-venv/bin/python
    python bench/bench_mecha.py --n 3 --mecha-python /tmp/mecha-venv/bin/python --workdir /tmp/mkbench   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_merge as bm  # noqa: E402 - the inputs, configs and child runner of bench_merge.py

MECHA_VERSION = "1.1.8"

MECHA_CHILD = r'''
import json, sys, time
from importlib.metadata import version
started = time.monotonic()
import torch
import sd_mecha
from sd_mecha.extensions.builtin.merge_methods import linear
out, threads, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
threads = None if threads == "default" else int(threads)
base = sd_mecha.model(paths[0], "sdxl-sgm")
deltas = [sd_mecha.subtract(sd_mecha.model(p, "sdxl-sgm"), base) for p in paths[1:]]
merged = sd_mecha.ties_sum_with_dropout(
    *deltas, probability=0.1, rescale=False, k=1.0, vote_sgn=False, apply_stock=False,
    apply_median=True, eps=1e-6, maxiter=100, ftol=1e-20, seed=240603,
)
recipe = sd_mecha.omit_component(linear.add_difference(base, merged, alpha=1.0), "vae") | base
imported = time.monotonic()
sd_mecha.merge(recipe, output=out, merge_dtype=torch.float64, output_dtype=torch.float16, threads=threads)
done = time.monotonic()
print("mecha " + json.dumps({"version": version("sd-mecha"), "torch": torch.__version__, "threads": threads,
                              "setup_s": imported - started, "merge_s": done - imported}))
'''

SANITY_CHILD = r'''
import json, sys
import torch
from safetensors import safe_open
base_path, outs = sys.argv[1], sys.argv[2:]
result = {}
with safe_open(base_path, "pt") as base:
    keys = [k for k in base.keys() if k.startswith("model.diffusion_model.")]
    for out in outs:
        total = count = 0.0
        with safe_open(out, "pt") as f:
            missing = [k for k in base.keys() if k not in set(f.keys())]
            for k in keys:
                d = f.get_tensor(k).double() - base.get_tensor(k).double()
                total += float(d.abs().sum()); count += d.numel()
        result[out] = {"mean_abs_delta": total / count, "missing_keys": len(missing)}
print(json.dumps(result))
'''


def warm_page_cache(paths: List[Path]) -> None:
    """Read every input once so neither tool pays for the first read from disk."""
    for path in paths:
        with open(path, "rb") as fh:
            while fh.read(64 * 1024**2):
                pass


def run_mecha(args: argparse.Namespace, paths: List[Path], out: Path, env: Dict[str, str]) -> Dict:
    script = args.workdir / "runs" / "mecha_tgmd.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(MECHA_CHILD, encoding="utf-8")
    bm._clean_output(out)
    argv = [args.mecha_python, str(script), str(out), str(args.mecha_threads or "default")] + [str(p) for p in paths]
    result = bm.run_child(argv, env, out.with_suffix(".log"))
    log = Path(result["log"]).read_text(encoding="utf-8")
    line = next((ln for ln in log.splitlines() if ln.startswith("mecha {")), None)
    result["mecha"] = json.loads(line[len("mecha "):]) if line else None
    result["out_bytes"] = out.stat().st_size if out.exists() else None
    return result


def sanity(base: Path, outs: List[Path]) -> Optional[Dict]:
    proc = subprocess.run([sys.executable, "-c", SANITY_CHILD, str(base)] + [str(o) for o in outs], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"# sanity check failed: {proc.stderr[-1000:]}")
        return None
    return json.loads(proc.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--n", type=int, default=32, help="input files, base included (default 32)")
    parser.add_argument("--width", type=bm.parse_width, default=1 / 16, help="width factor (default 1/16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base; model i uses seed+i")
    parser.add_argument("--noise", type=float, default=0.02, help="fine-tune noise scale (default 0.02)")
    parser.add_argument("--mecha-python", required=True, help="python of the venv that has sd-mecha 1.1.8")
    parser.add_argument("--mecha-threads", type=int, default=None, help="sd-mecha merge(threads=...); default: its own choice")
    parser.add_argument("--memory-budget", default="512MB", help="mergekit-sdxl --memory-budget (default 512MB)")
    parser.add_argument("--threads", type=int, default=None, help="mergekit-sdxl --threads (default: its own)")
    parser.add_argument("--tools", default="mergekit-sdxl,sd-mecha", help="which to run (default both)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergekit-sdxl-bench"), help="inputs, hash cache, outputs")
    parser.add_argument("--keep-output", action="store_true", help="keep the merged files")
    parser.add_argument("--json", default=None, help="also write the raw measurements here")
    args = parser.parse_args()
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if args.n < 2:
        parser.error("--n must be >= 2")
    args.workdir = args.workdir.resolve()

    command = "python bench/bench_mecha.py " + " ".join(sys.argv[1:])
    print(f"# command: {command}")
    print(f"# load average {os.getloadavg()}, nproc {os.cpu_count()}", flush=True)
    paths = bm.input_paths(args.workdir, args.n, args.width, args.seed, args.noise)
    bm.ensure_inputs(paths, args.width, args.seed, args.noise)
    env = bm.child_env(args.workdir)
    bm.prehash(paths, args.workdir / "hash-cache")
    warm_page_cache(paths)
    runs = args.workdir / "runs"
    tag = f"n{args.n}-w{bm.width_tag(args.width)}"
    results: Dict[str, Dict] = {}
    outs: Dict[str, Path] = {}
    if "mergekit-sdxl" in tools:
        config = bm.write_config("tgmd", paths, runs, tag)
        out = runs / f"{tag}-tgmd-vs-mecha.safetensors"
        print(f"# mergekit-sdxl tgmd, --memory-budget {args.memory_budget}: {config}", flush=True)
        results["mergekit-sdxl"] = bm.merge(config, out, args.memory_budget, args.threads, env, [])
        outs["mergekit-sdxl"] = out
    if "sd-mecha" in tools:
        out = runs / f"{tag}-mecha-tgmd.safetensors"
        print(f"# sd-mecha ties_sum_with_dropout (median) with {args.mecha_python}", flush=True)
        mecha_env = dict(env, TQDM_DISABLE="1")
        results["sd-mecha"] = run_mecha(args, paths, out, mecha_env)
        outs["sd-mecha"] = out
    for name, r in results.items():
        status = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']} (see {r['log']})"
        print(f"#   {name}: {status}, {r['wall']:.1f} s, peak RSS {r['peak'] / 1e6:.0f} MB", flush=True)
    ok = {name: r for name, r in results.items() if r["rc"] == 0}
    checked = sanity(paths[0], [outs[n] for n in ok]) if ok else None
    if not args.keep_output:
        for out in outs.values():
            bm._clean_output(out)

    total_in = sum(p.stat().st_size for p in paths)
    mecha = results.get("sd-mecha", {}).get("mecha") or {}
    ref = ok.get("mergekit-sdxl")
    print()
    print(f"inputs: {len(paths)} files (base + {len(paths) - 1}), width {bm.width_label(args.width)}, "
          f"{total_in / 1e9:.3f} GB; nproc {os.cpu_count()}; sd-mecha {mecha.get('version', '?')} "
          f"(torch {mecha.get('torch', '?')})")
    print()
    print("| tool | N | settings | wall s | merge s | peak RSS MB | time / mergekit-sdxl | memory / mergekit-sdxl | load 1m |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        if name == "mergekit-sdxl":
            settings = f"tgmd, float64, --memory-budget {args.memory_budget}, --threads {args.threads or 'default'}"
            merge_s = "-"
        else:
            settings = f"ties_sum_with_dropout median, float64, threads {mecha.get('threads') or 'default'}"
            merge_s = f"{mecha['merge_s']:.1f}" if mecha.get("merge_s") is not None else "-"
        good = r["rc"] == 0
        tx = f"{r['wall'] / ref['wall']:.2f}" if good and ref else "-"
        mx = f"{r['peak'] / ref['peak']:.2f}" if good and ref and ref["peak"] else "-"
        print(f"| {name} | {len(paths)} | {settings} | {r['wall']:.1f}{'' if good else ' (failed)'} | {merge_s} | "
              f"{r['peak'] / 1e6:.0f} | {tx} | {mx} | {r['load'][0]:.2f}->{r['load'][1]:.2f} |")
    if ref and "sd-mecha" in ok:
        m = ok["sd-mecha"]
        speed, memory = m["wall"] / ref["wall"], ref["peak"] / m["peak"] if m["peak"] else float("nan")
        print()
        print(f"mergekit-sdxl is {speed:.1f}x faster than sd-mecha with {memory:.2f}x its peak memory "
              f"(issue 11 target: >= 10x faster, <= 0.20x memory: {'met' if speed >= 10 and memory <= 0.2 else 'not met'})")
    if checked:
        parts = [f"{name} {checked[str(outs[name])]['mean_abs_delta']:.3e}" for name in ok if str(outs[name]) in checked]
        missing = {name: checked[str(outs[name])]["missing_keys"] for name in ok if str(outs[name]) in checked}
        print(f"sanity: mean |merged - base| over the UNet keys: {', '.join(parts)}; base keys missing from the output: {missing}")
    print()
    print(f"Command: `.venv/bin/{command}`")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "n": len(paths), "results": results, "sanity": checked}, indent=1))
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
