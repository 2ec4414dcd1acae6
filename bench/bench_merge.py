#!/usr/bin/env python
"""Benchmark: merge N synthetic SDXL checkpoints with tgmd, ties_soup, linear and dare_ties.

Every method goes through the same I/O: ``mergekit-sdxl merge CONFIG OUT.safetensors``, run as a
child process (one at a time) under ``/usr/bin/time -v`` (psutil polling of VmHWM when that is
missing), so the peak RSS is the child's own.

Inputs
    N synthetic checkpoints with the exact 2515 SDXL keys, shapes scaled by ``--width`` (token
    embeddings keep their 49408 rows): ``model_000`` is the base (``seed``), ``model_i`` for i >= 1
    is ``base + noise * randn`` (seed ``seed + i``), written by
    ``mergekit_sdxl.sdxl.tiny.write_synthetic_sdxl``. Files are cached in
    ``WORKDIR/inputs/w<width>_s<seed>_n<noise>/model_XXX.safetensors``: file i depends only on
    (width, seed, i), so a run with N = 16 reuses the first 16 files of an N = 117 run and vice
    versa. Their sha256 is computed once, up front, into the mergekit-sdxl hash cache
    (``MERGEKIT_SDXL_CACHE_DIR=WORKDIR/hash-cache``) so no timed merge pays for hashing inputs.

Configs (mapping form, ``{model: {path: ...}}``), written to ``WORKDIR/runs/``
    tgmd       base = model_000, the N-1 others; drop_rate 0.1, seed 240603, density 1,
               dtype float64, out_dtype float16 (the AstolfoMix-XL reference recipe)
    ties_soup  same inputs; dtype float64 (TIES sign election + disjoint mean, no DROP)
    linear     mergekit's built-in linear over all N files, weight 1 each, no base, float32
    dare_ties  mergekit's built-in dare_ties, base = model_000, density 0.9 (= drop 0.1), weight 1,
               float32
    (only when named in --methods) ties, dare_linear, breadcrumbs_ties, della, sce, model_stock,
               task_arithmetic: mergekit's built-ins, base = model_000, float32 (``builtin_config``);
               under a budget they merge in row chunks with a statistics pre-pass (issue 12)

Measured per run
    wall s        wall time of the child (includes interpreter start, preflight, planning, writing)
    peak RSS MB   maximum resident set size of the child (``time -v``; MB = 10^6 bytes)
    GB read       the child's own ``read X GB from the inputs`` line (bytes read by the loaders)
    read/input    bytes read / sum of the input file sizes
    x linear      wall time / wall time of ``linear`` in the same invocation
    load          1-minute load average before -> after the run (other jobs share the machine)

Usage
    python bench/bench_merge.py --n 16 --width 1/16 --memory-budget 1GB
    python bench/bench_merge.py --n 117 --methods tgmd,linear --memory-budget 1GB --keep-going
    python bench/bench_merge.py --n 16 --compare-budgets 64MB,inmem
    python bench/bench_merge.py --n 3 --width 1 --methods tgmd,linear --workdir /tmp/bench-full

``--compare-budgets A,B`` merges the same tgmd config with ``--memory-budget A`` and
``--memory-budget B`` and compares the two outputs' sha256 (``inmem`` = a budget large enough for
every tensor's N inputs plus 3 float64 copies to be merged whole, in memory).
``--trace-reads`` additionally reruns tgmd in a child that records every byte range the loaders
read, and prints the largest number of times any single input byte was read.

``--time-split`` (issue 11) times the phases of each merge: start-up, preflight, plan, hash,
merge, write, finish, exit. Each method then runs with an empty hash cache of its own (its inputs
are hashed inside the timed run, as in a user's first merge; no prehash), with ``-v`` (INFO logs
kept in the run's ``.log``), in a child that wraps the driver's steps with timers
(``mergekit_sdxl.host.driver``: ``run_sdxl_merge``, ``_preflight``, ``check_contents``,
``plan_merge``, ``input_info``, ``stream_merge``; ``HashCache.sha256``;
``BackgroundHasher.sha256`` / ``wait_all``; ``StreamingCheckpointWriter.write`` / ``close``; a name the
driver no longer has is skipped). Hashing on the main thread, or waiting there for the background
hashes, counts as ``hash``; hashing on other threads is shown apart (overlapped). When the merge
itself logs phase lines (``INFO ...: phase NAME: SECONDS s``), a second table shows those. E.g.
base + 3 models at full width (27.8 GB of inputs; ~35 GB free disk needed)::

    python bench/bench_merge.py --n 4 --width 1 --methods tgmd,linear --time-split --workdir /big/disk
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("tgmd", "ties_soup", "linear", "dare_ties")
# More of mergekit's built-ins (issue 12: merged in chunks under the budget), run only when named in --methods.
BUILTINS = ("ties", "dare_linear", "breadcrumbs_ties", "della", "sce", "model_stock", "task_arithmetic")
REFERENCE_SEED = 240603


# ----------------------------------------------------------------------------- inputs


def parse_width(text: str) -> float:
    return float(Fraction(text))


def width_tag(width: float) -> str:
    frac = Fraction(width).limit_denominator(1024)
    return f"{frac.numerator}-{frac.denominator}" if frac.denominator != 1 else str(frac.numerator)


def input_paths(workdir: Path, n: int, width: float, seed: int, noise: float) -> List[Path]:
    folder = workdir / "inputs" / f"w{width_tag(width)}_s{seed}_n{noise:g}"
    return [folder / f"model_{i:03d}.safetensors" for i in range(n)]


def ensure_inputs(paths: List[Path], width: float, seed: int, noise: float) -> None:
    from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl

    paths[0].parent.mkdir(parents=True, exist_ok=True)
    missing = [(i, p) for i, p in enumerate(paths) if not p.exists()]
    if not missing:
        return
    print(f"# writing {len(missing)} synthetic checkpoints (width {width:g}) into {paths[0].parent}", flush=True)
    started = time.monotonic()
    for i, path in missing:
        tmp = path.with_suffix(".tmp")
        if i == 0:
            write_synthetic_sdxl(tmp, width=width, seed=seed)
        else:
            if not paths[0].exists():
                raise SystemExit("base model missing")
            write_synthetic_sdxl(tmp, width=width, seed=seed + i, base=paths[0], noise=noise)
        os.replace(tmp, path)
        if len(missing) > 4 and (i % 10 == 0 or width >= 0.5):
            print(f"#   {path.name} ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"# inputs written in {time.monotonic() - started:.1f} s", flush=True)


def prehash(paths: List[Path], cache_dir: Path) -> None:
    """Fill the hash cache the child uses, so the timed merges do not hash their inputs."""
    from mergekit_sdxl.io.hashing import HashCache

    cache = HashCache(cache_dir)
    started = time.monotonic()
    for path in paths:
        cache.sha256(str(path))
    took = time.monotonic() - started
    if took > 1:
        print(f"# hashed {len(paths)} inputs into {cache_dir} in {took:.1f} s", flush=True)


# ----------------------------------------------------------------------------- configs


def _model(path: Path) -> Dict:
    return {"model": {"path": str(path)}}


def make_config(method: str, paths: List[Path]) -> Dict:
    base, others = paths[0], paths[1:]
    if method in ("tgmd", "ties_soup"):
        params = {"seed": REFERENCE_SEED, "density": 1.0}
        if method == "tgmd":
            params.update({"drop_rate": 0.1, "rescale": 0.0, "sign_election": "count", "aggregate": "median"})
        return {
            "merge_method": method,
            "base_model": _model(base),
            "models": [{"model": _model(p)} for p in others],
            "parameters": params,
            "dtype": "float64",
            "out_dtype": "float16",
        }
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [{"model": _model(p), "parameters": {"weight": 1.0}} for p in paths],
            "parameters": {"normalize": True},
            "dtype": "float32",
            "out_dtype": "float16",
        }
    if method == "dare_ties":
        return {
            "merge_method": "dare_ties",
            "base_model": _model(base),
            "models": [{"model": _model(p), "parameters": {"density": 0.9, "weight": 1.0}} for p in others],
            "parameters": {"normalize": True},
            "dtype": "float32",
            "out_dtype": "float16",
        }
    if method in BUILTINS:
        return builtin_config(method, base, others)
    raise SystemExit(f"unknown method {method}")


def builtin_config(method: str, base: Path, others: List[Path]) -> Dict:
    """One of :data:`BUILTINS`: base = model_000, the N-1 others, weight 1, float32, fp16 out."""
    per_model: Dict = {"weight": 1.0}
    shared: Dict = {}
    if method in ("ties", "breadcrumbs_ties"):
        per_model["density"] = 0.5
    elif method == "dare_linear":
        per_model["density"] = 0.9
    elif method == "della":
        per_model.update({"density": 0.9, "epsilon": 0.05})
    elif method == "sce":
        per_model, shared = {}, {"select_topk": 0.5}
    elif method == "model_stock":
        per_model = {}
    elif method == "task_arithmetic":
        per_model["weight"] = 1.0 / max(1, len(others))
    return {
        "merge_method": method,
        "base_model": _model(base),
        "models": [{"model": _model(p), **({"parameters": per_model} if per_model else {})} for p in others],
        "parameters": shared,
        "dtype": "float32",
        "out_dtype": "float16",
    }


def write_config(method: str, paths: List[Path], folder: Path, tag: str) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tag}-{method}.yaml"
    path.write_text(yaml.safe_dump(make_config(method, paths), sort_keys=False), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- running


def _mergekit_sdxl() -> str:
    exe = Path(sys.executable).parent / "mergekit-sdxl"
    return str(exe) if exe.exists() else (shutil.which("mergekit-sdxl") or "mergekit-sdxl")


def _poll_hwm(pid: int, stop: threading.Event, out: List[int]) -> None:
    import psutil

    peak = 0
    try:
        proc = psutil.Process(pid)
        while not stop.is_set():
            for p in [proc] + proc.children(recursive=True):
                try:
                    with open(f"/proc/{p.pid}/status") as fh:
                        for line in fh:
                            if line.startswith("VmHWM:"):
                                peak = max(peak, int(line.split()[1]) * 1024)
                except OSError:
                    pass
            stop.wait(0.05)
    except Exception:  # noqa: BLE001 - process gone
        pass
    out.append(peak)


def run_child(argv: List[str], env: Dict[str, str], log: Path) -> Dict:
    """Run one child; returns rc, wall, peak_rss (bytes), stdout text."""
    timer = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    if timer:
        proc = subprocess.run([timer, "-v"] + argv, env=env, capture_output=True, text=True)
        wall = time.monotonic() - started
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        peak = int(match.group(1)) * 1024 if match else 0
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    else:
        child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stop, box = threading.Event(), []
        poller = threading.Thread(target=_poll_hwm, args=(child.pid, stop, box), daemon=True)
        poller.start()
        stdout, stderr = child.communicate()
        wall = time.monotonic() - started
        stop.set()
        poller.join()
        peak, rc = (box[0] if box else 0), child.returncode
    log.write_text(f"$ {' '.join(argv)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", encoding="utf-8")
    read = re.search(r"read ([0-9.]+) GB from the inputs", stdout)
    sha = re.search(r"^sha256 ([0-9a-f]{64})", stdout, re.M)
    return {
        "rc": rc,
        "wall": wall,
        "peak": peak,
        "read_gb": float(read.group(1)) if read else None,
        "sha256": sha.group(1) if sha else None,
        "load": (load_before, os.getloadavg()[0]),
        "log": str(log),
    }


def merge(config: Path, out: Path, budget: Optional[str], threads: Optional[int], env: Dict[str, str], extra: List[str]) -> Dict:
    _clean_output(out)
    argv = [_mergekit_sdxl(), "merge", str(config), str(out), "--quiet"]
    if budget:
        argv += ["--memory-budget", budget]
    if threads:
        argv += ["--threads", str(threads)]
    argv += extra
    result = run_child(argv, env, out.with_suffix(".log"))
    result["out_bytes"] = out.stat().st_size if out.exists() else None
    return result


def _clean_output(out: Path) -> None:
    """Remove a previous output and anything the writer left next to it (journal, sidecars)."""
    if not out.parent.exists():
        return
    for p in out.parent.iterdir():
        # OUT.safetensors, OUT.safetensors.partial(.journal), OUT.safetensors.json, OUT.md
        if p.name.startswith(out.name) or p.name == out.stem + ".md":
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()


def child_env(workdir: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["MERGEKIT_SDXL_CACHE_DIR"] = str(workdir / "hash-cache")
    env.setdefault("TQDM_DISABLE", "1")
    return env


def inmem_budget(paths: List[Path]) -> int:
    """A budget under which every tensor's N inputs (+3 float64 copies) fit: merged whole, in memory."""
    from mergekit_sdxl.host.checkpoint import checkpoint_index

    index = checkpoint_index(str(paths[0]))
    largest = 0
    for shape in index.shapes.values():
        numel = 1
        for d in shape:
            numel *= d
        largest = max(largest, numel)
    need = largest * 8 * (len(paths) + 3)
    return max(2 * need, 1024**3)


