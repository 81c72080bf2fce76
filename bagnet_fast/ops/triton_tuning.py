"""Tuning policy of the Triton kernels: the candidate tiles per op and dtype, how they are fitted
to a call's channel counts, the autotuning keys and benchmark settings, and the knobs
(``BAGNET_FAST_AUTOTUNE``, ``BAGNET_FAST_TF32``). The launchers in
:mod:`bagnet_fast.ops.triton_ops` ask this module which tiles to try; nothing here launches.

Each GEMM op has a handful of candidate tiles per dtype (``CONV_TILES``, ``POINTWISE_TILES``);
:func:`candidates` fits them to the call's channel counts and asserts that every tl.dot
dimension is a power of two >= 16 (:func:`check_dot_tile`: the interpreter accepts smaller
tiles that then fail to compile on a GPU); ``triton.autotune`` picks one on the first call per
key (channel counts, kernel size/stride, a coarse pixel-count class and the dtypes), cached in
memory for the process. Nothing is tuned at import. Candidates that do not fit the GPU
(OutOfResources) are skipped by triton's autotuner. Knobs, read at every call:

- ``BAGNET_FAST_AUTOTUNE=0``: no benchmarking, the first fitting tile (tests, CUDA-graph capture).
- ``BAGNET_FAST_FP32``: how fp32 dots run on GPUs. ``ieee`` (default): exact fp32 products on the
  FMA units. ``tf32x3``: on the tensor cores as three TF32 products (a = a_hi + a_lo, both TF32;
  a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi), error close to fp32's (~1e-6 relative against
  float64 where ieee gives ~1e-7 and plain TF32 ~1e-3), the fast accurate way to run fp32
  weights such as the official ones, which lose 2.5 top-1 points under TF32 (docs/gpu.md).
- ``BAGNET_FAST_TF32=1``: fp32 dots in plain tf32 (opt-in; ~1e-3 relative error, outside the
  1e-5 fp32 parity bound; takes precedence over BAGNET_FAST_FP32).
- Under ``TRITON_INTERPRET=1`` every op runs one small tile (``INTERPRETER_TILE``), no tuning.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import triton
import triton.testing


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


# bf16/fp16: tensor-core tiles (M = 64 per wgmma warpgroup on Hopper) with 64-wide reduction
# steps: a BLOCK_K = 32 step feeds each wgmma only 2 k-slices of 16 and the loop's overhead and
# barriers per FLOP double. 128×128×64 with 4 stages of (128 + 128)·64·2 B = 32 KB is the usual
# Hopper choice (128 KB of the 227 KB of shared memory); 128×256×64 spills in the residual
# epilogue (312 B under triton 3.6, GPU_REVIEW.md). The 32-row tile serves batch 1's small pixel
# counts (more programs than SMs); prune() picks per pixel count. First = the BAGNET_FAST_AUTOTUNE=0
# tile. fp32 ("ieee" products run on the FMA units, not tensor cores) gets fewer, smaller tiles:
# its operands take twice the shared memory and tuning time is better spent on bf16. Registers,
# spills and shared memory per tile under triton 3.6 and 3.8 for sm_90a: docs/gpu.md
# (benchmarks/gpu_compile_check.py).
CONV_TILES: Dict[str, Tuple[Tile, ...]] = {
    "16bit": (
        Tile(128, 128, 64, 8, 4),
        Tile(128, 64, 64, 4, 4),
        Tile(64, 128, 64, 4, 4),
        Tile(64, 64, 64, 4, 3),
        Tile(32, 64, 64, 4, 3),
    ),
    # The ieee dot holds both operands in registers; these three spill in no variant the plan
    # launches under triton 3.6 (the GPU machine's) nor 3.8. 64×128×32 with 8 warps spilled
    # 4-24 B in the 1×1 variants under 3.6 (none under 3.8), hence BLOCK_K = 16 for that tile;
    # 64×64×32 with 4 warps spilled 4/8 B in the flattened stem (3.8), 128×64 with 8 warps
    # 4-16 B with a residual (both).
    "fp32": (Tile(64, 128, 16, 8, 2), Tile(32, 128, 32, 4, 2), Tile(32, 64, 32, 4, 2)),
    # tf32x3: fp32 operands (4 B) in shared memory, so 32-wide reduction steps (128×64×32 with 3
    # stages: (128 + 64)·32·4 B · 3 = 72 KB); the hi/lo split of each operand happens in
    # registers, which is what limits the tiles: 128×128 with 8 warps spilled 244 B in the fused
    # mean's epilogue, 128×64 with 4 warps 108-352 B; these four spill nowhere.
    "fp32_mma": (
        Tile(128, 64, 32, 8, 3),
        Tile(64, 128, 32, 8, 3),
        Tile(64, 64, 32, 4, 3),
        Tile(32, 64, 32, 4, 2),
    ),
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
    # tf32x3 at P = 64 (triton 3.8, sm_90a): 64×64 spilled 36 B with 4 warps and 32/16 B with 8
    # (255 registers: the hi/lo halves of t1 and t2); 64×32 needs 194 registers, 32×64 242.
    "fp32_mma": (Tile(64, 32, 32, 4, 2), Tile(32, 64, 32, 4, 2)),
}
POINTWISE_MAX_INTERMEDIATE = 8192  # BLOCK_M · P_PAD elements of one fp32 intermediate
# Widest bottleneck (P) run by the fused kernel, per dtype class; wider blocks (BagNet stages 3-4,
# and stage 2 in fp32) run as three 1×1 conv_bias_act GEMMs. Why: kernels/pointwise_bottleneck.py
# (fp32's "ieee" FMA dot holds its operands in registers: at P = 128 ptxas spilled 2-18 KB per
# thread with every tile tried; tf32x3's hi/lo operands 448-608 B). Tests lower it to reach the
# split path with small shapes.
FUSED_MAX_PLANES: Dict[str, int] = {"16bit": 128, "fp32": 64, "fp32_mma": 64}
# Ragged with respect to the interpreter tests' shapes (channel counts 40, 48, 80; 37 and 56 pixels).
INTERPRETER_TILE = Tile(32, 32, 32, 4, 1)
# Pixel tiles per group of the conv kernel's launch order (kernels/tiles.py: grouped_tile). 8 as in
# triton's matmul tutorial: 8 row tiles × all column tiles of a BagNet GEMM (2-16 of 128) is
# 16-128 programs, about the 132 SMs' worth resident at once. 2 in the interpreter, whose tests
# have 2-6 row tiles: several groups and a ragged last one.
GROUP_M = 8
INTERPRETER_GROUP_M = 2
# A k×k conv whose whole reduction Cin·k·k is at most this many lanes reduces over (kh, kw, ci)
# flattened (the stem: 3·3·3 = 27 lanes in one 32-wide step instead of 9 steps of 16 with 3 used).
FLAT_TAPS_MAX = 64

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


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def group_m() -> int:
    return INTERPRETER_GROUP_M if interpreting() else GROUP_M


def flat_taps(c_in: int, k: int) -> bool:
    """Whether a k×k conv over c_in channels reduces over its taps flattened (FLAT_TAPS_MAX)."""
    return k > 1 and c_in * k * k <= FLAT_TAPS_MAX


def check_dot_tile(**tiles: int) -> None:
    """tl.dot needs power-of-two tile dimensions >= 16 on GPUs; the interpreter does not check."""
    for name, size in tiles.items():
        assert size >= 16 and size & (size - 1) == 0, f"tl.dot tile {name}={size} must be a power of two >= 16"


def pow2_clamp(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


FP32_MODES = ("ieee", "tf32x3")


def fp32_mode() -> str:
    """The tl.dot input_precision of fp32 GEMMs: BAGNET_FAST_TF32=1 gives "tf32", else
    BAGNET_FAST_FP32 ("ieee" by default, or "tf32x3"). fp32 tl.dot defaults to tf32 on GPUs
    (10-bit mantissa, ~1e-3 relative): far outside the 1e-5 fp32 parity budget, so it is asked
    for only explicitly. The interpreter ignores the setting (its dots are numpy fp32)."""
    if os.environ.get("BAGNET_FAST_TF32") == "1":
        return "tf32"
    mode = os.environ.get("BAGNET_FAST_FP32", "ieee")
    if mode not in FP32_MODES:
        raise ValueError(f"BAGNET_FAST_FP32={mode!r}: expected one of {', '.join(FP32_MODES)}")
    return mode


def dtype_class(dtype: torch.dtype) -> str:
    """The tile table of a dtype: "16bit", "fp32" (ieee products on the FMA units) or "fp32_mma"
    (tf32x3/tf32 on the tensor cores: fp32 operands in shared memory, wgmma tiles)."""
    if dtype != torch.float32:
        return "16bit"
    return "fp32" if fp32_mode() == "ieee" else "fp32_mma"


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for ``dtype`` (ignored for bf16/fp16 inputs)."""
    return fp32_mode() if dtype == torch.float32 else "tf32"


