"""Compile and autotune the Triton kernels of the GPU check's rows while the extension builds
(gpu_check.sh runs this in the background): one fast BagNet-33 forward per (dtype, fp32 mode,
batch) the check times, on the Triton backend, which needs no build. With
TRITON_CACHE_AUTOTUNING=1 and a shared TRITON_CACHE_DIR the winners and the compiled kernels
persist on disk, so the timed rows find them (benchmarks/gpu_compile_count.py: 37 compiles and
22 tuning keys at batch 256 in bf16, 8 more compiles for batch 1).

    python benchmarks/gpu_warmup.py [--batches 256,32,1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bagnet_fast  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="256,32,1")
    parser.add_argument("--image", type=int, default=224)
    args = parser.parse_args()
    # (dtype, BAGNET_FAST_FP32) in the order the check's phases need them.
    for dtype, mode in ((torch.bfloat16, None), (torch.float32, "ieee"), (torch.float32, "tf32x3")):
        model = bagnet_fast.bagnet33().eval().to(device="cuda", dtype=dtype)
        model.backend = "triton"
        for batch in [int(b) for b in args.batches.split(",")]:
            if dtype == torch.float32 and batch != 256:
                continue  # the fp32 rows run at batch 256 only
            if mode:
                os.environ["BAGNET_FAST_FP32"] = mode
            x = torch.randn(batch, 3, args.image, args.image, device="cuda", dtype=dtype)
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    model(x)
                torch.cuda.synchronize()
                print(f"warm-up {dtype} {mode or ''} batch {batch}: {time.perf_counter() - start:.1f} s", flush=True)
            except Exception as error:  # noqa: BLE001 - the timed rows will report it
                print(f"warm-up {dtype} {mode or ''} batch {batch}: {type(error).__name__}: {error}", flush=True)
            os.environ.pop("BAGNET_FAST_FP32", None)
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