def fmt_bytes_budget(value: int) -> str:
    return f"{-(-value // 1024**2)}MB"


# ----------------------------------------------------------------------------- modes


def benchmark(args, paths: List[Path], env: Dict[str, str]) -> int:
    total_in = sum(p.stat().st_size for p in paths)
    runs = args.workdir / "runs"
    tag = f"n{args.n}-w{width_tag(args.width)}"
    rows = []
    failed = False
    for method in args.methods:
        config = write_config(method, paths, runs, tag)
        out = runs / f"{tag}-{method}.safetensors"
        print(f"# {method}: {config}", flush=True)
        if args.time_split:
            cache = args.workdir / "hash-cache-split" / f"{tag}-{method}"
            r = merge_split(config, out, args.memory_budget, args.threads, env, args.extra, cache)
        else:
            r = merge(config, out, args.memory_budget, args.threads, env, args.extra)
        r["method"] = method
        rows.append(r)
        status = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']} (see {r['log']})"
        print(f"#   {status}: {r['wall']:.1f} s, peak RSS {r['peak'] / 1e6:.0f} MB, load {r['load'][0]:.2f}->{r['load'][1]:.2f}", flush=True)
        if not args.keep_output:
            _clean_output(out)
        if r["rc"] != 0:
            failed = True
            if not args.keep_going:
                break
    linear = next((r for r in rows if r["method"] == "linear" and r["rc"] == 0), None)
    print()
    print(f"inputs: {len(paths)} files, {total_in / 1e9:.3f} GB; nproc {os.cpu_count()}; threads {args.threads or 'default'}")
    print()
    print("| N | width | method | budget | wall s | peak RSS MB | GB read | read/input | x linear | out MB | load 1m |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ok = r["rc"] == 0
        read = r["read_gb"]
        ratio = f"{read * 1e9 / total_in:.2f}" if ok and read is not None else "-"
        vs = f"{r['wall'] / linear['wall']:.2f}" if ok and linear else "-"
        print(
            f"| {len(paths)} | {width_label(args.width)} | {r['method']} | {args.memory_budget or 'default'} | "
            f"{r['wall']:.1f}{'' if ok else ' (failed)'} | {r['peak'] / 1e6:.0f} | "
            f"{read if read is not None else '-'} | {ratio} | {vs} | "
            f"{(r['out_bytes'] or 0) / 1e6:.1f} | {r['load'][0]:.2f}->{r['load'][1]:.2f} |"
        )
    if args.time_split:
        print_split(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"n": len(paths), "width": args.width, "input_bytes": total_in, "rows": rows}, indent=1))
    return 1 if failed else 0


