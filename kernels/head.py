"""Triton kernels of the BagNet head: the spatial mean of the last feature map (avg_pool=True; the
small (N, C) × (C, K) linear that follows runs in torch) and per-patch logits for all or selected
classes (avg_pool=False, heatmaps). Only ``@triton.jit`` code; the launchers are
``bagnet_fast.ops.triton_ops.spatial_mean_linear`` and ``.patch_logits``."""

import triton
import triton.language as tl

from .tiles import add, load_tile, pixel_rows, store_tile


@triton.jit
def _spatial_mean_kernel(
    x_ptr,  # input, logical (N, C, H, W), any strides (channels-last in practice)
    mean_ptr,  # output (N, C) contiguous, fp32
    channels,  # C
    height,  # H
    width,  # W
    stride_xn, stride_xc, stride_xh, stride_xw,  # element strides of x
    BLOCK_P: tl.constexpr,  # pixels per reduction step (power of two)
    BLOCK_C: tl.constexpr,  # channels per program (power of two)
):
    """mean[n, c] = (1 / (H·W)) Σ_{h, w} x[n, c, h, w], summed in fp32.

    One program per (image, channel block); in channels-last memory each [BLOCK_P, BLOCK_C] tile
    is BLOCK_P runs of BLOCK_C contiguous channels, so the loads coalesce along c.
    """
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = tl.arange(0, BLOCK_P)
    n_pix = height * width
    x_image = x_ptr + n * stride_xn

    acc = tl.full((BLOCK_P, BLOCK_C), 0.0, tl.float32)
    for p0 in range(0, n_pix, BLOCK_P):
        pix = p0 + offs_p
        rows = (pix // width) * stride_xh + (pix % width) * stride_xw
        acc += load_tile(x_image, rows, offs_c, stride_xc, pix < n_pix, channels).to(tl.float32)
    total = tl.reduce(acc, 0, add)
    tl.store(mean_ptr + n * channels + offs_c, total / n_pix, mask=offs_c < channels)


@triton.jit(do_not_specialize=["n_pixels"])
def _patch_logits_kernel(
    x_ptr,  # features as rows (M, C): pixel m = (n, h, w) of a channels-last (N, C, H, W) map
    w_ptr,  # classifier weight (K_all, C), any strides
    b_ptr,  # classifier bias (K_all,)
    cls_ptr,  # selected class indices (K,) int64 into the K_all rows of w and b
    y_ptr,  # output (M, K) contiguous = (N, H, W, K)
    n_pixels,  # M = N * H * W
    channels,  # C
    n_classes,  # K: number of selected classes
    stride_xm, stride_xc,  # element strides of the x rows
    stride_wk, stride_wc,  # element strides of w
    INPUT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" keeps fp32 exact on GPUs (no tf32)
    BLOCK_M: tl.constexpr,  # pixels per program (>= 16, power of two)
    BLOCK_N: tl.constexpr,  # classes per program (>= 16, power of two)
    BLOCK_K: tl.constexpr,  # channels per reduction step (>= 16, power of two)
):
    """y[m, j] = b[cls[j]] + Σ_c x[m, c] · W[cls[j], c]

    The class selection is a gather of weight rows inside the GEMM, so asking for a few classes
    reads only their rows and writes only their logits (no index_select copy of W).
    """
    pix, mask_m = pixel_rows(tl.program_id(0), BLOCK_M, n_pixels)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < n_classes
    cls = tl.load(cls_ptr + offs_n, mask=mask_n, other=0)
    x_rows = pix * stride_xm

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, channels, BLOCK_K):
        cc = k0 + offs_k
        a = load_tile(x_ptr, x_rows, cc, stride_xc, mask_m, channels)  # [BLOCK_M, BLOCK_K]
        # B[c, j] = W[cls[j], c]: a transposed gather of the selected weight rows. Masked class
        # lanes gather row cls = 0 and are dropped by the store mask.
        b = tl.load(
            w_ptr + cc[:, None] * stride_wc + cls[None, :] * stride_wk,
            mask=(cc < channels)[:, None],
            other=0.0,
        )  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    acc += tl.load(b_ptr + cls, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    store_tile(y_ptr, pix * n_classes, offs_n, 1, mask_m, n_classes, acc)
