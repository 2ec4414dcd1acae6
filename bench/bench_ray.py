#!/usr/bin/env python
"""Benchmark (issue 15): one merge in one process vs. on a local Ray cluster of K workers.

Each run is ``mergekit-sdxl merge CONFIG OUT.safetensors [--ray-address local --ray-workers K]``
in a child process, one at a time, on the inputs and config of ``bench/bench_merge.py`` (synthetic
SDXL checkpoints, the tgmd reference recipe unless ``--method``), with the inputs' sha256
prehashed so no run pays for hashing. Every output has the same file name (it is in the
metadata), in a folder of its own, so equal sha256 means equal bytes.

Columns
    mode       single (no Ray; torch's default threads, or 1 thread as each Ray worker uses) or
               ray K (a local cluster of K worker processes, started by the run)
    wall s     wall time of the child: interpreter start, preflight, plan, Ray start-up, merge, write
    merge s    the child's own ``wrote ... (X s)``: ``run_sdxl_merge`` from start to the published file
    ray s      of those, the Ray part (``ray: connect ..., first result ..., merge ...``, logged by
               host/ray_merge.py): cluster start (connect) / first finished job (the workers' own
               start-up: each imports torch and mergekit) / all jobs written
    peak MB    the driver's peak RSS (``time -v``; the Ray workers are not its children's children
               under ``time``'s accounting, so their memory is not in it)
    x single   wall / wall of the single-process run
    same bytes sha256 equal to the single-process output
    load       1-minute load average before -> after (other jobs share the machine)

Usage
    python bench/bench_ray.py --n 4 --width 1/16 --workers 1,2
    python bench/bench_ray.py --n 8 --width 1/8 --workers 1,2,4 --memory-budget 1GB --workdir /big/disk
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_merge  # noqa: E402 - the inputs, configs and child runner of the merge benchmark

RAY_LINE = re.compile(r"ray: connect ([0-9.]+) s, first result ([0-9.]+) s, merge ([0-9.]+) s")


def merge(config: Path, out: Path, budget: str, env: Dict[str, str], extra: List[str]) -> Dict:
    """One ``mergekit-sdxl -v merge ... -v`` (info logging: the Ray timings) in a child."""
    bench_merge._clean_output(out)
    argv = [bench_merge._mergekit_sdxl(), "-v", "merge", str(config), str(out), "--quiet", "-v"]
    argv += ["--memory-budget", budget, *extra]
    result = bench_merge.run_child(argv, env, out.with_suffix(".log"))
    log = Path(result["log"]).read_text(encoding="utf-8")
    merged = re.search(r"^wrote .*, ([0-9.]+) s\)$", log, re.M)
    ray = RAY_LINE.search(log)
    result.update(
        merge_s=float(merged.group(1)) if merged else None,
        ray_s=tuple(float(x) for x in ray.groups()) if ray else None,
    )
    return result


def run_modes(args: argparse.Namespace, config: Path, runs: Path, env: Dict[str, str]) -> List[Dict]:
    # One thread: what each Ray worker computes with (a worker reserves one CPU per --threads).
    modes = [("single", []), ("single 1 thread", ["--threads", "1"])] + [
        (f"ray {k}", ["--ray-address", "local", "--ray-workers", str(k)]) for k in args.workers
    ]
    rows = []
    for label, extra in modes:
        folder = runs / label.replace(" ", "-")
        folder.mkdir(parents=True, exist_ok=True)
        result = merge(config, folder / "merged.safetensors", args.memory_budget, env, extra)
        result.update(mode=label)
        rows.append(result)
        status = "ok" if result["rc"] == 0 else f"rc {result['rc']} (log {result['log']})"
        print(f"# {label}: {result['wall']:.1f} s, {status}", flush=True)
    return rows


def print_rows(rows: List[Dict], args: argparse.Namespace, n_inputs_gb: float) -> None:
    single = rows[0]
    print()
    print(
        f"N = {args.n}, width {args.width_text}, {args.method}, --memory-budget {args.memory_budget} "
        f"(per worker), {n_inputs_gb:.2f} GB of inputs, {os.cpu_count()} cores"
    )
    print()
    print("| mode | wall s | merge s | ray s: connect / first result / all | peak MB | x single | same bytes | load |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        same = "yes" if row["sha256"] and row["sha256"] == single["sha256"] else "NO"
        merge_s = f"{row['merge_s']:.1f}" if row["merge_s"] is not None else "-"
        ray_s = " / ".join(f"{x:.1f}" for x in row["ray_s"]) if row["ray_s"] else "-"
        ratio = row["wall"] / single["wall"] if single["wall"] else 0.0
        load = f"{row['load'][0]:.1f} -> {row['load'][1]:.1f}"
        print(
            f"| {row['mode']} | {row['wall']:.1f} | {merge_s} | {ray_s} | {row['peak'] / 1e6:.0f} | {ratio:.2f} "
            f"| {same} | {load} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--n", type=int, default=4, help="inputs, base included (default 4)")
    parser.add_argument("--width", default="1/16", help="width scale of the synthetic inputs (default 1/16)")
    parser.add_argument("--method", default="tgmd", choices=bench_merge.METHODS)
    parser.add_argument("--workers", default="1,2", help="worker counts of the Ray runs (default 1,2)")
    parser.add_argument("--memory-budget", default="256MB", help="per process / per worker (default 256MB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.02)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergekit-sdxl-bench-ray"))
    args = parser.parse_args()
    args.width_text = args.width
    width = bench_merge.parse_width(args.width)
    args.workers = [int(k) for k in args.workers.split(",") if k]
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit("Ray is not installed: pip install 'mergekit-sdxl[ray]'") from None

    paths = bench_merge.input_paths(args.workdir, args.n, width, args.seed, args.noise)
    bench_merge.ensure_inputs(paths, width, args.seed, args.noise)
    env = bench_merge.child_env(args.workdir)
    bench_merge.prehash(paths, Path(env["MERGEKIT_SDXL_CACHE_DIR"]))
    runs = args.workdir / "runs-ray"
    tag = f"n{args.n}_w{bench_merge.width_tag(width)}"
    config = bench_merge.write_config(args.method, paths, runs, tag)
    rows = run_modes(args, config, runs / tag, env)
    print_rows(rows, args, sum(p.stat().st_size for p in paths) / 1e9)
    return 0 if all(r["rc"] == 0 and r["sha256"] == rows[0]["sha256"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
