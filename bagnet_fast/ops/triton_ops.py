"""Triton backend of the fused BagNet units: host launchers for the kernels in ``kernels/``
(installed as ``bagnet_fast.kernels``), registered as ``torch.ops.bagnet_fast.triton_<name>`` with
``torch.library.triton_op`` so torch.compile can trace them.

The public functions carry the names and signatures of :mod:`bagnet_fast.ops.reference`.
Importing this module imports triton; ``import bagnet_fast`` never imports this module. Without a
GPU, set ``TRITON_INTERPRET=1`` before the first triton import and pass CPU tensors (test in fp32:
the interpreter has no bf16 dot).

Tiles and autotuning. Each GEMM op has a handful of candidate tiles per dtype (``CONV_TILES``,
``POINTWISE_TILES``); the launcher fits them to the call's channel counts, asserts that every
tl.dot dimension is a power of two >= 16 (``_check_dot_tile``: the interpreter accepts smaller
tiles that then fail to compile on a GPU), and lets ``triton.autotune`` pick one on the first call
per key (channel counts, kernel size/stride, a coarse pixel-count class and the dtypes), cached in
memory for the process. Nothing is tuned at import. Candidates that do not fit the GPU
(OutOfResources) are skipped by triton's autotuner. Knobs, read at every call:

- ``BAGNET_FAST_AUTOTUNE=0``: no benchmarking, the first fitting tile (tests, CUDA-graph capture).
- ``BAGNET_FAST_TF32=1``: fp32 dots in tf32 (opt-in; ~1e-3 relative error instead of the 1e-5
  fp32 parity bound, and the fast tensor-core path on GPUs). Default "ieee": exact fp32 products.
- Under ``TRITON_INTERPRET=1`` every op runs one small tile (``INTERPRETER_TILE``), no tuning.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import triton
import triton.testing

__all__ = ["conv_bias_act", "pointwise_bottleneck", "spatial_mean_linear", "patch_logits"]

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


# --------------------------------------------------------------------------- tiles, autotuning


@dataclass(frozen=True)
class Tile:
    """One launch configuration of a GEMM kernel: BLOCK_M pixels × BLOCK_N output channels per
    program, BLOCK_K input channels per reduction step (for ``pointwise_bottleneck``: BLOCK_K is
    the stage-1 input chunk, BLOCK_N the stage-3 output chunk)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# bf16/fp16: tensor-core tiles (M = 64 per wgmma warpgroup on Hopper), 3-4 pipeline stages of
# (BLOCK_M + BLOCK_N)·BLOCK_K·2 B = 16 KB each at 128×128×32, well inside 227 KB of shared memory.
# The BLOCK_M = 32 tile serves the small pixel counts of batch 1 (more programs than SMs).
# fp32 ("ieee" products run on the FMA units, not tensor cores) gets fewer, smaller tiles: its
# operands take twice the shared memory and tuning time is better spent on bf16. Compiled ahead of
# time for sm_90a (benchmarks/gpu_compile_check.py, triton 3.8, ptxas -v): bf16 80-184 registers
# and 24-48 KB of shared memory per program, fp32 128-150 registers and 16-24 KB; no spills.
CONV_TILES: Dict[str, Tuple[Tile, ...]] = {
    "16bit": (
        Tile(128, 128, 32, 8, 3),
        Tile(128, 64, 32, 4, 4),
        Tile(64, 128, 32, 4, 4),
        Tile(64, 64, 64, 4, 3),
        Tile(32, 64, 64, 4, 3),
    ),
    "fp32": (Tile(64, 64, 32, 4, 2), Tile(128, 64, 32, 8, 2)),
}
# The fused bottleneck holds two [BLOCK_M, P_PAD] fp32 intermediates; BLOCK_M·P_PAD <= 8192
# (32 KB each) keeps them in registers (see kernels/pointwise_bottleneck.py for the budget).
POINTWISE_TILES: Dict[str, Tuple[Tile, ...]] = {
    "16bit": (
        Tile(64, 64, 64, 4, 3),
        Tile(64, 128, 32, 8, 3),
        Tile(128, 64, 32, 8, 2),
        Tile(32, 64, 32, 4, 2),
    ),
    "fp32": (Tile(32, 32, 32, 8, 2), Tile(64, 32, 32, 8, 2)),
}
_POINTWISE_MAX_INTERMEDIATE = 8192  # BLOCK_M · P_PAD elements of one fp32 intermediate
# Widest bottleneck (P) run by the fused kernel, per dtype class; wider blocks (BagNet stages 3-4,
# and stage 2 in fp32) run as three 1×1 conv_bias_act GEMMs. Why: kernels/pointwise_bottleneck.py
# (fp32's "ieee" FMA dot holds its operands in registers: at P = 128 ptxas spilled 2-18 KB per
# thread with every tile tried). Tests lower it to reach the split path with small shapes.
FUSED_MAX_PLANES: Dict[str, int] = {"16bit": 128, "fp32": 64}
# Ragged with respect to the interpreter tests' shapes (channel counts 40, 48, 80; 37 and 56 pixels).
INTERPRETER_TILE = Tile(32, 32, 32, 4, 1)

