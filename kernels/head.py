"""Triton kernels of the BagNet head: the spatial mean of the last feature map (avg_pool=True; the
small (N, C) × (C, K) linear that follows runs in torch) and per-patch logits for all or selected
classes (avg_pool=False, heatmaps). Only ``@triton.jit`` code; the launchers are
``bagnet_fast.ops.triton_ops.spatial_mean_linear`` and ``.patch_logits``."""

import triton
import triton.language as tl


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
    mask_c = offs_c < channels
    offs_p = tl.arange(0, BLOCK_P)
    n_pix = height * width

    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(0, n_pix, BLOCK_P):
        pix = p0 + offs_p
        h = pix // width
        w = pix % width
        tile = tl.load(
            x_ptr + n * stride_xn + (h * stride_xh + w * stride_xw)[:, None] + offs_c[None, :] * stride_xc,
            mask=(pix < n_pix)[:, None] & mask_c[None, :],
            other=0.0,
        )
        acc += tile.to(tl.float32)
    total = tl.sum(acc, axis=0)
    tl.store(mean_ptr + n * channels + offs_c, total / n_pix, mask=mask_c)


@triton.jit
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
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < n_pixels
    mask_n = offs_n < n_classes
    rows = offs_m.to(tl.int64)
    cls = tl.load(cls_ptr + offs_n, mask=mask_n, other=0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, channels, BLOCK_K):
        cc = k0 + offs_k
        mask_k = cc < channels
        a = tl.load(
            x_ptr + rows[:, None] * stride_xm + cc[None, :] * stride_xc,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        # B[c, j] = W[cls[j], c]: a transposed gather of the selected weight rows.
        b = tl.load(
            w_ptr + cc[:, None] * stride_wc + cls[None, :] * stride_wk,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    acc += tl.load(b_ptr + cls, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * n_classes + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )
