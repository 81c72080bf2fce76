"""Timing shared by ``bench``, ``profile``, the benchmark suites and the GPU check: one way to
time a call, one way to measure the device's limits, and the machine's name.

Limits are measured on the spot, so that a number from one machine can be read on another:
the best GEMM reachable from PyTorch in the benchmark's dtype (a square ``torch.mm`` and, on
CPUs, a large oneDNN 1x1 convolution: oneDNN's convolutions beat MKL's ``torch.mm`` on the
development machine, so ``torch.mm`` alone is no peak and rows read above 100 % of it) and a
large copy. Each measurement is bounded in time: sizes grow only while a call stays fast, so a
dtype without fast kernels on the device (float16 on most CPUs) cannot stall the run.
"""

from __future__ import annotations

import math
import platform
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["DTYPES", "sync", "measure", "measure_peaks", "cpu_name", "device_name", "resolve_device",
           "median_interval", "paired_ratio"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> List[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed ones, the device
    synchronised inside each timing."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def _best_seconds(fn: Callable[[], object], device: torch.device, budget: float) -> float:
    """The fastest of up to 5 calls after one warm-up, stopping once ``budget`` seconds are spent."""
    spent = measure(fn, device, 0, 1)[0]  # warm-up, and the cost of one call
    best = float("inf")
    for _ in range(5):
        if spent > budget and best < float("inf"):
            break
        (seconds,) = measure(fn, device, 0, 1)
        best, spent = min(best, seconds), spent + seconds
    return best


def _matmul_peak(device: torch.device, dtype: torch.dtype, max_n: int, budget: float) -> Dict[str, float]:
    """Square torch.mm: n doubles from 256 while one call takes under 20 ms (and n <= max_n)."""
    n, result = 256, {}
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds = _best_seconds(lambda: torch.mm(a, b), device, budget)
        result = {"flops_per_s": 2 * n**3 / seconds, "name": f"torch.mm {n}x{n}"}
        if n >= max_n or seconds > 0.02:
            return result
        n *= 2


def _onednn_conv_peak(dtype: torch.dtype, budget: float) -> Optional[Dict[str, float]]:
    """A 1x1 convolution 1024 -> 1024 on a 64x64 channels-last map through oneDNN (the kernels
    the cpu backend runs): a (4096 x 1024) x (1024 x 1024) GEMM. None where oneDNN lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    x = torch.randn(1, 1024, 64, 64).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(1024, 1024, 1, 1).to(dtype)
    bias = torch.zeros(1024, dtype=dtype)

    def conv():
        return torch.ops.mkldnn._convolution_pointwise(x, w, bias, [0, 0], [1, 1], [1, 1], 1, "none", [], "")

    try:
        seconds = _best_seconds(conv, torch.device("cpu"), budget)
    except RuntimeError:  # no oneDNN kernel for this dtype here
        return None
    return {"flops_per_s": 2 * 4096 * 1024 * 1024 / seconds, "name": "oneDNN 1x1 conv 4096x1024x1024"}


def measure_peaks(device: torch.device, dtype: torch.dtype, budget: float = 0.5) -> Dict[str, object]:
    """The device's limits as reachable from PyTorch, measured now: the best GEMM in ``dtype``
    (FLOP/s, and which GEMM it was) and the best of a few large copies (bytes read + written per
    second; CPU: 128 MiB, GPU: 1 GiB, beyond the caches). About ``budget`` seconds per candidate."""
    on_gpu = device.type == "cuda"
    candidates = [_matmul_peak(device, dtype, 8192 if on_gpu else 2048, budget)]
    if device.type == "cpu":
        candidates.append(_onednn_conv_peak(dtype, budget))
    best = max((c for c in candidates if c is not None), key=lambda c: c["flops_per_s"])
    elements = (1 << 30 if on_gpu else 128 << 20) // 4
    src = torch.ones(elements, device=device)
    dst = torch.empty_like(src)
    copy = _best_seconds(lambda: dst.copy_(src), device, budget)
    return {
        "matmul_flops_per_s": best["flops_per_s"],
        "matmul_source": best["name"],
        "matmul_candidates": {c["name"]: c["flops_per_s"] for c in candidates if c is not None},
        "copy_bytes_per_s": 2 * src.numel() * src.element_size() / copy,
        "copy_mib": src.numel() * src.element_size() / 2**20,
    }


def cpu_name() -> str:
    """The CPU model (/proc/cpuinfo on Linux; platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def resolve_device(name: Optional[str], option: str = "--device") -> torch.device:
    """``name`` as a torch.device that exists here (None: cuda if available, else cpu), or a
    one-line ``SystemExit`` naming ``option``."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SystemExit(f"{option} {name!r} is not a device ({error})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"{option} {name}: no CUDA device is available here (torch {torch.__version__}"
                             f"{', a CPU-only build' if torch.version.cuda is None else ''})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise SystemExit(f"{option} {name}: bagnet_fast runs on cpu or cuda devices")
    return device


def median_interval(values: Sequence[float], level: float = 0.95) -> Dict[str, object]:
    """The median of ``values`` and a distribution-free confidence interval for it: the order
    statistics (k, n + 1 - k) with the largest k whose two-sided binomial(n, 1/2) tail stays
    within 1 - level (no assumption on the noise's shape; this VM's is skewed, slow outliers).
    ``low``/``high`` are None when n is too small (n < 6 at 95 %); ``coverage`` is the exact one."""
    ordered, n = sorted(values), len(values)
    if n == 0:
        raise ValueError("median_interval needs at least one value")
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    k, tail = 0, 0.0
    while True:  # tail = P(X <= k) for X ~ binomial(n, 1/2)
        next_tail = tail + math.comb(n, k) / 2 ** n
        if 2 * next_tail > 1 - level:
            break
        tail, k = next_tail, k + 1
    if k == 0:
        return {"median": median, "low": None, "high": None, "coverage": None, "n": n}
    return {"median": median, "low": ordered[k - 1], "high": ordered[n - k], "coverage": 1 - 2 * tail, "n": n}


def paired_ratio(baseline_seconds: Sequence[float], seconds: Sequence[float], level: float = 0.95) -> Dict[str, object]:
    """Speed-up of an implementation timed at ``seconds`` over one timed at ``baseline_seconds``
    in the same rounds: per round baseline / ours, then ``median_interval`` of those. Pairing by
    round cancels the slow stretches both met (the machine's noise is mostly such stretches)."""
    if len(baseline_seconds) != len(seconds):
        raise ValueError(f"paired_ratio needs one time per round from each: {len(baseline_seconds)} vs {len(seconds)}")
    return median_interval([b / s for b, s in zip(baseline_seconds, seconds)], level)
