#!/usr/bin/env bash
# One prepared GPU check: build the CUDA extension, run the GPU tests and the GPU
# benchmarks, write every figure to the folder given as $1 (at most 8 files: what the
# device tool returns). Budget: under 7 minutes on an H200.
#   bash bench/gpu_check.sh OUT_DIR [--no-ext] [--no-distill]
# --no-ext skips building the CUDA extension (about a minute: Triton and torch serve CUDA
# tensors); --no-distill skips the distillation benchmark (about two minutes).
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--no-ext] [--no-distill]}
shift
no_ext=0 no_distill=0
for opt in "$@"; do
  case $opt in
    --no-ext) no_ext=1 ;;
    --no-distill) no_distill=1 ;;
    *) echo "unknown option $opt" >&2; exit 2 ;;
  esac
done
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
# The wheel carries the prebuilt extension (`pip install --no-build-isolation ".[cuda]"`
# with a CUDA torch and nvcc present: setup.py's default; FASTDD_BUILD_CUDA=1 forces it);
# if that build fails, a plain wheel and the first-use JIT build are checked instead.
# PYTHONSAFEPATH keeps the source tree's fastdd/ (which lacks fastdd.csrc) off sys.path.
site=$(mktemp -d) whl=$(mktemp -d)
if [ $no_ext = 1 ]; then
  export FASTDD_NO_CUDA_EXT=1
  FASTDD_BUILD_CUDA=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$whl" . >> "$log" 2>&1
  expect=none
elif timeout 300 $PY -m pip wheel -v --no-deps --no-build-isolation -w "$whl" ".[cuda]" > "$out/build.log" 2>&1 \
    && grep -q "prebuilding the CUDA extension" "$out/build.log"; then
  stamp "prebuilt wheel: $(ls "$whl")"
  expect=prebuilt
else
  stamp "PREBUILD FAILED (see build.log); plain wheel + JIT build"
  rm -rf "$whl"/* build
  FASTDD_BUILD_CUDA=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$whl" . >> "$log" 2>&1
  expect=jit
fi
$PY -m pip install -q --no-deps --target "$site" "$whl"/*.whl >> "$log" 2>&1 || stamp "pip install failed (see log.txt)"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if [ $expect = none ]; then
  stamp "CUDA extension skipped (--no-ext)"
elif PYTHONSAFEPATH=1 timeout 200 $PY -c "
from fastdd import _ext
m = _ext.load(raise_on_error=True)
print('extension loaded:', m.__name__, m.__file__)
assert (m.__name__ == 'fastdd._C') == ('$expect' == 'prebuilt'), 'wrong extension: ' + m.__name__
" >> "$out/build.log" 2>&1; then
  stamp "extension loaded ($expect): $(tail -n 1 "$out/build.log")"
else
  stamp "EXTENSION LOAD FAILED (see build.log)"
fi
PYTHONSAFEPATH=1 timeout 150 $PY -m pytest -q -rf --tb=short -m gpu tests -p no:cacheprovider > "$out/gpu_tests.txt" 2>&1
stamp "gpu tests: $(tail -n 1 "$out/gpu_tests.txt")"
for dt in float32 bfloat16; do  # one file for both dtypes: the device tool returns 8 files
  timeout 45 $PY bench/bench_kernels.py --dtype $dt --out "$site/kernels_$dt.md" >> "$log" 2>&1
  stamp "bench_kernels $dt: rc $?"
  cat "$site/kernels_$dt.md" >> "$out/bench_kernels.md" 2>/dev/null
done
timeout 90 $PY bench/bench_gpu_engine.py --out "$out/bench_gpu_engine.md" --profile "$out/profile_convnet.md" >> "$log" 2>&1
stamp "bench_gpu_engine: rc $?"
if [ $no_distill = 0 ]; then
  timeout 200 $PY bench/bench_distill.py --device cuda --iters 5 --out "$out/bench_distill.md" >> "$log" 2>&1
  stamp "bench_distill cuda: rc $?"
fi