_forced_tiles: Dict[str, Tile] = {}


@contextlib.contextmanager
def force_tile(op: str, tile: Tile) -> Iterator[None]:
    """Run ``op`` ("conv" or "pointwise") with exactly ``tile`` inside the block (tests check
    every candidate tile compiles and computes the same on a GPU)."""
    _forced_tiles[op] = tile
    try:
        yield
    finally:
        del _forced_tiles[op]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_dot_tile(**tiles: int) -> None:
    """tl.dot needs power-of-two tile dimensions >= 16 on GPUs; the interpreter does not check."""
    for name, size in tiles.items():
        assert size >= 16 and size & (size - 1) == 0, f"tl.dot tile {name}={size} must be a power of two >= 16"


def _pow2_clamp(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 tl.dot defaults to tf32 on GPUs (10-bit mantissa, ~1e-3 relative): far outside the 1e-5
    # fp32 parity budget, so fp32 asks for exact products unless tf32 is opted into.
    # Ignored for bf16/fp16 inputs.
    if dtype == torch.float32 and os.environ.get("BAGNET_FAST_TF32") != "1":
        return "ieee"
    return "tf32"


def _pixel_class(n_pixels: int) -> int:
    """Coarse autotuning key of the GEMM M dimension: batch 1 and batch 256 want different tiles,
    but retuning for every image size would cost a benchmark round per shape."""
    return 0 if n_pixels <= 4096 else 1 if n_pixels <= 65536 else 2


def _fit(tiles: Sequence[Tile], n: int, k: int, max_m: Optional[int] = None) -> Tuple[Tile, ...]:
    """The candidate tiles shrunk to the call's channel counts (BLOCK_N <= n, BLOCK_K <= k, both
    >= 16), without duplicates, in order; ``max_m`` drops tiles with a larger BLOCK_M (the last
    candidate always stays)."""
    fitted = []
    for tile in tiles:
        tile = Tile(
            tile.block_m,
            min(tile.block_n, _pow2_clamp(n, 16, 1 << 30)),
            min(tile.block_k, _pow2_clamp(k, 16, 1 << 30)),
            tile.num_warps,
            tile.num_stages,
        )
        if tile not in fitted and (max_m is None or tile.block_m <= max_m):
            fitted.append(tile)
    return tuple(fitted) or (tiles[-1],)


def _candidates(op: str, table: Dict[str, Tuple[Tile, ...]], dtype: torch.dtype, n: int, k: int,
                max_m: Optional[int] = None) -> Tuple[Tile, ...]:
    if _interpreting():
        tiles = (INTERPRETER_TILE,)
    elif op in _forced_tiles:
        tiles = (_forced_tiles[op],)
    else:
        tiles = _fit(table[_dtype_class(dtype)], n, k, max_m)
        if os.environ.get("BAGNET_FAST_AUTOTUNE", "1") == "0":
            tiles = tiles[:1]
    for tile in tiles:
        _check_dot_tile(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
    return tiles


def _quick_bench(kernel_call: Callable[[], None], quantiles) -> object:
    # triton's default (25 ms warm-up, 100 ms of repeats per candidate) would make the first
    # forward of a BagNet-33 take tens of seconds over its ~20 GEMM shapes; 5 + 20 ms still ranks
    # kernels that run for microseconds to milliseconds.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


_tuners: Dict[Tuple[int, Tuple[Tile, ...], Tuple[str, ...]], object] = {}


def _autotuned(kernel, tiles: Tuple[Tile, ...], key: Tuple[str, ...], reset: Tuple[str, ...] = ()):
    """``kernel`` under triton.autotune over ``tiles``; one tuner per (kernel, candidate list),
    kept for the process (its cache maps each key to the winner). ``reset``: arguments the tuner
    zeroes before each trial (outputs that kernels accumulate into with atomics)."""
    cache_key = (id(kernel), tiles, key, reset)
    if cache_key not in _tuners:
        configs = [
            triton.Config(
                {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k},
                num_warps=t.num_warps,
                num_stages=t.num_stages,
            )
            for t in tiles
        ]
        options = {"reset_to_zero": list(reset)} if reset else {}
        if "do_bench" in inspect.signature(triton.autotune).parameters:
            options["do_bench"] = _quick_bench
        _tuners[cache_key] = triton.autotune(configs=configs, key=list(key), **options)(kernel)
    return _tuners[cache_key]


def autotuned_configs() -> Dict[str, Dict[str, str]]:
    """What the autotuners chose so far in this process, {kernel name: {key: config}}: for
    benchmark reports (benchmarks/gpu_check.py)."""
    chosen: Dict[str, Dict[str, str]] = {}
    for tuner in _tuners.values():
        name = getattr(getattr(tuner, "base_fn", None), "__name__", repr(tuner))
        for key, config in getattr(tuner, "cache", {}).items():
            chosen.setdefault(name, {})[repr(key)] = str(config)
    return chosen


def _launch(kernel, tiles: Tuple[Tile, ...], key: Tuple[str, ...], grid: Callable, *args,
            reset: Tuple[str, ...] = (), **constexprs) -> None:
    """Launch ``kernel`` through its autotuner over ``tiles`` (wrap_triton: traceable by
    torch.compile inside a triton_op)."""
    torch.library.wrap_triton(_autotuned(kernel, tiles, key, reset))[grid](*args, **constexprs)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) pixel rows; a view when t is channels-last."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _empty_channels_last(n: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) channels-last output with like's device and dtype."""
    return torch.empty((n, c, h, w), device=like.device, dtype=like.dtype, memory_format=torch.channels_last)


# --------------------------------------------------------------------------- conv_bias_act


def _conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride: int,
    relu: bool,
    residual: Optional[torch.Tensor],
    mean_output: bool = False,
) -> torch.Tensor:
    """The conv launcher; with ``mean_output`` it returns the (N, Cout) fp32 spatial mean of the
    result instead of the map (which is never written)."""
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
    n_pixels = n * h_out * w_out
    tiles = _candidates("conv", CONV_TILES, x.dtype, c_out, c_in)
    _launch(
        _conv_kernels._conv_bias_act_kernel,
        tiles,
        ("m_bucket", "c_in", "c_out", "KSIZE", "STRIDE", "HAS_RESIDUAL", "MEAN_OUTPUT"),
        lambda meta: (triton.cdiv(n_pixels, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"])),
        x, w, bias.contiguous(), r, y,
        n_pixels, c_in, c_out, h_out, w_out,
        *x.stride(), *w.stride(), *r.stride(), *y_strides,
        _pixel_class(n_pixels),
        1.0 / (h_out * w_out),
        reset=("y_ptr",) if mean_output else (),
        KSIZE=k,
        STRIDE=stride,
        HAS_RESIDUAL=residual is not None,
        APPLY_RELU=relu,
        MEAN_OUTPUT=mean_output,
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    return y


@torch.library.triton_op("bagnet_fast::triton_conv_bias_act", mutates_args=())
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
    return _conv(x, weight, bias, stride, relu, residual)


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
    return channels, _pow2_clamp(planes, 16, 1 << 30)


def _is_wide(p_pad: int, dtype: torch.dtype) -> bool:
    # Wide blocks run as three GEMMs with fused epilogues (kernels/pointwise_bottleneck.py says why).
    return p_pad > FUSED_MAX_PLANES[_dtype_class(dtype)]


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
    """relu(W3·relu(W2·relu(W1·x + b1) + b2) + b3 + x) per pixel; w's are (Cout, Cin, 1, 1);
    x: (N, C, H, W) channels-last. Returns (N, C, H, W) channels-last."""
    channels, p_pad = _check_pointwise(x, w1, w2, w3)
    if _is_wide(p_pad, x.dtype):
        return _split_pointwise(x, w1, b1, w2, b2, w3, b3)
    return _fused_pointwise(x, w1, b1, w2, b2, w3, b3, channels, p_pad)


@torch.library.triton_op("bagnet_fast::triton_pointwise_bottleneck_mean", mutates_args=())
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
        return _split_pointwise(x, w1, b1, w2, b2, w3, b3, mean_output=True)
    return _spatial_mean(_fused_pointwise(x, w1, b1, w2, b2, w3, b3, channels, p_pad))


def _split_pointwise(x, w1, b1, w2, b2, w3, b3, mean_output: bool = False) -> torch.Tensor:
    """A wide block as three 1x1 GEMMs with fused epilogues, the residual added in the last one
    (and with ``mean_output`` the per-image means of its result instead of the map)."""
    t = _conv(x, w1, b1, 1, True, None)
    t = _conv(t, w2, b2, 1, True, None)
    return _conv(t, w3, b3, 1, True, x, mean_output=mean_output)


def _fused_pointwise(x, w1, b1, w2, b2, w3, b3, channels: int, p_pad: int) -> torch.Tensor:
    """The whole block in one kernel, intermediates on chip (narrow blocks)."""
    planes = w1.shape[0]
    dtype = x.dtype
    w1, w2, w3 = (w.to(dtype).reshape(w.shape[0], w.shape[1]) for w in (w1, w2, w3))  # (out, in) views
    y = torch.empty_like(x, memory_format=torch.channels_last)  # (N, C, H, W) channels-last
    x_rows, y_rows = _rows(x), _rows(y)  # (M, C)
    n_pixels = x_rows.shape[0]
    _check_dot_tile(P_PAD=p_pad)
    tiles = _candidates(
        "pointwise", POINTWISE_TILES, dtype, channels, channels, max_m=_POINTWISE_MAX_INTERMEDIATE // p_pad
    )
    _launch(
        _bottleneck_kernels._pointwise_bottleneck_kernel,
        tiles,
        ("m_bucket", "channels", "planes"),
        lambda meta: (triton.cdiv(n_pixels, meta["BLOCK_M"]),),
        x_rows, w1, b1.contiguous(), w2, b2.contiguous(), w3, b3.contiguous(), y_rows,
        n_pixels, channels, planes,
        *x_rows.stride(), *y_rows.stride(), *w1.stride(), *w2.stride(), *w3.stride(),
        _pixel_class(n_pixels),
        INPUT_PRECISION=_input_precision(dtype),
        P_PAD=p_pad,
    )
    return y


# --------------------------------------------------------------------------- head


@torch.library.triton_op("bagnet_fast::triton_spatial_mean_linear", mutates_args=())
def _triton_spatial_mean_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """linear(mean over H and W): (N, C, H, W) -> (N, K)."""
    torch._check(x.dim() == 4, lambda: "x must be 4-D (N, C, H, W)")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[1], lambda: "weight must be (K, C)")
    return mean_linear(_spatial_mean(x), weight, bias, x.dtype)


def mean_linear(mean: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The head's linear on the (N, C) fp32 means: a few MFLOP, not worth a kernel of its own."""
    return torch.addmm(bias.float(), mean, weight.float().t()).to(dtype)


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) fp32 means."""
    n, channels, height, width = x.shape
    mean = torch.empty((n, channels), device=x.device, dtype=torch.float32)  # (N, C) fp32
    # A memory-bound reduction of the smallest map (< 1 % of a forward): fixed tiles, no tuning.
    block_c = _pow2_clamp(channels, 16, 128)
    block_p = _pow2_clamp(height * width, 1, 32)
    torch.library.wrap_triton(_head_kernels._spatial_mean_kernel)[(n, triton.cdiv(channels, block_c))](
        x, mean, channels, height, width, *x.stride(),
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return mean


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
    x_rows = _rows(x)  # (M, C)
    n_pixels = x_rows.shape[0]
    w = weight.to(x.dtype)
    y = torch.empty((n, height, width, n_classes), device=x.device, dtype=x.dtype)  # (N, H, W, K)
    # Heatmaps and avg_pool=False only: fixed tiles, no tuning.
    block_m = 32 if n_pixels < 64 or _interpreting() else 64
    block_n = _pow2_clamp(n_classes, 16, 32 if _interpreting() else 128)
    block_k = _pow2_clamp(channels, 16, 32)
    _check_dot_tile(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    grid = (triton.cdiv(n_pixels, block_m), triton.cdiv(n_classes, block_n))
    torch.library.wrap_triton(_head_kernels._patch_logits_kernel)[grid](
        x_rows, w, bias.contiguous(), index, y,
        n_pixels, channels, n_classes,
        *x_rows.stride(), *w.stride(),
        INPUT_PRECISION=_input_precision(x.dtype),
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
