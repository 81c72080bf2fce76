"""``@triton.jit`` helpers shared by the kernels of this folder: masked 2-D tile loads/stores
through element strides, pixel-index arithmetic, and bias vectors. Only ``@triton.jit`` code.

The kernels use builtins (tl.full, tl.reduce with :func:`add`) rather than triton's own
``@jit`` helpers (tl.zeros, tl.sum): those are compiled or interpreted according to
TRITON_INTERPRET when triton is *first* imported, which in a test process can be before the
interpreter is asked for (torch.utils.flop_counter imports triton), and then the interpreter
cannot run them. Kernels decorated here follow TRITON_INTERPRET as it is when they are imported.
"""

import triton
import triton.language as tl


@triton.jit
def add(a, b):
    """Combine function of tl.reduce sums."""
    return a + b


@triton.jit
def relu(x):
    """max(x, 0) that keeps NaN, as torch.relu does. tl.maximum's default (PropagateNan.NONE)
    lowers to a NaN-dropping max (max.f32 / np.fmax): a NaN input would come out as 0 and
    disappear from the logits."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def load_gather(ptr, row_offsets, col_offsets, row_mask, col_mask):
    """tile[i, j] = ptr[row_offsets[i] + col_offsets[j]], 0 where row_mask[i] or col_mask[j] is
    False (masked lanes contribute 0 to every dot)."""
    return tl.load(
        ptr + row_offsets[:, None] + col_offsets[None, :],
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    )


@triton.jit
def load_tile(ptr, row_offsets, cols, stride_col, row_mask, n_cols):
    """tile[i, j] = ptr[row_offsets[i] + cols[j] * stride_col], 0 where row_mask[i] is False or
    cols[j] >= n_cols (the ragged edges)."""
    return load_gather(ptr, row_offsets, cols * stride_col, row_mask, cols < n_cols)


@triton.jit
def store_tile(ptr, row_offsets, cols, stride_col, row_mask, n_cols, value):
    """ptr[row_offsets[i] + cols[j] * stride_col] = value[i, j] (cast to ptr's dtype) inside the
    same mask as :func:`load_tile`."""
    tl.store(
        ptr + row_offsets[:, None] + cols[None, :] * stride_col,
        value.to(ptr.dtype.element_ty),
        mask=row_mask[:, None] & (cols < n_cols)[None, :],
    )


@triton.jit
def load_bias(ptr, cols, n_cols):
    """bias[cols] as an fp32 row vector [1, len(cols)], 0 past n_cols."""
    return tl.load(ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]


@triton.jit
def grouped_tile(pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` of a 1-D grid over the output tiles, in groups
    of GROUP_M row tiles (the swizzle of triton's matmul tutorial): consecutive programs take
    every column tile of a group before the next group, so the programs resident together read
    the same few activation tiles (from L2, not HBM) while the weights (<= 4.7 MB for BagNet)
    stay in L2 throughout. With the row tile fastest (a 2-D grid) each activation tile is read
    from HBM once per column tile: 2-16x for BagNet's GEMMs, whose activations (0.15-1.6 GB at
    batch 256) dwarf the L2 (60 MB on the H200). The last group may be shorter (ragged row-tile count)."""
    tiles_m = tl.cdiv(n_rows, BLOCK_M)
    tiles_n = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def pixel_rows(pid, BLOCK_M: tl.constexpr, n_pixels):
    """The BLOCK_M flattened pixel indices of program ``pid`` (int64: N·H·W·C exceeds 2**31 for
    large batches of 224² images) and their in-range mask."""
    pix = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    return pix, pix < n_pixels


@triton.jit
def pixel_coords(pix, height, width):
    """(n, h, w) of flattened pixel indices pix = (n·height + h)·width + w."""
    w = pix % width
    h = (pix // width) % height
    n = pix // (width * height)
    return n, h, w
