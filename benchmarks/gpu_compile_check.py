"""Compile every candidate tile of the Triton GEMM kernels for sm_90 (H100/H200) without a GPU and
report shared memory, registers and spills per program: the resource budget of
kernels/pointwise_bottleneck.py checked by the compiler, before any device time is spent.

    python benchmarks/gpu_compile_check.py [--arch 90] [--dtypes bf16,fp32]

Uses triton's ahead-of-time compile (ASTSource + GPUTarget) and the ptxas bundled with triton
(``ptxas -v`` for registers and spills). Needs no GPU; TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bagnet_fast.ops import triton_ops, triton_tuning  # noqa: E402

SHARED_LIMIT = 227 * 1024  # bytes per block on sm_90 (228 KB per SM)
INT64_ARGS = {"n_pixels"}
# What the JIT sees at a real call on channels-last BagNet tensors: unit strides along channels
# (specialized to the constant 1), every other stride, channel count and pointer divisible by 16
# (tt.divisibility), except the pixel counts the kernels exclude from specialization and
# m_bucket (0..2).
UNIT_STRIDES = {"stride_xc", "stride_yc", "stride_rc", "stride_wi", "stride_w1i", "stride_w2i", "stride_w3i"}
NOT_DIVISIBLE = {"n_pixels", "h_out", "w_out", "m_bucket"}


FLOAT_ARGS = {"inv_image_pixels"}


def signature(kernel, dtype: str, constexprs: dict):
    """(signature, attrs) of ``kernel`` for an ahead-of-time compile, as the JIT would specialize."""
    sig, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            # MEAN_OUTPUT: y is the fp32 (N, C) means whatever the activations' dtype.
            sig[name] = "*fp32" if name == "y_ptr" and constexprs.get("MEAN_OUTPUT") else "*" + dtype
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i64" if name in INT64_ARGS else "i32"
        if name not in NOT_DIVISIBLE:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, attrs


def ptxas_usage(ptx: str, arch: int) -> str:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", str(path), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True)
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (f"regs {regs.group(1) if regs else '?'}"
            + (f", spill st/ld {spill.group(1)}/{spill.group(2)} B" if spill else ""))


def compile_one(kernel, dtype: str, constexprs: dict, tile, arch: int) -> str:
    consts = dict(constexprs, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
    consts.update({name: 1 for name in UNIT_STRIDES if name in kernel.arg_names})
    sig, attrs = signature(kernel, dtype, consts)
    src = ASTSource(kernel, sig, constexprs=consts, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})
    except Exception as error:  # noqa: BLE001 - reported per tile
        return f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    shared = compiled.metadata.shared
    verdict = "ok" if shared <= SHARED_LIMIT else "OVER the shared-memory limit"
    return f"shared {shared / 1024:.1f} KB, {ptxas_usage(compiled.asm['ptx'], arch)}: {verdict}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--quick", action="store_true", help="the first candidate tile of each op only")
    args = parser.parse_args()
    failed = False
    conv = triton_ops._conv_kernels._conv_bias_act_kernel
    pointwise = triton_ops._bottleneck_kernels._pointwise_bottleneck_kernel
    for dtype in args.dtypes.split(","):
        dclass = "fp32" if dtype == "fp32" else "16bit"
        precision = "ieee" if dtype == "fp32" else "tf32"
        jobs = []
        for tile in triton_tuning.CONV_TILES[dclass][: 1 if args.quick else None]:
            for k, stride, residual, mean in ((3, 1, False, False), (1, 1, True, False), (1, 1, True, True)):
                consts = dict(KSIZE=k, STRIDE=stride, HAS_RESIDUAL=residual, APPLY_RELU=True,
                              MEAN_OUTPUT=mean, INPUT_PRECISION=precision)
                jobs.append((f"conv {dtype} k{k} s{stride} res={residual} mean={mean} {tile}", conv, consts, tile))
        for p_pad in (p for p in (64, 128) if p <= triton_tuning.FUSED_MAX_PLANES[dclass]):
            tiles = triton_tuning.fit(triton_tuning.POINTWISE_TILES[dclass], 4 * p_pad, 4 * p_pad,
                                    triton_tuning.POINTWISE_MAX_INTERMEDIATE // p_pad)
            for tile in tiles[: 1 if args.quick else None]:
                jobs.append((f"pointwise {dtype} P={p_pad} {tile}", pointwise, dict(P_PAD=p_pad, INPUT_PRECISION=precision), tile))
        for name, kernel, consts, tile in jobs:
            report = compile_one(kernel, dtype, consts, tile, args.arch)
            failed |= not report.endswith(": ok")
            print(f"{name}: {report}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