def width_label(width: float) -> str:
    frac = Fraction(width).limit_denominator(1024)
    return str(frac)


def compare_budgets(args, paths: List[Path], env: Dict[str, str]) -> int:
    runs = args.workdir / "runs"
    tag = f"n{args.n}-w{width_tag(args.width)}"
    config = write_config("tgmd", paths, runs, tag)
    budgets = []
    for item in args.compare_budgets.split(","):
        item = item.strip()
        if item == "inmem":
            budgets.append(("inmem", fmt_bytes_budget(inmem_budget(paths))))
        else:
            budgets.append((item, item))
    results = []
    outs = []
    for label, budget in budgets:
        # Same file name in every run: the name is the modelspec title in the header metadata.
        out = runs / f"budget-{label}" / f"{tag}-tgmd.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        r = merge(config, out, budget, args.threads, env, args.extra)
        r["data_sha256"] = data_sha256(out) if out.exists() else None
        results.append((label, budget, r))
        outs.append(out)
        print(f"# tgmd --memory-budget {budget} ({label}): rc {r['rc']}, {r['wall']:.1f} s, peak RSS {r['peak'] / 1e6:.0f} MB, sha256 {r['sha256']}", flush=True)
    diff = differing_tensors(outs) if all(o.exists() for o in outs) and len(outs) > 1 else None
    if not args.keep_output:
        for out in outs:
            _clean_output(out)
    print()
    print("| N | width | budget | wall s | peak RSS MB | GB read | file sha256 | tensor-data sha256 |")
    print("|---:|---|---|---:|---:|---:|---|---|")
    for label, budget, r in results:
        print(
            f"| {len(paths)} | {width_label(args.width)} | {budget} ({label}) | {r['wall']:.1f} | {r['peak'] / 1e6:.0f} | "
            f"{r['read_gb']} | `{(r['sha256'] or '-')[:16]}` | `{(r['data_sha256'] or '-')[:16]}` |"
        )
    hashes = {r["sha256"] for _, _, r in results}
    ok = all(r["rc"] == 0 for _, _, r in results) and len(hashes) == 1 and None not in hashes
    print()
    print("bit-identical (whole file, same output name): " + ("YES" if ok else "NO"))
    if diff is not None:
        print(f"tensors that differ: {len(diff)}" + (f" (e.g. {', '.join(diff[:5])})" if diff else ""))
    return 0 if ok else 1


