"""Triton backend of the fused BagNet units: host launchers for the kernels in ``kernels/``
(installed as ``bagnet_fast.kernels``), registered as ``torch.ops.bagnet_fast.triton_<name>`` with
``torch.library.triton_op`` so torch.compile can trace them.

The public functions carry the names and signatures of :mod:`bagnet_fast.ops.reference`.
Importing this module imports triton; ``import bagnet_fast`` never imports this module. Without a
GPU, set ``TRITON_INTERPRET=1`` before the first triton import and pass CPU tensors (test in fp32:
the interpreter has no bf16 dot).

Which tiles each launcher tries, and how they are tuned, is the tuning policy of
:mod:`bagnet_fast.ops.triton_tuning`. Each op makes its tensors' CUDA device current itself
(Triton launches on the current device, not on the tensors': a direct call on ``cuda:1``
while ``cuda:0`` is current would fault otherwise).

Names: the op ``triton_<unit>`` (e.g. ``triton_pointwise_bottleneck``) runs the launcher
``_<unit>`` (``_pointwise_bottleneck_fused`` / ``_pointwise_bottleneck_split`` where a unit has
two forms) of the kernel ``_<unit>_kernel`` in ``kernels/<unit>.py``; its pure-PyTorch twin is
``reference.<unit>`` (table: bagnet_fast/ops/README.md).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence, Tuple

import torch
import triton

from . import reference as ref
from . import triton_tuning as _tuning
from .triton_tuning import Tile, autotuned_configs, force_tile  # noqa: F401 - re-exported for tests and reports

__all__ = ["conv_bias_act", "conv_downsample_bias_act", "pointwise_bottleneck", "pointwise_bottleneck_mean",
           "spatial_mean_linear", "patch_logits"]

_KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"
_KERNEL_PACKAGE = "bagnet_fast.kernels"


def _load_kernels(name: str) -> ModuleType:
    """bagnet_fast.kernels.<name>. An install maps the package to kernels/
    (package_dir={"bagnet_fast.kernels": "kernels"}); in a source checkout on PYTHONPATH the
    package is registered here from kernels/, so the kernels' relative imports work either way."""
    try:
        return importlib.import_module(f"{_KERNEL_PACKAGE}.{name}")
    except ModuleNotFoundError as error:
        if error.name != _KERNEL_PACKAGE or not (_KERNEL_DIR / "__init__.py").is_file():
            raise
    spec = importlib.util.spec_from_file_location(
        _KERNEL_PACKAGE, _KERNEL_DIR / "__init__.py", submodule_search_locations=[str(_KERNEL_DIR)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[_KERNEL_PACKAGE] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{_KERNEL_PACKAGE}.{name}")


_conv_kernels = _load_kernels("conv_bias_act")
_bottleneck_kernels = _load_kernels("pointwise_bottleneck")
_head_kernels = _load_kernels("head")


def _on_device_of(x: torch.Tensor):
    """x's CUDA device made current (nothing for CPU tensors, or while torch.compile traces:
    the code it generates places its launches itself)."""
    if x.is_cuda and not torch.compiler.is_compiling():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _guarded(launcher: Callable) -> Callable:
    """``launcher`` run with its first tensor's CUDA device current."""

    @functools.wraps(launcher)
    def call(x, *args, **kwargs):
        with _on_device_of(x):
            return launcher(x, *args, **kwargs)

    return call


def _launch(kernel, tiles: Tuple[Tile, ...], key: Tuple[str, ...], grid: Callable, *args,
            reset: Tuple[str, ...] = (), **constexprs) -> None:
    """Launch ``kernel`` through its autotuner over ``tiles`` (wrap_triton: traceable by
    torch.compile inside a triton_op)."""
    torch.library.wrap_triton(_tuning.autotuned(kernel, tiles, key, reset))[grid](*args, **constexprs)


def _launch_fixed(kernel, grid, *args, **constexprs) -> None:
    """Launch a kernel with fixed tiles (no autotuner; the tiles and num_warps are in ``constexprs``)."""
    torch.library.wrap_triton(kernel)[grid](*args, **constexprs)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) pixel rows; a view when t is channels-last."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _empty_channels_last(n: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) channels-last output with like's device and dtype."""
    return torch.empty((n, c, h, w), device=like.device, dtype=like.dtype, memory_format=torch.channels_last)


# --------------------------------------------------------------------------- conv_bias_act


def _conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride: int,
    relu: bool,
    residual: Optional[torch.Tensor],
    mean_output: bool = False,
    downsample: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """The conv launcher; with ``mean_output`` it returns the (N, Cout) fp32 spatial mean of the
    result instead of the map (which is never written); ``downsample`` = (d, Wd): a second 1x1
    GEMM d · Wdᵀ over d (N, Cd, Ho, Wo) added before the activation (``bias`` then holds both
    biases)."""
    n, c_in, height, width = x.shape
    c_out, _, k, _ = weight.shape
    h_out = (height - k) // stride + 1
    w_out = (width - k) // stride + 1
    if mean_output:
        y = torch.zeros((n, c_out), device=x.device, dtype=torch.float32)
        y_strides = (0, 0, 0, 0)  # unused: the kernel adds into y[n, c] directly
    else:
        y = _empty_channels_last(n, c_out, h_out, w_out, x)
        y_strides = y.stride()
    # The weight is read in place through its strides, the B operand [ci, co] of each tap. The
    # plan keeps weights channels-last (Cin contiguous: coalesced along the reduction, the
    # K-major B tile wgmma takes); k x k weights in other layouts are made so here, once per
    # call (a 1x1 weight is read as it is: any layout is one strided [Cin, Cout] tile).
    w = weight.to(x.dtype)
    if k > 1 and w.stride(1) != 1:
        w = w.contiguous(memory_format=torch.channels_last)
    r = residual if residual is not None else x  # dummy pointer, never read
    if downsample is not None:
        d, wd = downsample[0], downsample[1].to(x.dtype).flatten(1)  # (N, Cd, Ho, Wo), (Cout, Cd)
    else:
        d, wd = x, w.flatten(1)  # dummies, never read
    c_down = d.shape[1] if downsample is not None else 0
    n_pixels = n * h_out * w_out
    flat = _tuning.flat_taps(c_in, k)
    tiles = _tuning.candidates("conv", _tuning.CONV_TILES, x.dtype, c_out, c_in * k * k if flat else c_in, n_pixels)
    _launch(
        _conv_kernels._conv_bias_act_kernel,
        tiles,
        ("m_bucket", "c_in", "c_out", "c_down", "KSIZE", "STRIDE", "HAS_RESIDUAL", "MEAN_OUTPUT", "INPUT_PRECISION"),
        lambda meta: (triton.cdiv(n_pixels, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]),),
        x, w, bias.contiguous(), r, d, wd, y,
        n_pixels, c_in, c_out, c_down, h_out, w_out,
        *x.stride(), *w.stride(), *r.stride(), *d.stride(), *wd.stride(), *y_strides,
        _tuning.pixel_class(n_pixels),
        1.0 / (h_out * w_out),
        reset=("y_ptr",) if mean_output else (),
        KSIZE=k,
        STRIDE=stride,
        FLAT_TAPS=flat,
        HAS_RESIDUAL=residual is not None,
        HAS_DOWNSAMPLE=downsample is not None,
        APPLY_RELU=relu,
        MEAN_OUTPUT=mean_output,
        INPUT_PRECISION=_tuning.input_precision(x.dtype),
        GROUP_M=_tuning.group_m(),
    )
    return y


