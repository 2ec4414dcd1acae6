#!/usr/bin/env python
"""Kernel cost of TGMD per element and model, against mergekit's own ``linear`` on the same tensors.

One key (default ``[1024, 2560]``) held in memory as fp16 (no I/O), N inputs = the base and
N - 1 fine-tunes (``base + noise * randn``, like ``bench_merge.py``'s files). For every
(N, compute dtype, thread count) it times, interleaved, in the same process:

    linear   mergekit's ``linear`` through its Python API (``mergekit.merge_methods.merge_tensors``,
             which builds a ``TensorGroup`` and calls the registry's method the way mergekit does):
             all N tensors, weight 1, normalize, ``dtype`` = the compute dtype, fp16 out
    torch    ``mergekit_sdxl.kernels.tgmd.merge_task_vectors(..., kernel="torch")``: the reference
             torch path (today's code when the function has no ``kernel`` parameter)
    fused    the same with ``kernel="fused"`` (the numba CPU kernel; skipped, with a note, when the
             function has no ``kernel`` parameter or the kernel is not available)
    api      ``merge_tensors(..., "tgmd")``: the plugin's method through mergekit's API with the
             default kernel (``MERGEKIT_SDXL_KERNEL`` decides, default auto)

TGMD is the AstolfoMix-XL recipe: drop_rate 0.1, density 1, rescale 0, count vote, geometric
median, seed 240603; ``rows_per_chunk`` as the API computes it (256 MB chunk bound). Threads: torch
(``torch.set_num_threads``) and numba (``numba.set_num_threads``) get the same count; ``all`` is
the number of usable cores.

Columns: median (and min) wall time per call over ``--repeats``; ns per element per model =
time / (numel x N), both passes, N counting the base (the reference job's 117 inputs); x linear =
over ``linear`` at the same N, compute dtype and threads; x linear f32 = over ``linear`` in float32
(what ``bench_merge.py``'s linear config uses); "= torch": the fp16 output is byte-identical
(``torch.equal``) to the torch path's of the same row. A line after the table says whether every
kernel's bytes are independent of the thread count. Then the reference job (117 inputs x 2.57e9
merged elements) extrapolated from the N = 117 rows (the largest N measured if 117 is not): one
core (threads 1) and this machine (all threads), next to the time to read its inputs once.

Usage
    python bench/bench_kernels.py                                  # N = 8,32,117, f32+f64, threads 1,all
    python bench/bench_kernels.py --n 117 --dtypes float64 --threads 1 --kernels torch,fused
    python bench/bench_kernels.py --n 8 --shape 64,256 --repeats 1  # a smoke test (seconds)
    python bench/bench_kernels.py --json out.json                  # also dump raw timings

The size-mix benchmark that had this file's name before issue 11 is ``bench/bench_kernel_mix.py``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))
# No purge of an already imported mergekit_sdxl (bench_kernel_mix.py does one): its post-import hook
# must stay the one loaded at start-up, or importing mergekit re-enters it. The header line says
# which checkout was timed.

from mergekit_sdxl.kernels.memory_plan import MemoryPlan  # noqa: E402
from mergekit_sdxl.kernels.tgmd import TGMDParams, merge_task_vectors, rows_cols, tensor_reader  # noqa: E402

SEED = 240603
DROP_RATE = 0.1
KERNELS = ("torch", "fused", "api")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TENSOR_NAME = "model.diffusion_model.bench.weight"
# The reference job of issue 11: 117 inputs x 2.57e9 merged elements (full-width SDXL).
REFERENCE_INPUTS = 117
REFERENCE_ELEMENTS = 2.57e9


# ----------------------------------------------------------------------------- environment


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def numba_module() -> Optional[Any]:
    try:
        import numba
    except Exception:  # noqa: BLE001 - absent or broken: the fused kernel cannot run either
        return None
    return numba


def set_threads(count: int) -> None:
    """The same thread count for torch's intra-op pool and numba's parallel loops."""
    torch.set_num_threads(count)
    nb = numba_module()
    if nb is not None:
        nb.set_num_threads(min(count, nb.config.NUMBA_NUM_THREADS))


def has_kernel_switch() -> bool:
    return "kernel" in inspect.signature(merge_task_vectors).parameters


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "-C", str(_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(_ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return head.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------- inputs


def make_inputs(shape: Tuple[int, ...], n: int, noise: float, seed: int = 0) -> List[torch.Tensor]:
    """N distinct fp16 tensors: a base ~ N(0, 1/fan_in) and N - 1 fine-tunes ``base + noise * randn``."""
    g = torch.Generator().manual_seed(seed)
    fan_in = max(1, rows_cols(shape)[1])
    base = torch.randn(shape, generator=g) * fan_in**-0.5
    out = [base.to(torch.float16)]
    for _ in range(n - 1):
        out.append((base + noise * torch.randn(shape, generator=g)).to(torch.float16))
    return out


def ids_for(n: int) -> List[str]:
    return ["base"] + [f"model_{i:03d}" for i in range(1, n)]


# ----------------------------------------------------------------------------- the timed calls


def linear_call(tensors: Sequence[torch.Tensor], compute: torch.dtype) -> torch.Tensor:
    from mergekit.merge_methods import merge_tensors

    return merge_tensors(
        list(tensors), "linear", parameters={"weight": 1.0, "normalize": True}, dtype=compute, out_dtype=torch.float16
    )


def api_call(tensors: Sequence[torch.Tensor], compute: torch.dtype) -> torch.Tensor:
    from mergekit.merge_methods import merge_tensors

    return merge_tensors(
        list(tensors),
        "tgmd",
        base_index=0,
        ids=ids_for(len(tensors)),
        name=TENSOR_NAME,
        parameters={"drop_rate": DROP_RATE, "density": 1.0, "rescale": 0.0, "seed": SEED},
        dtype=compute,
        out_dtype=torch.float16,
    )


def kernel_call(tensors: Sequence[torch.Tensor], compute: torch.dtype, kernel: str, rows_per_chunk: int) -> torch.Tensor:
    base, models = tensors[0], tensors[1:]
    m = len(models)
    params = TGMDParams(drop_rate=[DROP_RATE] * m, density=[1.0] * m, weight=[1.0] * m, seed=SEED)
    rpc = rows_per_chunk or MemoryPlan().rows_per_chunk(base.shape, len(tensors), compute)
    extra = {"kernel": kernel} if has_kernel_switch() else {}
    return merge_task_vectors(
        TENSOR_NAME,
        base.shape,
        tensor_reader(base),
        [tensor_reader(t) for t in models],
        ids_for(len(tensors))[1:],
        params,
        compute,
        rpc,
        torch.float16,
        **extra,
    )


def callables(kernels: Sequence[str], rows_per_chunk: int) -> Tuple[Dict[str, Callable[..., torch.Tensor]], List[str]]:
    """The variants to time (``linear`` first) and notes on the kernels that cannot run here."""
    calls: Dict[str, Callable[..., torch.Tensor]] = {"linear": linear_call}
    notes: List[str] = []
    switch = has_kernel_switch()
    for k in kernels:
        if k == "api":
            calls["api"] = api_call
        elif k == "torch":
            calls["torch"] = lambda ts, c: kernel_call(ts, c, "torch", rows_per_chunk)
            if not switch:
                notes.append("merge_task_vectors has no kernel= parameter: 'torch' is the current code path")
        elif k == "fused":
            if not switch:
                notes.append("fused: skipped (merge_task_vectors has no kernel= parameter yet)")
                continue
            probe = make_inputs((2, 8), 3, 0.02)
            try:
                kernel_call(probe, torch.float64, "fused", rows_per_chunk)
            except Exception as exc:  # noqa: BLE001 - report why, time the rest
                notes.append(f"fused: skipped ({type(exc).__name__}: {exc})")
                continue
            calls["fused"] = lambda ts, c: kernel_call(ts, c, "fused", rows_per_chunk)
    return calls, notes


def timed(fn: Callable[..., torch.Tensor], *args: Any) -> Tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


# ----------------------------------------------------------------------------- the run


def measure(args: argparse.Namespace) -> Tuple[List[Dict[str, Any]], Dict[str, bool], List[str]]:
    calls, notes = callables(args.kernels, args.rows_per_chunk)
    rows: List[Dict[str, Any]] = []
    thread_equal: Dict[str, bool] = {}
    for n in args.n:
        tensors = make_inputs(args.shape, n, args.noise)
        numel = tensors[0].numel()
        for dname in args.dtypes:
            compute = DTYPES[dname]
            # Warm-up on a few rows (numba compiles per dtype; first calls fault in allocator pages).
            small = [t[: min(8, t.shape[0])] for t in tensors]
            for fn in calls.values():
                fn(small, compute)
            first_out: Dict[str, torch.Tensor] = {}
            for threads in args.threads:
                set_threads(threads)
                times: Dict[str, List[float]] = {k: [] for k in calls}
                outs: Dict[str, torch.Tensor] = {}
                for _ in range(args.repeats):
                    for label, fn in calls.items():  # interleaved: load drifts hit every variant alike
                        dt, out = timed(fn, tensors, compute)
                        times[label].append(dt)
                        outs[label] = out
                lin = statistics.median(times["linear"])
                for label in calls:
                    med = statistics.median(times[label])
                    same = None if label in ("linear", "torch") or "torch" not in outs else torch.equal(outs[label], outs["torch"])
                    if label != "linear":
                        if label in first_out:
                            thread_equal[label] = thread_equal.get(label, True) and torch.equal(first_out[label], outs[label])
                        else:
                            first_out[label] = outs[label]
                    row = {
                        "n": n, "dtype": dname, "threads": threads, "kernel": label, "shape": list(args.shape),
                        "median_s": med, "min_s": min(times[label]), "times": times[label],
                        "ns_el_model": med / (numel * n) * 1e9, "x_linear": med / lin, "equal_torch": same,
                    }
                    rows.append(row)
                    print(f"# N={n} {dname} threads={threads} {label:6s} {med * 1e3:9.1f} ms  "
                          f"{row['ns_el_model']:7.2f} ns/el/model  x linear {row['x_linear']:5.2f}"
                          + ("" if same is None else f"  = torch: {'yes' if same else 'NO'}"), flush=True)
                del outs
        del tensors
    return rows, thread_equal, notes


def thread_label(threads: int, all_cores: int) -> str:
    return f"{threads} (all)" if threads == all_cores and threads != 1 else str(threads)


def print_table(rows: List[Dict[str, Any]], all_cores: int) -> None:
    lin32 = {(r["n"], r["threads"]): r["median_s"] for r in rows if r["kernel"] == "linear" and r["dtype"] == "float32"}
    print("| N | compute | threads | kernel | ms/call (median) | ms (min) | ns/el/model | x linear | x linear f32 | = torch (fp16 bytes) |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        name = "mergekit linear" if r["kernel"] == "linear" else f"tgmd {r['kernel']}"
        same = "-" if r["equal_torch"] is None else ("yes" if r["equal_torch"] else "**NO**")
        l32 = lin32.get((r["n"], r["threads"]))
        x32 = f"{r['median_s'] / l32:.2f}" if l32 else "-"
        print(f"| {r['n']} | {r['dtype']} | {thread_label(r['threads'], all_cores)} | {name} | {r['median_s'] * 1e3:.1f} | "
              f"{r['min_s'] * 1e3:.1f} | {r['ns_el_model']:.2f} | {r['x_linear']:.2f} | {x32} | {same} |")


def print_extrapolation(rows: List[Dict[str, Any]], disk_gbps: float, all_cores: int) -> None:
    ns = sorted({r["n"] for r in rows})
    n = REFERENCE_INPUTS if REFERENCE_INPUTS in ns else ns[-1]
    per_ns = REFERENCE_INPUTS * REFERENCE_ELEMENTS * 1e-9  # seconds of the job per ns/el/model
    io_s = REFERENCE_INPUTS * REFERENCE_ELEMENTS * 2 / (disk_gbps * 1e9)
    threads = sorted({r["threads"] for r in rows})
    print()
    print(f"Reference job: {REFERENCE_INPUTS} inputs x {REFERENCE_ELEMENTS:.3g} merged elements, from the N = {n} rows "
          f"(1 ns/el/model = {per_ns:.0f} s); reading its {REFERENCE_INPUTS * REFERENCE_ELEMENTS * 2 / 1e9:.0f} GB of fp16 "
          f"inputs once at {disk_gbps:g} GB/s: {io_s:.0f} s.")
    print()
    heads = []
    for t in threads:
        where = "one core" if t == 1 else ("this machine" if t == all_cores else "")
        heads += [f"ns/el/model, {t} thread{'s' if t > 1 else ''}", f"job, {t} thread{'s' if t > 1 else ''}" + (f" ({where})" if where else "")]
    print("| kernel | compute | " + " | ".join(heads) + " |")
    print("|---|---|" + "---:|" * len(heads))
    for dname in sorted({r["dtype"] for r in rows}):
        for kernel in dict.fromkeys(r["kernel"] for r in rows):
            sel = {r["threads"]: r for r in rows if r["n"] == n and r["dtype"] == dname and r["kernel"] == kernel}
            if not sel:
                continue
            name = "mergekit linear" if kernel == "linear" else f"tgmd {kernel}"
            cells = []
            for t in threads:
                r = sel.get(t)
                cells += ["-", "-"] if r is None else [f"{r['ns_el_model']:.2f}", human(r["ns_el_model"] * per_ns)]
            print(f"| {name} | {dname} | " + " | ".join(cells) + " |")


def human(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def parse_threads(text: str) -> List[int]:
    out = []
    for item in text.split(","):
        item = item.strip()
        out.append(cores() if item == "all" else int(item))
    return list(dict.fromkeys(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--n", default="8,32,117", help="input counts, base included (default 8,32,117)")
    ap.add_argument("--dtypes", default="float32,float64", help="compute dtypes (default float32,float64)")
    ap.add_argument("--threads", default="1,all", help="thread counts, 'all' = usable cores (default 1,all)")
    ap.add_argument("--kernels", default=",".join(KERNELS), help="tgmd variants: torch, fused, api (linear always runs)")
    ap.add_argument("--shape", default="1024,2560", help="the key's shape (default 1024,2560)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per variant and row; the median is reported")
    ap.add_argument("--rows-per-chunk", type=int, default=0, help="0: as the API computes it (256 MB chunk bound)")
    ap.add_argument("--noise", type=float, default=0.02, help="fine-tune noise scale (default 0.02, like bench_merge.py)")
    ap.add_argument("--disk-gbps", type=float, default=3.0, help="read speed for the job's I/O floor (default 3 GB/s)")
    ap.add_argument("--json", default=None, help="also write the raw timings here")
    args = ap.parse_args()
    args.n = [int(x) for x in args.n.split(",")]
    args.dtypes = [d.strip() for d in args.dtypes.split(",")]
    args.threads = parse_threads(args.threads)
    args.kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    args.shape = tuple(int(x) for x in args.shape.split(","))
    for d in args.dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d}")
    for k in args.kernels:
        if k not in KERNELS:
            ap.error(f"unknown kernel {k}")
    if min(args.n) < 2:
        ap.error("--n must be >= 2 (the base and at least one model)")

    import mergekit_sdxl

    all_cores = cores()
    nb = numba_module()
    command = "python bench/bench_kernels.py " + " ".join(sys.argv[1:])
    print(f"# command: {command.strip()}")
    print(f"# code {git_describe()} from {Path(mergekit_sdxl.__file__).parent}; torch {torch.__version__}, "
          f"numba {nb.__version__ if nb else 'absent'}; {all_cores} cores; load {os.getloadavg()[0]:.2f}; "
          f"MERGEKIT_SDXL_KERNEL={os.environ.get('MERGEKIT_SDXL_KERNEL', '(unset)')}", flush=True)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    rows, thread_equal, notes = measure(args)
    print()
    print(f"key {list(args.shape)} fp16 in memory, N inputs (base included); tgmd drop_rate {DROP_RATE}, seed {SEED}; "
          f"{args.repeats} repeats; load 1m {load_before:.2f}->{os.getloadavg()[0]:.2f}; {time.monotonic() - started:.0f} s")
    for note in notes:
        print(f"note: {note}")
    print()
    print_table(rows, all_cores)
    if len(args.threads) > 1:
        print()
        print("fp16 output independent of the thread count: " + (", ".join(
            f"{k} {'yes' if ok else '**NO**'}" for k, ok in thread_equal.items()) or "-"))
    print_extrapolation(rows, args.disk_gbps, all_cores)
    print()
    print(f"Command: `.venv/bin/{command.strip()}`")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "rows": rows, "thread_equal": thread_equal, "notes": notes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