def data_sha256(path: Path) -> str:
    """sha256 of the tensor bytes only (everything after the safetensors header)."""
    import hashlib
    import struct

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + size)
        for block in iter(lambda: fh.read(16 * 1024**2), b""):
            h.update(block)
    return h.hexdigest()


def differing_tensors(outs: List[Path]) -> List[str]:
    """Names of the tensors whose bytes differ between the first output and any other."""
    from safetensors import safe_open

    names = []
    with safe_open(str(outs[0]), "pt") as first:
        others = [safe_open(str(o), "pt") for o in outs[1:]]
        for key in first.keys():
            a = first.get_tensor(key)
            for other in others:
                b = other.get_tensor(key)
                if a.shape != b.shape or a.dtype != b.dtype or not bool((a.view(-1).view(torch_uint8()) == b.view(-1).view(torch_uint8())).all()):
                    names.append(key)
                    break
    return names


def torch_uint8():
    import torch

    return torch.uint8


TRACE_CHILD = r"""
import json, sys
from mergekit_sdxl.host import checkpoint
ranges = {}
original = checkpoint.SDXLCheckpointLoader._read
def traced(self, key, start, stop):
    ranges.setdefault(self.index.file_path, []).append((start, stop))
    return original(self, key, start, stop)
checkpoint.SDXLCheckpointLoader._read = traced
from mergekit_sdxl.cli.main import main
out = sys.argv.pop(1)
try:
    main()
except SystemExit as exit:
    if exit.code not in (0, None):
        raise
worst = 0
covered = 0
twice = 0
for path, spans in ranges.items():
    events = []
    for a, b in spans:
        events.append((a, 1)); events.append((b, -1))
    events.sort()
    depth = 0; last = None
    for pos, step in events:
        if last is not None and depth > 0:
            covered += pos - last
            if depth > 1:
                twice += pos - last
        depth += step
        worst = max(worst, depth)
        last = pos
json.dump({"max_reads_per_byte": worst, "distinct_bytes_read": covered, "bytes_read_more_than_once": twice,
           "reads": sum(len(s) for s in ranges.values())}, open(out, "w"))
"""


