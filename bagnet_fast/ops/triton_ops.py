"""Triton backend of the fused BagNet units: host launchers for the kernels in ``kernels/``
(installed as ``bagnet_fast.kernels``), registered as ``torch.ops.bagnet_fast.triton_<name>`` with
``torch.library.triton_op`` so torch.compile can trace them.

The public functions carry the names and signatures of :mod:`bagnet_fast.ops.reference`.
Importing this module imports triton; ``import bagnet_fast`` never imports this module. Without a
GPU, set ``TRITON_INTERPRET=1`` before the first triton import and pass CPU tensors (test in fp32:
the interpreter has no bf16 dot).

Tile sizes are chosen per call by simple rules, no autotuning: every tl.dot dimension is a power
of two >= 16 (``_check_dot_tile``), because the interpreter accepts smaller tiles that then fail
to compile on a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

import torch
import triton

__all__ = ["conv_bias_act", "pointwise_bottleneck", "spatial_mean_linear", "patch_logits"]

_KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"


def _load_kernels(name: str) -> ModuleType:
    """bagnet_fast.kernels.<name>; from the source tree's kernels/<name>.py when the package mapping
    is missing (a source checkout on PYTHONPATH, not pip-installed: only an install maps
    package_dir={"bagnet_fast.kernels": "kernels"})."""
    try:
        return importlib.import_module(f"bagnet_fast.kernels.{name}")
    except ModuleNotFoundError:
        path = _KERNEL_DIR / f"{name}.py"
        if not path.is_file():
            raise
    module_name = f"_bagnet_fast_kernels_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


_conv_kernels = _load_kernels("conv_bias_act")
_bottleneck_kernels = _load_kernels("pointwise_bottleneck")
_head_kernels = _load_kernels("head")


def _check_dot_tile(**tiles: int) -> None:
    """tl.dot needs power-of-two tile dimensions >= 16 on GPUs; the interpreter does not check."""
    for name, size in tiles.items():
        assert size >= 16 and size & (size - 1) == 0, f"tl.dot tile {name}={size} must be a power of two >= 16"


def _pow2_clamp(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 tl.dot defaults to tf32 on GPUs (10-bit mantissa, ~1e-3 relative): far outside the 1e-5
    # fp32 parity budget, so fp32 asks for exact products. Ignored for bf16/fp16 inputs.
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) pixel rows; a view when t is channels-last."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c)


@torch.library.triton_op("bagnet_fast::triton_conv_bias_act", mutates_args=())
def _triton_conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride: int = 1,
    relu: bool = True,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    torch._check(x.dim() == 4, lambda: "x must be 4-D (N, Cin, H, W)")
    n, c_in, height, width = x.shape
    c_out, w_cin, k, k2 = weight.shape
    torch._check(w_cin == c_in and k == k2 and k in (1, 3), lambda: f"bad weight shape {tuple(weight.shape)}")
    torch._check(stride in (1, 2), lambda: f"stride must be 1 or 2, got {stride}")
    torch._check(height >= k and width >= k, lambda: "input smaller than the kernel")
    h_out = (height - k) // stride + 1
    w_out = (width - k) // stride + 1
    if residual is not None:
        torch._check(
            residual.dim() == 4
            and residual.shape[0] == n
            and residual.shape[1] == c_out
            and residual.shape[2] >= h_out
            and residual.shape[3] >= w_out,
            lambda: f"residual {tuple(residual.shape)} cannot be cropped to {(n, c_out, h_out, w_out)}",
        )

    # (N, Cout, Ho, Wo) channels-last
    y = torch.empty((n, c_out, h_out, w_out), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    # (k, k, Cin, Cout): each tap's [Cin, Cout] slab is a contiguous GEMM B operand.
    w_packed = weight.to(x.dtype).permute(2, 3, 1, 0).contiguous()
    b = bias.to(x.dtype).contiguous()
    r = residual if residual is not None else y  # dummy pointer, never read

    n_pixels = n * h_out * w_out
    block_m = 64 if n_pixels >= 64 else 32
    block_n = _pow2_clamp(c_out, 16, 128)
    block_k = _pow2_clamp(c_in, 16, 32)
    _check_dot_tile(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    grid = (triton.cdiv(n_pixels, block_m), triton.cdiv(c_out, block_n))
    torch.library.wrap_triton(_conv_kernels._conv_bias_act_kernel)[grid](
        x, w_packed, b, r, y,
        n_pixels, c_in, c_out, h_out, w_out,
        *x.stride(), *r.stride(), *y.stride(),
        KSIZE=k,
        STRIDE=stride,
        HAS_RESIDUAL=residual is not None,
        APPLY_RELU=relu,
        INPUT_PRECISION=_input_precision(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return y


@torch.library.triton_op("bagnet_fast::triton_pointwise_bottleneck", mutates_args=())
def _triton_pointwise_bottleneck(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
) -> torch.Tensor:
    torch._check(x.dim() == 4, lambda: "x must be 4-D (N, C, H, W)")
    n, channels, height, width = x.shape
    planes = w1.shape[0]
    torch._check(
        tuple(w1.shape) == (planes, channels, 1, 1)
        and tuple(w2.shape) == (planes, planes, 1, 1)
        and tuple(w3.shape) == (channels, planes, 1, 1),
        lambda: f"bad 1x1 weights {tuple(w1.shape)}, {tuple(w2.shape)}, {tuple(w3.shape)} for C={channels}",
    )
    dtype = x.dtype
    # Transposed to (Cin, Cout) so that every B operand row is contiguous.
    w1t = w1.to(dtype).reshape(planes, channels).t().contiguous()  # (C, P)
    w2t = w2.to(dtype).reshape(planes, planes).t().contiguous()  # (P, P)
    w3t = w3.to(dtype).reshape(channels, planes).t().contiguous()  # (P, C)

    y = torch.empty_like(x, memory_format=torch.channels_last)  # (N, C, H, W) channels-last
    x_rows, y_rows = _rows(x), _rows(y)  # (M, C)
    n_pixels = x_rows.shape[0]
    block_m = 32
    block_c = _pow2_clamp(channels, 16, 64)
    p_pad = _pow2_clamp(planes, 16, 1 << 30)
    _check_dot_tile(BLOCK_M=block_m, BLOCK_C=block_c, P_PAD=p_pad)
    grid = (triton.cdiv(n_pixels, block_m),)
    torch.library.wrap_triton(_bottleneck_kernels._pointwise_bottleneck_kernel)[grid](
        x_rows, w1t, b1.to(dtype).contiguous(), w2t, b2.to(dtype).contiguous(), w3t, b3.to(dtype).contiguous(),
        y_rows,
        n_pixels, channels, planes,
        *x_rows.stride(), *y_rows.stride(),
        INPUT_PRECISION=_input_precision(dtype),
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        P_PAD=p_pad,
        num_warps=4,
    )
    return y


@torch.library.triton_op("bagnet_fast::triton_spatial_mean_linear", mutates_args=())
def _triton_spatial_mean_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    torch._check(x.dim() == 4, lambda: "x must be 4-D (N, C, H, W)")
    n, channels, height, width = x.shape
    torch._check(weight.dim() == 2 and weight.shape[1] == channels, lambda: "weight must be (K, C)")
    mean = torch.empty((n, channels), device=x.device, dtype=torch.float32)  # (N, C) fp32
    block_c = _pow2_clamp(channels, 16, 128)
    block_p = _pow2_clamp(height * width, 1, 32)
    grid = (n, triton.cdiv(channels, block_c))
    torch.library.wrap_triton(_head_kernels._spatial_mean_kernel)[grid](
        x, mean, channels, height, width, *x.stride(),
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=4,
    )
    # (N, C) × (C, K): a few MFLOP, not worth a kernel of its own.
    return torch.addmm(bias.float(), mean, weight.float().t()).to(x.dtype)


@torch.library.triton_op("bagnet_fast::triton_patch_logits", mutates_args=())
def _triton_patch_logits(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    classes: Optional[list[int]] = None,
) -> torch.Tensor:
    torch._check(x.dim() == 4, lambda: "x must be 4-D (N, C, H, W)")
    n, channels, height, width = x.shape
    torch._check(weight.dim() == 2 and weight.shape[1] == channels, lambda: "weight must be (K, C)")
    if classes is None:
        index = torch.arange(weight.shape[0], device=x.device, dtype=torch.long)
    else:
        index = torch.as_tensor(list(classes), device=x.device, dtype=torch.long)
    n_classes = index.numel()
    w = weight.to(x.dtype)
    b = bias.to(x.dtype).contiguous()
    x_rows = _rows(x)  # (M, C)
    n_pixels = x_rows.shape[0]
    y = torch.empty((n, height, width, n_classes), device=x.device, dtype=x.dtype)  # (N, H, W, K)
    block_m = 64 if n_pixels >= 64 else 32
    block_n = _pow2_clamp(n_classes, 16, 128)
    block_k = _pow2_clamp(channels, 16, 32)
    _check_dot_tile(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    grid = (triton.cdiv(n_pixels, block_m), triton.cdiv(n_classes, block_n))
    torch.library.wrap_triton(_head_kernels._patch_logits_kernel)[grid](
        x_rows, w, b, index, y,
        n_pixels, channels, n_classes,
        *x_rows.stride(), *w.stride(),
        INPUT_PRECISION=_input_precision(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return y


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride: int = 1,
    relu: bool = True,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """act(conv_valid(x, weight, stride) + bias [+ residual cropped top-left]); see the reference.

    x: (N, Cin, H, W) channels-last; weight: (Cout, Cin, k, k), k ∈ {1, 3}; stride ∈ {1, 2};
    residual: (N, Cout, >=Ho, >=Wo). Returns (N, Cout, Ho, Wo) channels-last.
    """
    return torch.ops.bagnet_fast.triton_conv_bias_act(x, weight, bias, stride, relu, residual)


def pointwise_bottleneck(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
) -> torch.Tensor:
    """relu(W3·relu(W2·relu(W1·x + b1) + b2) + b3 + x) per pixel; w's are (Cout, Cin, 1, 1)."""
    return torch.ops.bagnet_fast.triton_pointwise_bottleneck(x, w1, b1, w2, b2, w3, b3)


def spatial_mean_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """linear(mean over H and W): (N, C, H, W) -> (N, K)."""
    return torch.ops.bagnet_fast.triton_spatial_mean_linear(x, weight, bias)


def patch_logits(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    classes: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Per-patch logits (N, H, W, K), optionally for ``classes`` only."""
    return torch.ops.bagnet_fast.triton_patch_logits(
        x, weight, bias, None if classes is None else [int(c) for c in classes]
    )
