#!/usr/bin/env bash
# One prepared GPU check: build the CUDA extension, run the GPU tests and the GPU
# benchmarks, write every figure to the folder given as $1 (at most 8 files: what the
# device tool returns). Budget: under 7 minutes on an H200.
#   bash bench/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
export MAX_JOBS=${MAX_JOBS:-16} FASTDD_TEST_NATIVE_TRITON=1 FASTDD_VERBOSE_BUILD=1 PYTHONUNBUFFERED=1
sum="$out/summary.txt" log="$out/log.txt"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$sum"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >> "$sum" 2>&1
# fastdd itself as a wheel into a folder of its own, without touching the machine's torch or
# triton (an editable install asks the registry for setuptools; that machine has no network).
# PYTHONSAFEPATH keeps the source tree's fastdd/ (which lacks fastdd.csrc) off sys.path.
site=$(mktemp -d)
$PY -m pip install -q --no-deps --no-build-isolation --target "$site" . >> "$log" 2>&1 || stamp "pip install failed (see log.txt)"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
PYTHONSAFEPATH=1 timeout 200 $PY -c "from fastdd import _ext; m = _ext.load(raise_on_error=True); print('extension loaded:', m)" \
  > "$out/build.log" 2>&1 && stamp "extension built" || stamp "BUILD FAILED (see build.log)"
PYTHONSAFEPATH=1 timeout 150 $PY -m pytest -q -rf --tb=short -m gpu tests -p no:cacheprovider > "$out/gpu_tests.txt" 2>&1
stamp "gpu tests: $(tail -n 1 "$out/gpu_tests.txt")"
for dt in float32 bfloat16; do
  timeout 45 $PY bench/bench_kernels.py --dtype $dt --out "$out/bench_kernels_$dt.md" >> "$log" 2>&1
  stamp "bench_kernels $dt: rc $?"
done
timeout 60 $PY bench/bench_gpu_engine.py --out "$out/bench_gpu_engine.md" >> "$log" 2>&1
stamp "bench_gpu_engine: rc $?"
timeout 150 $PY bench/bench_distill.py --device cuda --iters 5 --out "$out/bench_distill.md" >> "$log" 2>&1
stamp "bench_distill cuda: rc $?"
