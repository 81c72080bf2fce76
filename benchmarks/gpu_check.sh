#!/usr/bin/env bash
# The GPU check of issues 3 and 4, in one run on a machine with an NVIDIA GPU and no internet:
# build the package against the torch found there, run the CUDA tests, then measure img/s
# (benchmarks/gpu_check.py). From the repository root:
#
#     bash benchmarks/gpu_check.sh RESULTS_DIR        # e.g. "$OUT" on the device machine
#
# Writes RESULTS_DIR/{env.txt,build.log,tests.log,bench.log,gpu_check.md,gpu_check.json} (six
# files, one folder: what the device tool brings back). About 8 minutes on an H200 and never
# more than GPU_CHECK_LIMIT_S (default 555 s, under a 9.5-minute budget): every step runs under
# `timeout`, the benchmark gets whatever time is left, and a failing step never stops the next.
# Commit what it measured to benchmarks/results/ (with the date, GPU, driver and versions that
# gpu_check.md starts with).
#
# GPU_CHECK_DRY_RUN=1 rehearses the script on a machine without a GPU: no build, the tests only
# collected, the benchmark in its CPU --dry-run mode.
set -u
OUT_DIR="${1:?usage: bash benchmarks/gpu_check.sh RESULTS_DIR}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."
export PY="${PYTHON:-python3}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
LIMIT="${GPU_CHECK_LIMIT_S:-555}"
START=$SECONDS
# The Triton kernels must compile for the GPU: the interpreter is fixed per process at import.
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
# The source tree first, so that a failed build still leaves the Triton and torch backends.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

elapsed() { echo $(( SECONDS - START )); }
left() { echo $(( LIMIT - (SECONDS - START) )); }
# step NAME SECONDS LOG COMMAND...: run under timeout, log everything, never abort the script.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    if [ "$limit" -gt "$(( $(left) - 5 ))" ]; then limit=$(( $(left) - 5 )); fi
    if [ "$limit" -lt 10 ]; then
        echo "[gpu_check] $name: skipped, $(left) s left" | tee -a "$log"
        return 0
    fi
    echo "[gpu_check] $name: start at $(elapsed) s, limit $limit s" | tee -a "$log"
    # timeout runs the command in its own process group and signals all of it (pytest-xdist
    # workers too); shell functions run through bash, which sees them exported.
    if declare -F "$1" >/dev/null; then set -- bash -c "$*"; fi
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    echo "[gpu_check] $name: rc=$rc at $(elapsed) s$([ $rc -eq 124 ] && echo ' (timed out)')" | tee -a "$log"
    return 0
}

env_info() {
    date -u '+date_utc: %Y-%m-%d %H:%M:%S'
    nvidia-smi || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
    nvcc --version 2>/dev/null | tail -2 || true
    "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton: not importable", e)
for name in ("setuptools", "numpy", "pytest", "xdist"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e: print(name + ": not importable", e)
try:
    import torchvision; print("torchvision", torchvision.__version__)
except Exception as e: print("torchvision: not importable", e)
PY
    git rev-parse HEAD 2>/dev/null || true
    git status --short 2>/dev/null | head -30 || true
    nproc
}

build() {
    # pip's editable install, else the extension built in place (found through PYTHONPATH).
    MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip install --no-build-isolation --no-deps -v -e . \
        || { echo "[gpu_check] pip install -e . failed: building the extension in place"
             MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 "$PY" setup.py build_ext --inplace; } || return 1
    # Which backends this build can run, and why not.
    "$PY" -m bagnet_fast info || "$PY" -c "import bagnet_fast, json, torch; print(json.dumps(bagnet_fast.backends('cuda', torch.bfloat16), indent=1))"
}

export -f env_info build
step env 30 "$OUT_DIR/env.txt" env_info
if [ "$DRY" = 1 ]; then
    echo "[gpu_check] build: skipped (dry run)" | tee -a "$OUT_DIR/build.log"
else
    step build 200 "$OUT_DIR/build.log" build
fi
# CUDA parity (tests/test_gpu_models.py: every backend × fp32/bf16/fp16 × 3 variants, every
# candidate Triton tile), the Triton kernel tests on CUDA, and the other files with CUDA tests
# (CUDA ops, graphs, preprocessing; their CPU tests come along), verbose so that a run cut short by
# its timeout still shows each finished test. One fixed tile per op (BAGNET_FAST_AUTOTUNE=0):
# parity does not depend on the tuner's pick, and the compiles are shared with the benchmark
# through triton's on-disk cache. Four pytest-xdist workers where installed: compiling kernels is
# single-threaded. The CPU dry run of the benchmark script is CI's job, not this slot's.
XDIST=""
if "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
COLLECT_ONLY=""
BENCH_DRY=""
if [ "$DRY" = 1 ]; then COLLECT_ONLY="--collect-only -q"; XDIST=""; BENCH_DRY="--dry-run"; fi
TEST_FILES=""
for f in tests/test_gpu_models.py tests/test_triton_kernels.py tests/test_cuda_backend.py tests/test_graphs.py \
    tests/test_ops.py tests/test_preprocess.py; do
    if [ -f "$f" ]; then TEST_FILES="$TEST_FILES $f"; fi
done
step tests 180 "$OUT_DIR/tests.log" env BAGNET_FAST_AUTOTUNE=0 "$PY" -m pytest -v --tb=short -ra \
    -p no:cacheprovider $XDIST $COLLECT_ONLY $TEST_FILES -k "not dry_run and not compile_for_hopper"
# The benchmark stops starting rows 25 s before its timeout and writes results after every row.
BENCH_LIMIT=$(( $(left) - 5 ))
step bench "$BENCH_LIMIT" "$OUT_DIR/bench.log" "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" \
    --budget-s $(( BENCH_LIMIT - 25 )) $BENCH_DRY
echo "[gpu_check] done in $(elapsed) s; results in $OUT_DIR" | tee -a "$OUT_DIR/bench.log"
cat "$OUT_DIR/gpu_check.md" 2>/dev/null || tail -50 "$OUT_DIR/bench.log"
