#!/usr/bin/env bash
# Device check (GPU machine): the same TGMD merge on CPU and with --cuda, in memory and chunked,
# and the kernel tests' CUDA cases. Prints sha256s and timings; see docs/methods.md "Devices".
# Usage on a machine with CUDA torch and the wheels in .whl/:  bash bench/gpu_check.sh
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
W=/tmp/gpucheck; mkdir -p $W
python3 - <<'PY'
from mergekit_sdxl.sdxl.tiny import write_synthetic_sdxl
w = "/tmp/gpucheck"
write_synthetic_sdxl(f"{w}/base.safetensors", seed=0)
for i in range(1, 9):
    write_synthetic_sdxl(f"{w}/m{i}.safetensors", seed=i, base=f"{w}/base.safetensors")
models = "\n".join(f"  - model: {{model: {{path: {w}/m{i}.safetensors}}}}" for i in range(1, 9))
open(f"{w}/tgmd.yaml", "w").write(f"merge_method: tgmd\nbase_model: {{model: {{path: {w}/base.safetensors}}}}\nmodels:\n{models}\ndtype: float64\nparameters: {{seed: 240603}}\n")
PY
run() { local tag=$1; shift; mkdir -p $W/$tag; /usr/bin/time -f "$tag wall %e s maxrss %M KB" python3 -m mergekit_sdxl.cli.main merge $W/tgmd.yaml $W/$tag/merged.safetensors --quiet "$@" 2>&1 | grep -E "sha256|wall|error|Error|Traceback" ; }
run cpu --memory-budget 8GB
run cpu_chunked --memory-budget 64MB
run cuda --cuda --memory-budget 8GB
run cuda_again --cuda --memory-budget 8GB
run cuda_chunked --cuda --memory-budget 64MB
python3 - <<'PY'
import torch
from safetensors.torch import load_file
a = load_file("/tmp/gpucheck/cpu/merged.safetensors"); b = load_file("/tmp/gpucheck/cuda/merged.safetensors")
diff = [k for k in a if not torch.equal(a[k], b[k])]
worst = max(((a[k].float() - b[k].float()).abs().max().item() for k in diff), default=0.0)
n = sum(int((a[k] != b[k]).sum()) for k in diff)
total = sum(t.numel() for t in a.values())
print(f"cpu vs cuda: {len(diff)} of {len(a)} tensors differ, {n} of {total} elements, max abs diff {worst:.3g}")
PY
python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_rng.py tests/kernels/test_kernels_tgmd.py 2>&1 | tail -3
