"""Triton kernel of the ``pointwise_bottleneck`` unit: a whole 1×1-only BagNet bottleneck per tile
of pixels, both intermediates kept on chip. Only ``@triton.jit`` code; the launcher (tile
configurations, autotuning, and the split into three GEMMs for wide blocks) is
``bagnet_fast.ops.triton_ops.pointwise_bottleneck``.

Why the launcher fuses only blocks with P <= 128 (BagNet stages 1-2; P <= 64 in fp32) and runs
P = 256/512 (stages 3-4) as three 1×1 ``conv_bias_act`` GEMMs instead. Budget per SM on H100/H200: 228 KB
shared memory (227 KB per block), 64 K 32-bit registers (at most 255 per thread).

Fused, t1 and t2 are [BLOCK_M, P] fp32 accumulators in registers, and the middle GEMM takes the
whole [P, P] W2 tile as one dot operand: Triton cannot slice a register tensor, so t1 can be
neither streamed along P as the K operand of the middle GEMM nor stored in pieces, and the last
GEMM needs all of t2 for every output-channel chunk.

- Stage 4 (C = 2048, P = 512), bf16, BLOCK_M = 64, 4 warps (one wgmma warpgroup): t1 alone is
  64·512·4 B = 128 KB = 256 registers per thread, t2 as much again: over the 255-register cap
  before any operand; 8 warps halve that to 128 + 128, still spilling. W2 is 512·512·2 B = 512 KB
  of shared memory against 227 KB. In fp32, double both. Not feasible; BLOCK_M = 32 leaves one
  128-thread program per SM and gives up wgmma (M = 64 per warpgroup).
- Stage 3 (P = 256), bf16, BLOCK_M = 64, 8 warps: t1 + t2 = 64 + 64 registers per thread plus
  their bf16 copies as dot operands (32 + 32); W2 = 128 KB of shared memory plus the pipelined
  stage-1 tiles (3 × (64·64 + 64·256)·2 B = 120 KB): over 227 KB unless stages are cut to one.
  fp32: W2 alone is 256 KB. Not feasible with any pipelining.
- Stage 2 (P = 128), bf16, BLOCK_M = 64, BLOCK_K = 64, BLOCK_N = 64, 4 warps, 3 stages:
  registers per thread (128 threads): during the middle dot t1's bf16 operand 32 + the t2
  accumulator 64 (t1's fp32 accumulator, 64, dies at the cast); during the last GEMM t2's bf16
  operand 32 + the chunk accumulator 32 + the residual tile 32: a peak near 100-160 with 4 warps,
  half that with 8. Shared memory: stage-1 tiles
  3 × (64·64 + 64·128)·2 B = 72 KB, W2 128·128·2 B = 32 KB, t1/t2 as dot operands 16 KB each,
  stage-3 W3 tiles 3 × 128·64·2 B = 48 KB: 184 KB even if nothing were reused. fp32 with
  2 stages and BLOCK_K = BLOCK_N = 32: 48 + 64 + 32 + 32 + 32 = 208 KB. Feasible.

Compiled for sm_90a (triton 3.8 ahead of time, ptxas -v; benchmarks/gpu_compile_check.py), the
bf16 candidates use 66-168 registers and 14-112 KB of shared memory, no spills (P = 128,
BLOCK_M = 64, 4 warps, 3 stages: 168 registers, 72 KB). fp32's "ieee" dot runs on the FMA units
with both operands in registers: at P = 128 every tile tried spilled (2-18 KB), at P = 64 the
32-pixel 8-warp tile uses 126 registers and no spills, so fp32 fuses only up to P = 64.

Unfused, a P = 256 block moves 3C + 4P = 16P elements per pixel instead of ~2C = 8P (x in,
y out; the residual re-read of x comes from L2), for 18·P² FLOP: 144 FLOP/B in bf16, close to the
H200's ridge point (~790 TFLOP/s / 4.8 TB/s ≈ 165 FLOP/B) but still mostly compute-bound, and at
P = 512 it is 288 FLOP/B. Stages 1-2 (P = 64/128: 72-144 FLOP/B fused, 36-72 unfused) sit below
the ridge, memory-bound: there fusion halves the traffic, and that is where it is used.
"""

import triton
import triton.language as tl

from .tiles import load_bias, load_tile, pixel_rows, relu, store_tile