@torch.library.triton_op("bagnet_fast::triton_conv_bias_act", mutates_args=())
@_guarded
def _triton_conv_bias_act(
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
    torch._check(x.dim() == 4, lambda: "x must be 4-D (N, Cin, H, W)")
    n, c_in, height, width = x.shape
    c_out, w_cin, k, k2 = weight.shape
    torch._check(w_cin == c_in and k == k2 and k in (1, 3), lambda: f"bad weight shape {tuple(weight.shape)}")
    torch._check(stride in (1, 2, 4), lambda: f"stride must be 1, 2 or 4, got {stride}")  # 4: BagNet-9 layer2.0 (plan._move_strides_up)
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
    return _conv_bias_act(x, weight, bias, stride, relu, residual)


@torch.library.triton_op("bagnet_fast::triton_conv_downsample_bias_act", mutates_args=())
@_guarded
def _triton_conv_downsample_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    d: torch.Tensor,
    weight_d: torch.Tensor,
) -> torch.Tensor:
    """relu(conv1x1(x, weight) + conv1x1(d, weight_d) + bias): a first block's conv3 and its
    downsample as one GEMM over the concatenated reduction [W | Wd]·[x ; d], so the downsample's
    output (the residual) never goes to memory. ``bias`` is the sum of both convolutions' biases.

    x: (N, P, Ho, Wo) channels-last; d: (N, Cd, Ho, Wo), any strides (the subsampled, cropped
    block input); weight: (Cout, P, 1, 1); weight_d: (Cout, Cd, 1, 1). Returns (N, Cout, Ho, Wo)
    channels-last. Exact in real arithmetic; in floating point one rounding fewer than the
    two-GEMM form (the residual is not rounded to the activations' dtype first)."""
    torch._check(x.dim() == 4 and d.dim() == 4, lambda: "x and d must be 4-D (N, C, H, W)")
    c_out = weight.shape[0]
    torch._check(tuple(weight.shape) == (c_out, x.shape[1], 1, 1), lambda: f"bad weight shape {tuple(weight.shape)}")
    torch._check(tuple(weight_d.shape) == (c_out, d.shape[1], 1, 1),
                 lambda: f"bad downsample weight shape {tuple(weight_d.shape)} for d {tuple(d.shape)}")
    torch._check(d.shape[0] == x.shape[0] and d.shape[2:] == x.shape[2:],
                 lambda: f"d {tuple(d.shape)} must have the pixels of x {tuple(x.shape)}")
    return _conv_bias_act(x, weight, bias, 1, True, None, downsample=(d, weight_d))


