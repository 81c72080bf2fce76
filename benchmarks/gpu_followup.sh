#!/usr/bin/env bash
# The follow-up of benchmarks/gpu_check.sh, at most 3 minutes, into the same RESULTS_DIR:
# 1. the rows, profiles and checks gpu_check.json has no result for, rerun (80 s);
# 2. the training step (issue 16): official vs the training path, fp32 and bf16 autocast, stage
#    and block checkpointing, BagNet-33 batch 64 at 224: img/s and peak allocated memory
#    (benchmarks/gpu_training.py, 35 s, RESULTS_DIR/gpu_training.json);
# 3. Nsight Compute on the top Triton kernels of the fast BagNet-33 bf16 forward at batch 256
#    (the conv and fused-pointwise GEMMs of one forward after a warm-up forward: SOL, occupancy,
#    L2 hit rate, tensor-pipe use; 50 s), or, without ncu or its counters, the torch profiler's kernel
#    table in the time left.
#
#     bash benchmarks/gpu_followup.sh RESULTS_DIR
#
# Needs no build (the Triton backend); on a fresh machine the Triton compiles are redone.
set -u
OUT_DIR="${1:?usage: bash benchmarks/gpu_followup.sh RESULTS_DIR}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"  # before the cd below: a relative RESULTS_DIR stays where it was meant
cd "$(dirname "$0")/.."
START=$SECONDS
PY="${PYTHON:-python3}"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/bagnet_fast_triton_cache}" TRITON_CACHE_AUTOTUNING=1
timeout --kill-after=5 80 "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" --rerun-failed --budget-s 70 \
    >>"$OUT_DIR/followup.log" 2>&1
echo "[gpu_followup] rerun: rc=$?" | tee -a "$OUT_DIR/followup.log"
timeout --kill-after=5 35 "$PY" benchmarks/gpu_training.py --out "$OUT_DIR" --budget-s 25 \
    >>"$OUT_DIR/followup.log" 2>&1
echo "[gpu_followup] training: rc=$?" | tee -a "$OUT_DIR/followup.log"
TARGET='
import sys, torch, bagnet_fast
m = bagnet_fast.bagnet33().eval().cuda().bfloat16(); m.backend = "triton"
x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
with torch.inference_mode():
    m(x); torch.cuda.synchronize()          # compile, autotune (the winners from the cache)
    if sys.argv[1:] == ["profile"]:
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            m(x); torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    else:
        torch.cuda.nvtx.range_push("second")
        m(x); torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
'
NCU_RC=1
if command -v ncu >/dev/null; then
    # Only the second forward (NVTX range "second": no compile or tuning launches), 8 kernels.
    timeout --kill-after=5 50 ncu --target-processes all --nvtx --nvtx-include "second/" \
        --kernel-name regex:"_conv_bias_act_kernel|_pointwise_bottleneck_kernel" --launch-count 8 --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis \
        --csv "$PY" -c "$TARGET" >"$OUT_DIR/ncu.csv" 2>>"$OUT_DIR/followup.log"
    NCU_RC=$?
    # Without access to the performance counters (ERR_NVGPUCTRPERM: a driver setting for
    # non-root users) ncu runs the program but measures nothing.
    if grep -q "ERR_NVGPUCTRPERM" "$OUT_DIR/ncu.csv" "$OUT_DIR/followup.log" 2>/dev/null; then NCU_RC=2; fi
    echo "[gpu_followup] ncu: rc=$NCU_RC" | tee -a "$OUT_DIR/followup.log"
fi
if [ "$NCU_RC" != 0 ]; then
    # The torch profiler's kernel table instead, in the time left of the 3 minutes.
    LIMIT=$(( 175 - (SECONDS - START) ))
    if [ "$LIMIT" -ge 15 ]; then
        timeout --kill-after=5 "$LIMIT" "$PY" -c "$TARGET" profile >"$OUT_DIR/kernels.txt" 2>>"$OUT_DIR/followup.log"
        echo "[gpu_followup] torch profiler table: rc=$?" | tee -a "$OUT_DIR/followup.log"
    else
        echo "[gpu_followup] torch profiler table: skipped, $LIMIT s left" | tee -a "$OUT_DIR/followup.log"
    fi
fi