def trace_reads(args, paths: List[Path], env: Dict[str, str]) -> None:
    runs = args.workdir / "runs"
    tag = f"n{args.n}-w{width_tag(args.width)}"
    config = write_config("tgmd", paths, runs, tag)
    out = runs / f"{tag}-tgmd-traced.safetensors"
    _clean_output(out)
    report = runs / f"{tag}-tgmd-traced.json"
    argv = [sys.executable, "-c", TRACE_CHILD, str(report), "merge", str(config), str(out), "--quiet"]
    if args.memory_budget:
        argv += ["--memory-budget", args.memory_budget]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"# trace failed: {proc.stderr[-2000:]}")
        return
    data = json.loads(report.read_text())
    total_in = sum(p.stat().st_size for p in paths)
    print()
    print(
        f"tgmd read trace (budget {args.memory_budget}): {data['reads']} reads; max reads of any input byte = "
        f"{data['max_reads_per_byte']}; distinct input bytes read {data['distinct_bytes_read'] / 1e9:.3f} GB "
        f"({data['distinct_bytes_read'] / total_in:.2f} of the input); read more than once "
        f"{data['bytes_read_more_than_once'] / 1e9:.3f} GB"
    )
    if not args.keep_output:
        _clean_output(out)


SPLIT_CHILD = r"""
import atexit, json, sys, threading, time
T0, EPOCH0 = time.monotonic(), time.time()
report_path = sys.argv.pop(1)
spans, patched = [], []

def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            spans.append((name, start - T0, time.monotonic() - T0, threading.get_ident()))
    return wrapper

def patch(owner, attr, name):
    if hasattr(owner, attr):
        setattr(owner, attr, timed(name, getattr(owner, attr)))
        patched.append(f"{owner.__name__}.{attr}")

try:
    from mergekit_sdxl.host import driver
    for attr, name in [("run_sdxl_merge", "run"), ("_preflight", "preflight"), ("check_contents", "checks"),
                       ("plan_merge", "plan"), ("input_info", "provenance"), ("stream_merge", "merge+write")]:
        patch(driver, attr, name)
    from mergekit_sdxl.io import hashing, writer
    patch(hashing.HashCache, "sha256", "hash")
    patch(writer.StreamingCheckpointWriter, "write", "write")
    patch(writer.StreamingCheckpointWriter, "close", "finish")
    try:
        from mergekit_sdxl.io import background_hash
        patch(background_hash.BackgroundHasher, "sha256", "hash wait")
        patch(background_hash.BackgroundHasher, "wait_all", "hash wait")
    except ImportError:
        pass
except Exception as exc:
    print(f"time-split instrumentation incomplete: {exc!r}", file=sys.stderr)

def dump():
    with open(report_path, "w") as fh:
        json.dump({"spans": spans, "patched": patched, "end": time.monotonic() - T0, "epoch0": EPOCH0,
                   "epoch_end": time.time()}, fh)

atexit.register(dump)
from mergekit_sdxl.cli.entry import main
main()
"""