@triton.jit(do_not_specialize=["n_pixels", "m_bucket"])
def _pointwise_bottleneck_kernel(
    x_ptr,  # input rows (M, C): pixel m = (n, h, w) of a channels-last (N, C, H, W) tensor
    w1_ptr,  # W1 (P, C): the 4c -> c reduction conv, any strides
    b1_ptr,  # b1 (P,)
    w2_ptr,  # W2 (P, P), any strides
    b2_ptr,  # b2 (P,)
    w3_ptr,  # W3 (C, P): the c -> 4c expansion conv, any strides
    b3_ptr,  # b3 (C,)
    y_ptr,  # output rows (M, C), same pixel order as x
    n_pixels,  # M = N * H * W
    channels,  # C (block input and output width, 4·P in BagNet)
    planes,  # P (bottleneck width)
    stride_xm, stride_xc,  # element strides of the x rows
    stride_ym, stride_yc,  # element strides of the y rows
    stride_w1o, stride_w1i,  # element strides of W1 (out, in)
    stride_w2o, stride_w2i,  # element strides of W2 (out, in)
    stride_w3o, stride_w3i,  # element strides of W3 (out, in)
    m_bucket,  # size class of n_pixels: an autotuning key only, unused here
    INPUT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" keeps fp32 exact on GPUs (no tf32)
    P_PAD: tl.constexpr,  # P rounded up to a power of two (16..128): width of the on-chip intermediates
    BLOCK_M: tl.constexpr,  # pixels per program (>= 16, power of two)
    BLOCK_K: tl.constexpr,  # input-channel chunk of the C-wide reduction (>= 16, power of two)
    BLOCK_N: tl.constexpr,  # output-channel chunk of the C-wide expansion (>= 16, power of two)
):
    """For each pixel row x (length C):

        t1 = relu(W1 x + b1)          (P)   streamed over C in BLOCK_K chunks
        t2 = relu(W2 t1 + b2)         (P)   one [BLOCK_M, P_PAD] × [P_PAD, P_PAD] dot
        y  = relu(W3 t2 + b3 + x)     (C)   produced in BLOCK_N output-channel chunks

    t1 and t2 ([BLOCK_M, P_PAD] fp32) never leave the program; x is read twice (the reduction and
    the residual epilogue, the second time from L2) and y written once, instead of 2 + 2 + 3
    tensor passes for three separate convs. Padded lanes of t1/t2 (P <= p < P_PAD) are exactly 0
    because the masked weight and bias loads return 0, and relu(0) = 0, so they add nothing
    downstream (in a pixel whose x holds a NaN they are NaN, as is every real lane there). The weights are read through their strides as the transposed B operands
    (W1ᵀ[c, p] = W1[p, c]), so the launcher passes the conv weights without copies.
    """
    pix, mask_m = pixel_rows(tl.program_id(0), BLOCK_M, n_pixels)
    x_rows = pix * stride_xm
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, P_PAD)
    mask_p = offs_p < planes

    # t1 = relu(x W1ᵀ + b1), the reduction over C streamed in BLOCK_K chunks.
    t1 = tl.full((BLOCK_M, P_PAD), 0.0, tl.float32)
    for k0 in range(0, channels, BLOCK_K):
        cc = k0 + offs_k
        xa = load_tile(x_ptr, x_rows, cc, stride_xc, mask_m, channels)  # [BLOCK_M, BLOCK_K]
        w1 = load_tile(w1_ptr, cc * stride_w1i, offs_p, stride_w1o, cc < channels, planes)  # [BLOCK_K, P_PAD]
        t1 = tl.dot(xa.to(w1.dtype), w1, t1, input_precision=INPUT_PRECISION)
    t1 = relu(t1 + load_bias(b1_ptr, offs_p, planes))

    # t2 = relu(t1 W2ᵀ + b2): the whole [P_PAD, P_PAD] W2ᵀ in one dot (see the module docstring).
    w2 = load_tile(w2_ptr, offs_p * stride_w2i, offs_p, stride_w2o, mask_p, planes)
    t2 = tl.dot(t1.to(w2.dtype), w2, input_precision=INPUT_PRECISION)
    t2 = relu(t2 + load_bias(b2_ptr, offs_p, planes)).to(w2.dtype)

    # y = relu(t2 W3ᵀ + b3 + x), one output-channel chunk at a time, pipelined by hand one chunk
    # ahead: the MMA and the residual load of chunk i + 1 are issued before chunk i's epilogue,
    # so the epilogue's loads and stores overlap the tensor cores. Written as one loop with the
    # epilogue after the MMA, each wgmma was waited for at once (pendings = 0 in the TTGIR) and
    # the residual load stalled after it. C is a multiple of BLOCK_N for BagNet; a ragged C
    # masks the last chunk.
    y_rows = pix * stride_ym
    cc = offs_n
    acc = tl.dot(t2, load_tile(w3_ptr, offs_p * stride_w3i, cc, stride_w3o, mask_p, channels),
                 input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]
    residual = load_tile(x_ptr, x_rows, cc, stride_xc, mask_m, channels)
    for n0 in range(BLOCK_N, channels, BLOCK_N):
        following = n0 + offs_n
        w3 = load_tile(w3_ptr, offs_p * stride_w3i, following, stride_w3o, mask_p, channels)  # [P_PAD, BLOCK_N]
        acc_following = tl.dot(t2, w3, input_precision=INPUT_PRECISION)
        residual_following = load_tile(x_ptr, x_rows, following, stride_xc, mask_m, channels)
        _expansion_epilogue(acc, residual, b3_ptr, y_ptr, y_rows, cc, stride_yc, mask_m, channels)
        acc, residual, cc = acc_following, residual_following, following
    _expansion_epilogue(acc, residual, b3_ptr, y_ptr, y_rows, cc, stride_yc, mask_m, channels)


@triton.jit
def _expansion_epilogue(acc, residual, b3_ptr, y_ptr, y_rows, cc, stride_yc, mask_m, channels):
    """y[:, cc] = relu(acc + b3[cc] + residual), the last GEMM's epilogue for one output chunk."""
    out = acc + load_bias(b3_ptr, cc, channels) + residual.to(tl.float32)
    store_tile(y_ptr, y_rows, cc, stride_yc, mask_m, channels, relu(out))
