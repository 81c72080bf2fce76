"""Compile every candidate tile of the Triton GEMM kernels for sm_90 (H100/H200) without a GPU and
report, per program: shared memory, registers and spills (ptxas -v); whether the main loop is on
the tensor cores (wgmma instructions in the PTX; tiles of fewer than 64 rows, below wgmma's
64-row warpgroup, use mma.sync); the most wgmma groups any wait leaves in flight
(``warp_group_dot_wait {pendings = N}`` in the TTGIR: 0 everywhere means every MMA is waited
for at once); and the cp.async copies. The resource budget of kernels/pointwise_bottleneck.py
checked by the compiler, before any device time is spent.

    python benchmarks/gpu_compile_check.py [--arch 90] [--dtypes bf16,fp32,tf32x3] [--quick]
    PYTHONPATH=/path/to/triton-3.6 python benchmarks/gpu_compile_check.py   # the GPU machine's triton

Uses triton's ahead-of-time compile (ASTSource + GPUTarget) and the ptxas bundled with triton.
Needs no GPU; TRITON_INTERPRET must be unset. Exits 1 if any compile fails, spills, exceeds the
shared memory, or a 16-bit/tf32x3 GEMM is not on the tensor cores.
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
FLOAT_ARGS = {"inv_image_pixels"}
# What the JIT sees at a real call on channels-last BagNet tensors: unit strides along channels
# (specialized to the constant 1), every other stride, channel count and pointer divisible by 16
# (tt.divisibility), except the arguments the kernels exclude from specialization.
UNIT_STRIDES = {"stride_xc", "stride_yc", "stride_rc", "stride_dc", "stride_wi", "stride_wdi",
                "stride_w1i", "stride_w2i", "stride_w3i"}
NOT_DIVISIBLE = {"n_pixels", "h_out", "w_out", "m_bucket"}
# The stem (Cin = 3): its pixel and weight strides are multiples of 3, not of 16.
STEM_NOT_DIVISIBLE = {"c_in", "stride_xw", "stride_xh", "stride_xn", "stride_wo", "stride_wh", "stride_ww"}


def signature(kernel, dtype: str, constexprs: dict, not_divisible=frozenset()):
    """(signature, attrs) of ``kernel`` for an ahead-of-time compile, as the JIT would specialize."""
    sig, attrs = {}, {}
    element = "fp32" if dtype == "tf32x3" else dtype  # tf32x3: fp32 tensors
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            # MEAN_OUTPUT: y is the fp32 (N, C) means; with HAS_DOWNSAMPLE the joint bias is fp32.
            fp32 = (name == "y_ptr" and constexprs.get("MEAN_OUTPUT")) or (name == "b_ptr" and constexprs.get("HAS_DOWNSAMPLE"))
            sig[name] = "*fp32" if fp32 else "*" + element
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i64" if name in INT64_ARGS else "i32"
        if name not in NOT_DIVISIBLE and name not in not_divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, attrs


def ptxas_usage(ptx: str, arch: int) -> dict:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", str(path), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True)
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill": (int(spill.group(1)), int(spill.group(2))) if spill else None}


def compile_one(kernel, dtype: str, constexprs: dict, tile, arch: int, not_divisible=frozenset()) -> dict:
    consts = dict(constexprs, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
    consts.update({name: 1 for name in UNIT_STRIDES if name in kernel.arg_names})
    sig, attrs = signature(kernel, dtype, consts, not_divisible)
    src = ASTSource(kernel, sig, constexprs=consts, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})
    except Exception as error:  # noqa: BLE001 - reported per tile
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    pendings = [int(p) for p in re.findall(r"warp_group_dot_wait.*?pendings = (\d+)", ttgir)]
    return {"shared": compiled.metadata.shared, **ptxas_usage(ptx, arch),
            "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)), "mma_sync": len(re.findall(r"mma\.sync", ptx)),
            "max_pendings": max(pendings, default=None),
            "cp_async": len(re.findall(r"cp\.async\.(?:cg|ca)", ptx))}


def verdict(report: dict, needs_tensor_cores: bool) -> str:
    if "error" in report:
        return "FAILED: " + report["error"]
    problems = []
    if report["shared"] > SHARED_LIMIT:
        problems.append("OVER the shared-memory limit")
    if report["spill"] is None or report["spill"] != (0, 0):
        problems.append("SPILLS" if report["spill"] else "no ptxas report")
    if needs_tensor_cores and not (report["wgmma"] or report["mma_sync"]):
        problems.append("NOT on the tensor cores")
    return "; ".join(problems) or "ok"


def describe(report: dict) -> str:
    if "error" in report:
        return ""
    spill = report["spill"] or ("?", "?")
    return (f"shared {report['shared'] / 1024:.1f} KB, regs {report['regs']}, spill st/ld {spill[0]}/{spill[1]} B, "
            f"wgmma {report['wgmma']}, mma.sync {report['mma_sync']}, max pendings {report['max_pendings']}, cp.async {report['cp_async']}")


# --dtypes names: (tile table of triton_tuning, tl.dot input_precision).
MODES = {"bf16": ("16bit", "tf32"), "fp16": ("16bit", "tf32"), "fp32": ("fp32", "ieee"), "tf32x3": ("fp32_mma", "tf32x3")}


VARIANT_CONSTEXPRS = ("KSIZE", "STRIDE", "FLAT_TAPS", "HAS_RESIDUAL", "HAS_DOWNSAMPLE", "MEAN_OUTPUT")


def conv_jobs(dtype: str, quick: bool):
    """(name, kernel, constexprs, tile, not divisible) for every conv variant the plan launches."""
    dclass, precision = MODES[dtype]
    conv = triton_ops._conv_kernels._conv_bias_act_kernel
    base = dict(KSIZE=1, STRIDE=1, FLAT_TAPS=False, HAS_RESIDUAL=False, HAS_DOWNSAMPLE=False, APPLY_RELU=True,
                MEAN_OUTPUT=False, INPUT_PRECISION=precision, GROUP_M=triton_tuning.GROUP_M)
    variants = [
        # (label, constexprs, Cout, reduction, arguments not multiples of 16); every combination
        # the plans launch (tests/test_compile_budget.py checks against their recorded launches)
        ("k3 s1", dict(KSIZE=3), 2048, 64, set()),
        ("k3 s2", dict(KSIZE=3, STRIDE=2), 2048, 128, set()),
        ("k3 s4", dict(KSIZE=3, STRIDE=4), 2048, 128, set()),  # BagNet-9's layer2.0: stride moved up
        ("stem k3 flat", dict(KSIZE=3, FLAT_TAPS=True), 64, 27, STEM_NOT_DIVISIBLE),
        ("k1", {}, 512, 2048, set()),  # conv1/conv2 of the split stage-3/4 blocks
        ("k1 residual", dict(HAS_RESIDUAL=True), 2048, 512, set()),
        ("k1 downsample", dict(HAS_DOWNSAMPLE=True), 2048, 512, set()),
        ("k1 residual mean", dict(HAS_RESIDUAL=True, MEAN_OUTPUT=True), 2048, 512, set()),
    ]
    for tile in triton_tuning.CONV_TILES[dclass][: 1 if quick else None]:
        for label, consts, c_out, reduction, not_divisible in variants:
            fitted = triton_tuning.fit((tile,), c_out, reduction)[0]
            yield f"conv {dtype} {label} {fitted}", conv, dict(base, **consts), fitted, frozenset(not_divisible)


def pointwise_jobs(dtype: str, quick: bool):
    dclass, precision = MODES[dtype]
    pointwise = triton_ops._bottleneck_kernels._pointwise_bottleneck_kernel
    for p_pad in (p for p in (64, 128) if p <= triton_tuning.FUSED_MAX_PLANES[dclass]):
        tiles = triton_tuning.fit(triton_tuning.POINTWISE_TILES[dclass], 4 * p_pad, 4 * p_pad,
                                  triton_tuning.POINTWISE_MAX_INTERMEDIATE // p_pad)
        for tile in tiles[: 1 if quick else None]:
            yield (f"pointwise {dtype} P={p_pad} {tile}", pointwise,
                   dict(P_PAD=p_pad, INPUT_PRECISION=precision), tile, frozenset())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", default="bf16,fp32,tf32x3")
    parser.add_argument("--quick", action="store_true", help="the first candidate tile of each op only")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_{args.arch}a", flush=True)
    failed = False
    for dtype in args.dtypes.split(","):
        for name, kernel, consts, tile, not_divisible in [*conv_jobs(dtype, args.quick), *pointwise_jobs(dtype, args.quick)]:
            report = compile_one(kernel, dtype, consts, tile, args.arch, not_divisible)
            result = verdict(report, needs_tensor_cores=dtype != "fp32")
            failed |= result != "ok"
            print(f"{name}: {describe(report)}: {result}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