# What the merge may log itself (requested of the driver for issue 11): "phase NAME: SECONDS s".
PHASE_LINE = re.compile(r"\bphase ([A-Za-z0-9_+\-]+): ([0-9]+(?:\.[0-9]+)?) s\b")
SPLIT_COLUMNS = ("start-up", "preflight+checks", "plan", "hash", "merge", "write", "finish", "exit", "other")


def merge_split(config: Path, out: Path, budget: Optional[str], threads: Optional[int], env: Dict[str, str],
                extra: List[str], cache_dir: Path) -> Dict:
    """One merge with its phases timed (see ``--time-split``), an empty hash cache of its own."""
    _clean_output(out)
    shutil.rmtree(cache_dir, ignore_errors=True)
    report = out.with_suffix(".split.json")
    report.unlink(missing_ok=True)
    argv = [sys.executable, "-c", SPLIT_CHILD, str(report), "-v", "merge", str(config), str(out), "--quiet"]
    if budget:
        argv += ["--memory-budget", budget]
    if threads:
        argv += ["--threads", str(threads)]
    argv += extra
    launched = time.time()
    result = run_child(argv, dict(env, MERGEKIT_SDXL_CACHE_DIR=str(cache_dir)), out.with_suffix(".log"))
    result["out_bytes"] = out.stat().st_size if out.exists() else None
    data = json.loads(report.read_text()) if report.exists() else None
    result["split"] = split_phases(data, result["wall"], launched) if data else None
    log = Path(result["log"]).read_text(encoding="utf-8")
    result["logged_phases"] = [(m.group(1), float(m.group(2))) for m in PHASE_LINE.finditer(log)]
    return result


