#!/usr/bin/env python
"""Micro-benchmark of the kernel layer over a size mix: merge_task_vectors (median / mean) and merge_geometric_median.

(This was ``bench/bench_kernels.py`` until issue 11; that name is now the one-key ns/el/model
benchmark against mergekit ``linear``. Same options and output as before.)

Workload (per N): a realistic SDXL-at-width-1/16 size mix, fp16 inputs, float64 compute, fp16 output,
``rows_per_chunk`` as the host computes it (``mergekit_sdxl.host.methods.rows_per_chunk`` formula,
default 256 MB chunk bound):

    200 x (320,)        biases / norms
    200 x (160, 128)    20k-element convs / linears
     20 x (640, 640)    400k-element projections
      1 x (2048, 2048)  4M-element tensor

Inputs cost O(numel + N) memory per tensor: model i (and the base) is a shifted window of one random
fp16 pool, so all N task vectors are distinct without N copies. Readers return views (no copies), so
the timing is the kernels' own.

Methods: ``tgmd`` (drop 0.1, identity vote, median), ``tsd`` (drop 0.1, identity vote, mean),
``geomedian`` (plain geometric median of the models). Prints, per (N, method), the median and min
over ``--repeats`` runs of the whole mix, and per-size-class medians.

Usage
    python bench/bench_kernel_mix.py                      # N = 5, 32, 117, 3 repeats
    python bench/bench_kernel_mix.py --n 5,32 --repeats 5 --scale 0.25
    python bench/bench_kernel_mix.py --json out.json      # also dump raw timings
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

_ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, _ROOT)
# The mergekit post-import hook (.pth) may already have imported mergekit_sdxl from the installed
# checkout; drop it so this tree's kernels are the ones timed (lets an old copy be benchmarked too).
for _name in [m for m in sys.modules if m == "mergekit_sdxl" or m.startswith("mergekit_sdxl.")]:
    del sys.modules[_name]

from mergekit_sdxl.kernels import TGMDParams, merge_geometric_median, merge_task_vectors, rows_cols  # noqa: E402

MIX = [("320", (320,), 200), ("20k", (160, 128), 200), ("400k", (640, 640), 20), ("4M", (2048, 2048), 1)]
CHUNK_BYTES = 256 * 1024**2
STRIDE = 997


def rows_per_chunk(shape, n_inputs, itemsize=8, chunk_bytes=CHUNK_BYTES):
    rows, cols = rows_cols(torch.Size(shape))
    return max(1, min(rows, chunk_bytes // (max(1, n_inputs) * cols * itemsize * 4)))


def make_inputs(shape, n, seed):
    numel = 1
    for s in shape:
        numel *= s
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(numel + (n + 1) * STRIDE, generator=g) * 0.02).to(torch.float16)
    rows, cols = rows_cols(shape)

    def reader(j):
        view = pool[j * STRIDE : j * STRIDE + numel].view(rows, cols)
        return lambda r0, r1: view[r0:r1]

    return reader(n), [reader(j) for j in range(n)]


def run_method(method, shape, n, base, models, keys, rpc):
    if method == "geomedian":
        return merge_geometric_median("t", shape, models, None, 1e-6, 100, 1e-20, torch.float64, rpc, torch.float16)
    params = TGMDParams(
        drop_rate=[0.1] * n, density=[1.0] * n, weight=[1.0] * n, sign_election="count",
        aggregate="median" if method == "tgmd" else "mean", seed=240603,
    )
    return merge_task_vectors("t", shape, base, models, keys, params, torch.float64, rpc, torch.float16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="5,32,117")
    ap.add_argument("--methods", default="tgmd,tsd,geomedian")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the tensor counts (at least 1 each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is); 1 matches --threads 1 merges")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ns = [int(x) for x in args.n.split(",")]
    methods = args.methods.split(",")
    mix = [(label, shape, max(1, round(count * args.scale))) for label, shape, count in MIX]
    import mergekit_sdxl

    print(f"kernels from {Path(mergekit_sdxl.__file__).parent}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, mix "
          + ", ".join(f"{c}x{label}" for label, _, c in mix) + f", repeats {args.repeats}", flush=True)
    raw = {}
    rows_out = []
    for n in ns:
        keys = [f"model_{i:03d}" for i in range(n)]
        inputs = {label: make_inputs(shape, n, 17 + i) for i, (label, shape, _) in enumerate(mix)}
        for method in methods:
            per_class = {label: [] for label, _, _ in mix}
            totals = []
            for _ in range(args.repeats):
                total = 0.0
                for label, shape, count in mix:
                    base, models = inputs[label]
                    rpc = rows_per_chunk(shape, n + 1)
                    t0 = time.perf_counter()
                    for _ in range(count):
                        run_method(method, shape, n, base, models, keys, rpc)
                    dt = time.perf_counter() - t0
                    per_class[label].append(dt / count)
                    total += dt
                totals.append(total)
            raw[f"{n}/{method}"] = {"totals": totals, "per_class": per_class}
            row = [n, method, statistics.median(totals), min(totals)] + [
                statistics.median(per_class[label]) * 1e3 for label, _, _ in mix
            ]
            rows_out.append(row)
            print(f"N={n:4d} {method:10s} total median {row[2]:8.2f} s  min {row[3]:8.2f} s  | per tensor ms: "
                  + "  ".join(f"{label} {v:9.2f}" for (label, _, _), v in zip(mix, row[4:], strict=True)), flush=True)
    print()
    head = "| N | method | total s (median) | total s (min) | " + " | ".join(f"{label} ms/tensor" for label, _, _ in mix) + " |"
    print(head)
    print("|" + "---|" * (4 + len(mix)))
    for r in rows_out:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | " + " | ".join(f"{v:.2f}" for v in r[4:]) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
