#!/usr/bin/env bash
# The GPU check (issues 3, 4, 11, 13, 17), one run on a machine with an NVIDIA GPU and no internet:
# the environment, the build with the Triton compile/autotune warm-up in the background, the
# CUDA tests trimmed to about 90 s, then the measurements, one process per phase so that a
# device fault in the never-run Triton rows cannot lose the baselines. From the repository root:
#
#     bash benchmarks/gpu_check.sh RESULTS_DIR        # e.g. "$OUT" on the device machine
#
# Order (each under `timeout`, a failing step never stops the next; gpu_check.py writes
# RESULTS_DIR/gpu_check.{json,md} after every row):
#   env 10 s; build (pip without an index, --no-build-isolation --no-deps) 150 s, while
#   benchmarks/gpu_warmup.py compiles and autotunes the Triton rows (TRITON_CACHE_AUTOTUNING=1);
#   tests 90 s (BagNet-33 fp32 + bf16 on every backend, every candidate tile once, the graph
#   runner; GPU_CHECK_FULL_TESTS=1 runs the whole CUDA set instead); the sm_90 compile check
#   (--quick, 120 s) in the background from the build on, waited for after the tests;
#   baselines 50 s (ResNet-50 eager bf16 channels-last, reference fp32 NCHW, reference bf16 CL);
#   triton 60 s (fast bf16 at batch 256, checked, and its unit profile next to the model's
#   prediction); cuda 45 s (the same on the cuda backend, the stem three ways); extra 60 s (CUDA
#   graphs at batch 32 and 1, fp32 ieee / tf32x3 / cuda rows, the checks of issues 11, 13 and 17);
#   compile: whatever is left (torch.compile). Never more than GPU_CHECK_LIMIT_S (default 420 s,
#   7 minutes). Follow-up (<= 3 minutes, same RESULTS_DIR): benchmarks/gpu_followup.sh.
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
LIMIT="${GPU_CHECK_LIMIT_S:-420}"
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
# ninja: without it torch's cpp_extension builds the CUDA extension serially (minutes, not the
# 150 s of the build step); pybind11: needed by setup.py.
for name in ("setuptools", "numpy", "pytest", "xdist", "ninja", "pybind11"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e: print(name + ": not importable", e)
try:
    import torchvision; print("torchvision", torchvision.__version__)
except Exception as e: print("torchvision: not importable", e)
PY
    command -v ninja ncu || true
    git rev-parse HEAD 2>/dev/null || true
    git status --short 2>/dev/null | head -30 || true
    nproc
}

build() {
    # pip's editable install, else the extension built in place (found through PYTHONPATH).
    MAX_JOBS=12 TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e . \
        || { echo "[gpu_check] pip install -e . failed: building the extension in place"
             MAX_JOBS=12 TORCH_CUDA_ARCH_LIST=9.0 "$PY" setup.py build_ext --inplace; } || return 1
    # Which backends this build can run, and why not.
    "$PY" -m bagnet_fast info || "$PY" -c "import bagnet_fast, json, torch; print(json.dumps(bagnet_fast.backends('cuda', torch.bfloat16), indent=1))"
}

export -f env_info build
# The Triton compiles and autotuning winners persist here, shared by every process of the check.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/bagnet_fast_triton_cache}" TRITON_CACHE_AUTOTUNING=1
step env 10 "$OUT_DIR/env.txt" env_info
WARM_PID=""
CHECK_PID=""
if [ "$DRY" = 1 ]; then
    echo "[gpu_check] build and warm-up: skipped (dry run)" | tee -a "$OUT_DIR/build.log"
else
    # The warm-up needs no build (Triton backend); 4 of the 16 cores, the build the other 12.
    ( timeout --kill-after=5 240 "$PY" benchmarks/gpu_warmup.py >"$OUT_DIR/warmup.log" 2>&1 ) &
    WARM_PID=$!
    # The sm_90a compile check of the first tiles (28 programs: 19 s cold on the 2-core CPU VM,
    # too close to a 20 s serial step) needs no GPU: in the background too, one core.
    ( echo "[gpu_check] compile_check: start at $(elapsed) s, limit 120 s"
      timeout --kill-after=5 120 env -u TRITON_INTERPRET "$PY" benchmarks/gpu_compile_check.py --quick
      echo "[gpu_check] compile_check: rc=$? at $(elapsed) s" ) >"$OUT_DIR/compile_check.log" 2>&1 &
    CHECK_PID=$!
    step build 150 "$OUT_DIR/build.log" build
fi
XDIST=""
if "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
COLLECT_ONLY=""
BENCH_DRY=""
if [ "$DRY" = 1 ]; then COLLECT_ONLY="--collect-only -q"; XDIST=""; BENCH_DRY="--dry-run"; fi
if [ "${GPU_CHECK_FULL_TESTS:-0}" = 1 ]; then
    TEST_FILES="tests/test_gpu_models.py tests/test_triton_kernels.py tests/test_cuda_backend.py tests/test_graphs.py tests/test_ops.py tests/test_preprocess.py"
    SELECT="not dry_run and not phases and not compile_for_hopper"
    TEST_LIMIT=180
else
    # BagNet-33 in fp32 and bf16 on every backend (logits and patches), every candidate tile once,
    # the graph runner: the parity a first run must show, in about 90 s.
    TEST_FILES="tests/test_gpu_models.py"
    SELECT="(test_model_on_cuda and bagnet33 and not fp16) or test_every_ or test_cuda_graph_runner"
    TEST_LIMIT=90
fi
step tests "$TEST_LIMIT" "$OUT_DIR/tests.log" env BAGNET_FAST_AUTOTUNE=0 "$PY" -m pytest -v --tb=short -ra \
    -p no:cacheprovider $XDIST $COLLECT_ONLY $TEST_FILES -k "$SELECT"
if [ -n "$WARM_PID" ]; then
    wait "$WARM_PID"; echo "[gpu_check] warm-up: rc=$? at $(elapsed) s" | tee -a "$OUT_DIR/build.log"
fi
if [ -n "$CHECK_PID" ]; then
    wait "$CHECK_PID"; tail -1 "$OUT_DIR/compile_check.log" | tee -a "$OUT_DIR/build.log"
fi
# One process per phase; gpu_check.py stops starting rows 10 s before its budget.
phase() {
    local name=$1 limit=$2
    if [ "$name" = compile ]; then limit=$(( $(left) - 10 )); fi
    step "bench $name" "$limit" "$OUT_DIR/bench.log" "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" \
        --phase "$name" --budget-s $(( limit - 10 )) $BENCH_DRY
}
phase baselines 50
phase triton 60
phase cuda 45
phase extra 60
phase compile 0
echo "[gpu_check] done in $(elapsed) s; results in $OUT_DIR" | tee -a "$OUT_DIR/bench.log"
cat "$OUT_DIR/gpu_check.md" 2>/dev/null || tail -50 "$OUT_DIR/bench.log"
