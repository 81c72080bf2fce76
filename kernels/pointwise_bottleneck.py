"""Triton kernel of the ``pointwise_bottleneck`` unit: a whole 1×1-only BagNet bottleneck per tile
of pixels, intermediates kept on chip. Only ``@triton.jit`` code; the launcher is
``bagnet_fast.ops.triton_ops.pointwise_bottleneck``."""

import triton
import triton.language as tl


@triton.jit
def _pointwise_bottleneck_kernel(
    x_ptr,  # input rows (M, C): pixel m = (n, h, w) of a channels-last (N, C, H, W) tensor
    w1_ptr,  # W1ᵀ (C, P) contiguous: the 4c -> c reduction conv
    b1_ptr,  # b1 (P,)
    w2_ptr,  # W2ᵀ (P, P) contiguous
    b2_ptr,  # b2 (P,)
    w3_ptr,  # W3ᵀ (P, C) contiguous: the c -> 4c expansion conv
    b3_ptr,  # b3 (C,)
    y_ptr,  # output rows (M, C), same pixel order as x
    n_pixels,  # M = N * H * W
    channels,  # C (block input and output width, 4·P in BagNet)
    planes,  # P (bottleneck width)
    stride_xm, stride_xc,  # element strides of the x rows
    stride_ym, stride_yc,  # element strides of the y rows
    INPUT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" keeps fp32 exact on GPUs (no tf32)
    BLOCK_M: tl.constexpr,  # pixels per program (>= 16, power of two)
    BLOCK_C: tl.constexpr,  # channel chunk of the C-wide reduction and of the C-wide output (>= 16)
    P_PAD: tl.constexpr,  # P rounded up to a power of two (>= 16): width of the on-chip intermediates
):
    """For each pixel row x (length C):

        t1 = relu(W1 x + b1)          (P)   streamed over C in BLOCK_C chunks
        t2 = relu(W2 t1 + b2)         (P)   one [BLOCK_M, P_PAD] × [P_PAD, P_PAD] dot
        y  = relu(W3 t2 + b3 + x)     (C)   produced in BLOCK_C output chunks

    t1 and t2 ([BLOCK_M, P_PAD] fp32) never leave the program; x is read twice (the reduction and
    the residual epilogue) and y written once, instead of 2 + 2 + 3 tensor passes for three
    separate convs. Padded lanes of t1/t2 (P <= p < P_PAD) are exactly 0 because the masked weight
    and bias loads return 0, and relu(0) = 0, so they add nothing downstream.
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_pixels
    rows = offs_m.to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = tl.arange(0, P_PAD)
    mask_p = offs_p < planes

    # t1 = relu(x W1ᵀ + b1), reduction over C streamed in chunks.
    t1 = tl.zeros((BLOCK_M, P_PAD), dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        cc = c0 + offs_c
        mask_c = cc < channels
        xa = tl.load(
            x_ptr + rows[:, None] * stride_xm + cc[None, :] * stride_xc,
            mask=mask_m[:, None] & mask_c[None, :],
            other=0.0,
        )
        w1 = tl.load(
            w1_ptr + cc[:, None] * planes + offs_p[None, :],
            mask=mask_c[:, None] & mask_p[None, :],
            other=0.0,
        )
        t1 = tl.dot(xa.to(w1.dtype), w1, t1, input_precision=INPUT_PRECISION)
    t1 = tl.maximum(t1 + tl.load(b1_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :], 0.0)

    # t2 = relu(t1 W2ᵀ + b2).
    w2 = tl.load(
        w2_ptr + offs_p[:, None] * planes + offs_p[None, :],
        mask=mask_p[:, None] & mask_p[None, :],
        other=0.0,
    )
    t2 = tl.dot(t1.to(w2.dtype), w2, input_precision=INPUT_PRECISION)
    t2 = tl.maximum(t2 + tl.load(b2_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :], 0.0)
    t2 = t2.to(w2.dtype)

    # y = relu(t2 W3ᵀ + b3 + x), one output-channel chunk at a time.
    for c0 in range(0, channels, BLOCK_C):
        cc = c0 + offs_c
        mask_c = cc < channels
        mask_out = mask_m[:, None] & mask_c[None, :]
        w3 = tl.load(
            w3_ptr + offs_p[:, None] * channels + cc[None, :],
            mask=mask_p[:, None] & mask_c[None, :],
            other=0.0,
        )
        out = tl.dot(t2, w3, input_precision=INPUT_PRECISION)
        out += tl.load(b3_ptr + cc, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        res = tl.load(x_ptr + rows[:, None] * stride_xm + cc[None, :] * stride_xc, mask=mask_out, other=0.0)
        out = tl.maximum(out + res.to(tl.float32), 0.0)
        tl.store(
            y_ptr + rows[:, None] * stride_ym + cc[None, :] * stride_yc,
            out.to(y_ptr.dtype.element_ty),
            mask=mask_out,
        )
