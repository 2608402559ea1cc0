#!/usr/bin/env bash
# One prepared GPU check: build the CUDA extension, run the GPU tests and the kernel
# benchmarks, write every figure to the folder given as $1. Budget: under 8 minutes.
#   bash bench/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export FASTDD_TEST_NATIVE_TRITON=1 FASTDD_VERBOSE_BUILD=1
start=$(date +%s)
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/env.txt" 2>&1
# fastdd itself, without touching the machine's torch or triton
$PY -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || echo "install failed" >> "$out/install.log"
timeout 240 $PY -c "from fastdd import _ext; m = _ext.load(raise_on_error=True); print('extension loaded:', m)" \
  > "$out/build.log" 2>&1 || echo "BUILD FAILED (see build.log)" >> "$out/summary.txt"
timeout 240 $PY -m pytest -q -m gpu tests -p no:cacheprovider > "$out/gpu_tests.txt" 2>&1
echo "gpu tests: $(tail -n 1 "$out/gpu_tests.txt")" >> "$out/summary.txt"
for dt in float32 bfloat16; do
  timeout 90 $PY bench/bench_kernels.py --dtype $dt --out "$out/bench_kernels_$dt.md" > "$out/bench_kernels_$dt.log" 2>&1
done
echo "elapsed: $(( $(date +%s) - start )) s" >> "$out/summary.txt"
cat "$out/summary.txt"