def split_phases(report: Dict, wall: float, launched: float) -> Dict[str, float]:
    """Seconds per phase of the merge's main thread from the timed spans; hashing on the main
    thread (or waiting for the background hashes there) counts as ``hash``, not as the step it
    happened in. ``hash in background``: hashing on other threads, overlapped, not in the sum."""
    spans = report["spans"]
    run = next((sp for sp in spans if sp[0] == "run"), None)
    main = run[3] if run else None
    on_main = [sp for sp in spans if sp[3] == main]
    hashing = [sp for sp in on_main if sp[0] in ("hash", "hash wait")]

    def outermost(items: List) -> List:
        return [x for x in items if not any(y is not x and y[1] <= x[1] and x[2] <= y[2] for y in items)]

    hash_outer = outermost(hashing)

    def own(*names: str) -> float:
        total = 0.0
        for name, a, b, _ in on_main:
            if name in names:
                total += (b - a) - sum(hb - ha for _, ha, hb, _ in hash_outer if a <= ha and hb <= b)
        return total

    start = run[1] if run else 0.0
    phases = {
        # interpreter start, imports, plugin registration, CLI parsing
        "start-up": (report["epoch0"] - launched) + start,
        "preflight+checks": own("preflight", "checks"),
        "plan": own("plan"),
        "hash": sum(b - a for _, a, b, _ in hash_outer),
        # stream_merge less the writer's own write calls: reading the inputs and the kernels
        "merge": own("merge+write") - own("write"),
        "write": own("write"),
        "finish": own("finish"),
        # after the merge returned: the report lines, atexit handlers, interpreter teardown
        "exit": (launched + wall) - (report["epoch0"] + (run[2] if run else report["end"])),
    }
    phases["other"] = wall - sum(phases.values())
    phases["hash in background"] = sum(b - a for name, a, b, t in spans if name == "hash" and t != main)
    return phases