def pixel_class(n_pixels: int) -> int:
    """Coarse autotuning key of the GEMM M dimension: batch 1 and batch 256 want different tiles,
    but retuning for every image size would cost a benchmark round per shape."""
    return 0 if n_pixels <= 4096 else 1 if n_pixels <= 65536 else 2


def fit(tiles: Sequence[Tile], n: int, k: int, max_m: Optional[int] = None) -> Tuple[Tile, ...]:
    """The candidate tiles shrunk to the call's channel counts (BLOCK_N <= n, BLOCK_K <= k, both
    >= 16), without duplicates, in order; ``max_m`` drops tiles with a larger BLOCK_M (the last
    candidate always stays)."""
    fitted = []
    for tile in tiles:
        tile = Tile(
            tile.block_m,
            min(tile.block_n, pow2_clamp(n, 16, 1 << 30)),
            min(tile.block_k, pow2_clamp(k, 16, 1 << 30)),
            tile.num_warps,
            tile.num_stages,
        )
        if tile not in fitted and (max_m is None or tile.block_m <= max_m):
            fitted.append(tile)
    return tuple(fitted) or (tiles[-1],)


# At most this many candidates are benchmarked per autotuning key: each costs a compile (0.5-1.5 s
# on the GPU machine) and ~30-80 ms of benchmarking at batch-256 sizes (GPU_REVIEW.md §1).
MAX_CANDIDATES = 4


