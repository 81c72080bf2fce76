"""Triton kernel of the ``conv_bias_act`` unit: valid k×k conv (k ∈ {1, 3}, stride ∈ {1, 2}) as an
implicit GEMM on channels-last activations, + bias, optional residual (cropped top-left), optional
ReLU; with HAS_DOWNSAMPLE a second 1×1 GEMM over another input added into the same accumulator
(a block's conv3 and its downsample as one GEMM over the concatenated reduction: the downsample's
output never goes to memory); with MEAN_OUTPUT the per-image spatial mean of the result instead
of the result (the last block's conv3 fused with the head of avg_pool=True: the widest map is
never written). Only ``@triton.jit`` code; the launchers (tile configurations, autotuning) are
``bagnet_fast.ops.triton_ops.conv_bias_act``, ``.conv_downsample_bias_act`` and
``.pointwise_bottleneck_mean``."""

import triton
import triton.language as tl

from .tiles import add, grouped_tile, load_bias, load_gather, load_tile, pixel_coords, pixel_rows, relu, store_tile


@triton.jit(do_not_specialize=["n_pixels", "h_out", "w_out", "m_bucket"])
def _conv_bias_act_kernel(
    x_ptr,  # input activations, logical (N, Cin, H, W), any strides (channels-last in practice)
    w_ptr,  # weight (Cout, Cin, k, k), any strides (channels-last in practice: Cin contiguous)
    b_ptr,  # bias (Cout,) (with HAS_DOWNSAMPLE: the conv's and the downsample's, summed)
    r_ptr,  # residual, logical (N, Cout, Hr >= Ho, Wr >= Wo); a dummy pointer if not HAS_RESIDUAL
    d_ptr,  # downsample input, logical (N, Cd, Ho, Wo), any strides; a dummy if not HAS_DOWNSAMPLE
    wd_ptr,  # downsample weight (Cout, Cd), any strides; a dummy if not HAS_DOWNSAMPLE
    y_ptr,  # output, logical (N, Cout, Ho, Wo), any strides (channels-last in practice)
    n_pixels,  # N * Ho * Wo: the GEMM M dimension (output pixels)
    c_in,  # Cin: the reduction runs over Cin * KSIZE * KSIZE
    c_out,  # Cout: the GEMM N dimension
    c_down,  # Cd: the downsample's reduction (0 if not HAS_DOWNSAMPLE)
    h_out,  # Ho = (H - KSIZE) // STRIDE + 1
    w_out,  # Wo = (W - KSIZE) // STRIDE + 1
    stride_xn, stride_xc, stride_xh, stride_xw,  # element strides of x
    stride_wo, stride_wi, stride_wh, stride_ww,  # element strides of the weight: Cout, Cin, kh, kw
    stride_rn, stride_rc, stride_rh, stride_rw,  # element strides of the residual (ignored if none)
    stride_dn, stride_dc, stride_dh, stride_dw,  # element strides of the downsample input (ignored if none)
    stride_wdo, stride_wdi,  # element strides of the downsample weight: Cout, Cd (ignored if none)
    stride_yn, stride_yc, stride_yh, stride_yw,  # element strides of y
    m_bucket,  # size class of n_pixels: an autotuning key only, unused here
    inv_image_pixels,  # 1 / (Ho * Wo), for MEAN_OUTPUT
    KSIZE: tl.constexpr,  # kernel size k (1 or 3)
    STRIDE: tl.constexpr,  # conv stride (1, 2, or 4 where the plan moved a stride up)
    FLAT_TAPS: tl.constexpr,  # reduce over (kh, kw, ci) flattened: for Cin·k·k <= BLOCK_K-ish (the stem's 27)
    HAS_RESIDUAL: tl.constexpr,  # add residual[:, :, :Ho, :Wo] before the activation
    HAS_DOWNSAMPLE: tl.constexpr,  # add the 1x1 GEMM d · Wdᵀ before the activation
    APPLY_RELU: tl.constexpr,  # apply relu last (NaN kept, as torch.relu)
    MEAN_OUTPUT: tl.constexpr,  # y_ptr is a zeroed fp32 (N, Cout): add each image's spatial mean
    INPUT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" keeps fp32 exact on GPUs (no tf32)
    BLOCK_M: tl.constexpr,  # output pixels per program (>= 16, power of two)
    BLOCK_N: tl.constexpr,  # output channels per program (>= 16, power of two)
    BLOCK_K: tl.constexpr,  # input channels per reduction step (>= 16, power of two)
    GROUP_M: tl.constexpr,  # pixel tiles per launch-order group (tiles.grouped_tile)
):
    """y[n, co, ho, wo] = act(b[co] + Σ_{kh, kw, ci} x[n, ci, s·ho + kh, s·wo + kw] · W[co, ci, kh, kw]
                            (+ Σ_cd d[n, cd, ho, wo] · Wd[co, cd]) (+ r[n, co, ho, wo]))

    Implicit GEMM: rows m = (n, ho, wo) flattened, columns co, reduction over (kh, kw, ci). For a
    fixed tap (kh, kw) the A tile is a strided gather of channel vectors x[n, :, s·ho+kh, s·wo+kw],
    contiguous along ci in channels-last memory, so every tap is one [BLOCK_M, BLOCK_K] ×
    [BLOCK_K, BLOCK_N] dot. The conv is valid (no padding): every tap of a valid output pixel is
    in bounds, so only the ragged pixel/channel edges are masked. Reading the residual at
    (ho, wo) through its own strides is exactly the top-left crop. Accumulation is fp32. One
    program per (pixel tile, channel tile) of a 1-D grid in grouped order (tiles.grouped_tile).
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), n_pixels, c_out, BLOCK_M, BLOCK_N, GROUP_M)
    pix, mask_m = pixel_rows(pid_m, BLOCK_M, n_pixels)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < c_out
    offs_k = tl.arange(0, BLOCK_K)
    n, ho, wo = pixel_coords(pix, h_out, w_out)
    # Offset of tap (0, 0) of each output pixel in x.
    x_row = n * stride_xn + (ho * STRIDE) * stride_xh + (wo * STRIDE) * stride_xw

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if FLAT_TAPS:
        # The stem (Cin = 3): per tap only 3 of a 16-wide chunk would be real (9 chunks, 144
        # reduction lanes for 27: 5.3x the MMA work); flattened, r = (kh·k + kw)·Cin + ci
        # runs over 27 lanes of one 32-wide chunk, each lane its own gather offset.
        reduction = c_in * KSIZE * KSIZE
        for r0 in range(0, reduction, BLOCK_K):
            r = r0 + offs_k
            ci = r % c_in
            tap = r // c_in
            kh = tap // KSIZE
            kw = tap % KSIZE
            a = load_gather(x_ptr, x_row, kh * stride_xh + kw * stride_xw + ci * stride_xc, mask_m, r < reduction)
            w_rows = ci * stride_wi + kh * stride_wh + kw * stride_ww
            b = load_gather(w_ptr, w_rows, offs_n * stride_wo, r < reduction, mask_n)  # [BLOCK_K, BLOCK_N]
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        # One loop over (tap, channel chunk) rather than a loop per tap: the software pipeline
        # (num_stages) then runs across the taps. Per tap the channel loop is short (1-2 chunks
        # for the 64-channel convs) and each loop would fill and drain its own pipeline;
        # compiled for sm_90 the flat loop is one pipelined wgmma loop instead of nine.
        k_chunks = tl.cdiv(c_in, BLOCK_K)
        for step in range(0, KSIZE * KSIZE * k_chunks):
            if KSIZE == 1:  # one tap: no index arithmetic in the loop of the 1x1 GEMMs
                kh = 0
                kw = 0
                ci = step * BLOCK_K + offs_k
            else:
                tap = step // k_chunks
                kh = tap // KSIZE
                kw = tap % KSIZE
                ci = (step % k_chunks) * BLOCK_K + offs_k
            x_tap = x_row + kh * stride_xh + kw * stride_xw
            a = load_tile(x_ptr, x_tap, ci, stride_xc, mask_m, c_in)  # [BLOCK_M, BLOCK_K]
            w_rows = ci * stride_wi + kh * stride_wh + kw * stride_ww
            b = load_tile(w_ptr, w_rows, offs_n, stride_wo, ci < c_in, c_out)  # [BLOCK_K, BLOCK_N]
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if HAS_DOWNSAMPLE:
        # The rest of the concatenated reduction [W | Wd]·[x ; d]: the downsample's pixels
        # (the block input subsampled and cropped, a strided view) times its weight.
        d_row = n * stride_dn + ho * stride_dh + wo * stride_dw
        for k0 in range(0, c_down, BLOCK_K):
            cd = k0 + offs_k
            a = load_tile(d_ptr, d_row, cd, stride_dc, mask_m, c_down)  # [BLOCK_M, BLOCK_K]
            b = load_tile(wd_ptr, cd * stride_wdi, offs_n, stride_wdo, cd < c_down, c_out)  # [BLOCK_K, BLOCK_N]
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    acc += load_bias(b_ptr, offs_n, c_out)
    if HAS_RESIDUAL:
        r_row = n * stride_rn + ho * stride_rh + wo * stride_rw
        acc += load_tile(r_ptr, r_row, offs_n, stride_rc, mask_m, c_out).to(tl.float32)
    if APPLY_RELU:
        acc = relu(acc)
    if MEAN_OUTPUT:
        # The head of avg_pool=True without writing the map: the rows of this tile (pixels of
        # images first..last) are summed per image on chip, then one atomic add per (image,
        # channel) into the (N, Cout) means.
        acc = tl.where(mask_m[:, None], acc, 0.0) * inv_image_pixels
        image_pixels = h_out * w_out
        first_row = pid_m.to(tl.int64) * BLOCK_M
        last_row = tl.minimum(first_row + BLOCK_M, n_pixels) - 1
        for image in range(first_row // image_pixels, last_row // image_pixels + 1):
            part = tl.reduce(tl.where((n == image)[:, None], acc, 0.0), 0, add)
            tl.atomic_add(y_ptr + image * c_out + offs_n, part, mask=mask_n)
    else:
        y_row = n * stride_yn + ho * stride_yh + wo * stride_yw
        store_tile(y_ptr, y_row, offs_n, stride_yc, mask_m, c_out, acc)