# --------------------------------------------------------------------------- pointwise_bottleneck


def _check_pointwise(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> Tuple[int, int]:
    """(channels, padded planes) of a 1x1-only block, after checking the shapes."""
    torch._check(x.dim() == 4, lambda: "x must be 4-D (N, C, H, W)")
    channels, planes = x.shape[1], w1.shape[0]
    torch._check(
        tuple(w1.shape) == (planes, channels, 1, 1)
        and tuple(w2.shape) == (planes, planes, 1, 1)
        and tuple(w3.shape) == (channels, planes, 1, 1),
        lambda: f"bad 1x1 weights {tuple(w1.shape)}, {tuple(w2.shape)}, {tuple(w3.shape)} for C={channels}",
    )
    return channels, _tuning.pow2_clamp(planes, 16, 1 << 30)


def _is_wide(p_pad: int, dtype: torch.dtype) -> bool:
    # Wide blocks run as three GEMMs with fused epilogues (kernels/pointwise_bottleneck.py says why).
    return p_pad > _tuning.FUSED_MAX_PLANES[_tuning.dtype_class(dtype)]


@torch.library.triton_op("bagnet_fast::triton_pointwise_bottleneck", mutates_args=())
@_guarded
def _triton_pointwise_bottleneck(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
) -> torch.Tensor:
    """relu(W3·relu(W2·relu(W1·x + b1) + b2) + b3 + x) per pixel; w's are (Cout, Cin, 1, 1);
    x: (N, C, H, W) channels-last. Returns (N, C, H, W) channels-last."""
    channels, p_pad = _check_pointwise(x, w1, w2, w3)
    if _is_wide(p_pad, x.dtype):
        return _pointwise_bottleneck_split(x, w1, b1, w2, b2, w3, b3)
    return _pointwise_bottleneck_fused(x, w1, b1, w2, b2, w3, b3, channels, p_pad)


@torch.library.triton_op("bagnet_fast::triton_pointwise_bottleneck_mean", mutates_args=())
@_guarded
def _triton_pointwise_bottleneck_mean(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
) -> torch.Tensor:
    """The spatial mean (N, C), fp32, of pointwise_bottleneck(x, ...): the last block and the
    head's mean in one op (avg_pool=True). A wide block's last GEMM adds its output into the
    means in its epilogue, so the (N, C, H, W) map is never written; a narrow (fused) block
    writes its map and the mean kernel reads it."""
    channels, p_pad = _check_pointwise(x, w1, w2, w3)
    if _is_wide(p_pad, x.dtype):
        return _pointwise_bottleneck_split(x, w1, b1, w2, b2, w3, b3, mean_output=True)
    return _spatial_mean(_pointwise_bottleneck_fused(x, w1, b1, w2, b2, w3, b3, channels, p_pad))


def _pointwise_bottleneck_split(x, w1, b1, w2, b2, w3, b3, mean_output: bool = False) -> torch.Tensor:
    """A wide block as three 1x1 GEMMs with fused epilogues, the residual added in the last one
    (and with ``mean_output`` the per-image means of its result instead of the map)."""
    t = _conv_bias_act(x, w1, b1, 1, True, None)
    t = _conv_bias_act(t, w2, b2, 1, True, None)
    return _conv_bias_act(t, w3, b3, 1, True, x, mean_output=mean_output)


def _pointwise_bottleneck_fused(x, w1, b1, w2, b2, w3, b3, channels: int, p_pad: int) -> torch.Tensor:
    """The whole block in one kernel, intermediates on chip (narrow blocks)."""
    planes = w1.shape[0]
    dtype = x.dtype
    w1, w2, w3 = (w.to(dtype).reshape(w.shape[0], w.shape[1]) for w in (w1, w2, w3))  # (out, in) views
    y = torch.empty_like(x, memory_format=torch.channels_last)  # (N, C, H, W) channels-last
    x_rows, y_rows = _rows(x), _rows(y)  # (M, C)
    n_pixels = x_rows.shape[0]
    _tuning.check_dot_tile(P_PAD=p_pad)
    tiles = _tuning.candidates("pointwise", _tuning.POINTWISE_TILES, dtype, channels, channels, n_pixels,
                               max_m=_tuning.POINTWISE_MAX_INTERMEDIATE // p_pad)
    _launch(
        _bottleneck_kernels._pointwise_bottleneck_kernel,
        tiles,
        ("m_bucket", "channels", "planes", "INPUT_PRECISION"),
        lambda meta: (triton.cdiv(n_pixels, meta["BLOCK_M"]),),
        x_rows, w1, b1.contiguous(), w2, b2.contiguous(), w3, b3.contiguous(), y_rows,
        n_pixels, channels, planes,
        *x_rows.stride(), *y_rows.stride(), *w1.stride(), *w2.stride(), *w3.stride(),
        _tuning.pixel_class(n_pixels),
        INPUT_PRECISION=_tuning.input_precision(dtype),
        P_PAD=p_pad,
    )
    return y


# --------------------------------------------------------------------------- head


@torch.library.triton_op("bagnet_fast::triton_spatial_mean_linear", mutates_args=())
@_guarded
def _triton_spatial_mean_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """linear(mean over H and W): (N, C, H, W) -> (N, K)."""
    torch._check(x.dim() == 4, lambda: "x must be 4-D (N, C, H, W)")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[1], lambda: "weight must be (K, C)")
    return ref.mean_linear(_spatial_mean(x), weight, bias, x.dtype)


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) fp32 means."""
    n, channels, height, width = x.shape
    mean = torch.empty((n, channels), device=x.device, dtype=torch.float32)  # (N, C) fp32
    # A memory-bound reduction of the smallest map (< 1 % of a forward): fixed tiles, no tuning.
    block_c = _tuning.pow2_clamp(channels, 16, 128)
    block_p = _tuning.pow2_clamp(height * width, 1, 32)
    _launch_fixed(
        _head_kernels._spatial_mean_kernel, (n, triton.cdiv(channels, block_c)),
        x, mean, channels, height, width, *x.stride(),
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return mean


@torch.library.triton_op("bagnet_fast::triton_patch_logits", mutates_args=())
@_guarded
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
    x_rows = _rows(x)  # (M, C)
    n_pixels = x_rows.shape[0]
    w = weight.to(x.dtype)
    y = torch.empty((n, height, width, n_classes), device=x.device, dtype=x.dtype)  # (N, H, W, K)
    # Heatmaps and avg_pool=False only: fixed tiles, no tuning.
    block_m = 32 if n_pixels < 64 or _tuning.interpreting() else 64
    block_n = _tuning.pow2_clamp(n_classes, 16, 32 if _tuning.interpreting() else 128)
    block_k = _tuning.pow2_clamp(channels, 16, 32)
    _tuning.check_dot_tile(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    grid = (triton.cdiv(n_pixels, block_m), triton.cdiv(n_classes, block_n))
    _launch_fixed(
        _head_kernels._patch_logits_kernel, grid,
        x_rows, w, bias.contiguous(), index, y,
        n_pixels, channels, n_classes,
        *x_rows.stride(), *w.stride(),
        INPUT_PRECISION=_tuning.input_precision(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return y


# --------------------------------------------------------------------------- public functions


# The registered ops take the reference's arguments (positional or by name), so they serve as the
# public functions directly; patch_logits converts its class sequence to the schema's int list.
conv_bias_act = torch.ops.bagnet_fast.triton_conv_bias_act
conv_downsample_bias_act = torch.ops.bagnet_fast.triton_conv_downsample_bias_act
pointwise_bottleneck = torch.ops.bagnet_fast.triton_pointwise_bottleneck
pointwise_bottleneck_mean = torch.ops.bagnet_fast.triton_pointwise_bottleneck_mean
spatial_mean_linear = torch.ops.bagnet_fast.triton_spatial_mean_linear


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