def print_split(rows: List[Dict]) -> None:
    print()
    print("Time split (s) of the merge's main thread, from timers around the driver's steps, inputs hashed with an "
          "empty cache: 'hash' = hashing on the main thread or waiting there for the background hashes; 'merge' = "
          "reading the inputs and merging; 'write' = the writer's write calls; 'finish' = fsync, verify, rename, "
          "sidecars; 'exit' = "
          "from the merge's return to the process's end (report, teardown); 'other' = provenance, writer set-up "
          "and the rest of the wall time; 'hash in background' = hashing overlapped on other "
          "threads (not part of the wall-time sum):")
    print()
    columns = SPLIT_COLUMNS + ("hash in background",)
    print("| method | wall s | " + " | ".join(columns) + " | peak RSS MB | GB read |")
    print("|---|---:|" + "---:|" * len(columns) + "---:|---:|")
    for r in rows:
        split = r.get("split") or {}
        cells = [f"{split[c]:.1f}" if c in split else "-" for c in columns]
        print(f"| {r['method']} | {r['wall']:.1f} | " + " | ".join(cells) + f" | {r['peak'] / 1e6:.0f} | {r['read_gb'] if r['read_gb'] is not None else '-'} |")
    logged = [r for r in rows if r.get("logged_phases")]
    if not logged:
        print()
        print("(the merge logged no 'phase NAME: SECONDS s' lines; the table above is from the timers)")
        return
    names = list(dict.fromkeys(name for r in logged for name, _ in r["logged_phases"]))
    print()
    print("Phases as the merge logs them (s):")
    print()
    print("| method | wall s | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for r in logged:
        got: Dict[str, float] = {}
        for name, sec in r["logged_phases"]:
            got[name] = got.get(name, 0.0) + sec
        print(f"| {r['method']} | {r['wall']:.1f} | " + " | ".join(f"{got[n]:.1f}" if n in got else "-" for n in names) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--n", type=int, default=16, help="number of input files, base included (default 16)")
    parser.add_argument("--width", type=parse_width, default=1 / 16, help="width factor, e.g. 1/16 or 1 (default 1/16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base; model i uses seed+i")
    parser.add_argument("--noise", type=float, default=0.02, help="fine-tune noise scale (default 0.02)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS + BUILTINS))
    parser.add_argument("--memory-budget", default="1GB", help="passed to mergekit-sdxl merge (default 1GB; '' = its default)")
    parser.add_argument("--threads", type=int, default=None, help="passed to mergekit-sdxl merge --threads")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergekit-sdxl-bench"), help="inputs, hash cache, configs, outputs")
    parser.add_argument("--keep-going", action="store_true", help="continue with the next method after a failure")
    parser.add_argument("--keep-output", action="store_true", help="keep the merged files (default: delete after measuring)")
    parser.add_argument("--compare-budgets", default=None, help="e.g. 64MB,inmem: tgmd under each budget, compare sha256")
    parser.add_argument("--trace-reads", action="store_true", help="also run tgmd with every read range recorded")
    parser.add_argument("--time-split", action="store_true", help="time start-up / plan / hash / merge / write / finish of each merge (no prehash)")
    parser.add_argument("--json", default=None, help="also write the raw measurements here")
    parser.add_argument("extra", nargs="*", help="after --: extra options for mergekit-sdxl merge")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        if m not in METHODS + BUILTINS:
            parser.error(f"unknown method {m}")
    if args.n < 2:
        parser.error("--n must be >= 2")
    args.workdir = args.workdir.resolve()

    print(f"# load average {os.getloadavg()}, nproc {os.cpu_count()}", flush=True)
    paths = input_paths(args.workdir, args.n, args.width, args.seed, args.noise)
    ensure_inputs(paths, args.width, args.seed, args.noise)
    env = child_env(args.workdir)
    if not args.time_split:  # a time split hashes inside the timed run, with a cache of its own
        prehash(paths, args.workdir / "hash-cache")
    if args.compare_budgets:
        rc = compare_budgets(args, paths, env)
    else:
        rc = benchmark(args, paths, env)
        if args.trace_reads:
            trace_reads(args, paths, env)
    print()
    print("Command: `.venv/bin/python bench/bench_merge.py " + " ".join(sys.argv[1:]) + "`")
    return rc


if __name__ == "__main__":
    sys.exit(main())
