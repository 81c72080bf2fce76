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
def load_tile(ptr, row_offsets, cols, stride_col, row_mask, n_cols):
    """tile[i, j] = ptr[row_offsets[i] + cols[j] * stride_col], 0 where row_mask[i] is False or
    cols[j] >= n_cols (the ragged edges; masked lanes contribute 0 to every dot)."""
    return tl.load(
        ptr + row_offsets[:, None] + cols[None, :] * stride_col,
        mask=row_mask[:, None] & (cols < n_cols)[None, :],
        other=0.0,
    )


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