def prune(tiles: Sequence[Tile], m: int) -> Tuple[Tile, ...]:
    """The candidates worth trying for a GEMM of ``m`` rows (pixels), at most MAX_CANDIDATES:
    - m <= 4096 (batch 1 from stage 2 on: 576-3136 pixels): no 128-row tiles. 576 pixels make 5
      of them per output-channel column, so a 2048-channel GEMM has 80 programs for 132 SMs;
    - m > 65536 (batch >= 32 everywhere): no 32-row tiles. They read every weight tile twice as
      often per pixel as 64-row ones and exist for the small m above.
    The last fitted tile stays if nothing else does."""
    size = pixel_class(m)
    kept = [t for t in tiles if not (size == 0 and t.block_m >= 128) and not (size == 2 and t.block_m <= 32)]
    return tuple(kept[:MAX_CANDIDATES]) or tuple(tiles[-1:])


def candidates(op: str, table: Dict[str, Tuple[Tile, ...]], dtype: torch.dtype, n: int, k: int, m: int,
               max_m: Optional[int] = None) -> Tuple[Tile, ...]:
    """The tiles to try for an (m × k) · (k × n) GEMM: the table's entries for the dtype fitted
    to n and k (:func:`fit`) and pruned for m (:func:`prune`); one under
    BAGNET_FAST_AUTOTUNE=0, :func:`force_tile` or the interpreter."""
    if interpreting():
        tiles = (INTERPRETER_TILE,)
    elif op in _forced_tiles:
        tiles = (_forced_tiles[op],)
    else:
        tiles = prune(fit(table[dtype_class(dtype)], n, k, max_m), m)
        if os.environ.get("BAGNET_FAST_AUTOTUNE", "1") == "0":
            tiles = tiles[:1]
    for tile in tiles:
        check_dot_tile(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
    return tiles


def _quick_bench(kernel_call: Callable[[], None], quantiles) -> object:
    # triton's default (25 ms warm-up, 100 ms of repeats per candidate) would make the first
    # forward of a BagNet-33 take tens of seconds over its ~20 GEMM shapes; 5 + 20 ms still ranks
    # kernels that run for microseconds to milliseconds.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


_tuners: Dict[Tuple[int, Tuple[Tile, ...], Tuple[str, ...]], object] = {}


def autotuned(kernel, tiles: Tuple[Tile, ...], key: Tuple[str, ...], reset: Tuple[str, ...] = ()):
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
