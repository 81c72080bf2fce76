"""Freed activation memory kept for reuse on Linux/glibc, set when the ``cpu`` backend first runs.

Why: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on free, so every large activation of every forward is page-faulted (and
zeroed by the kernel) anew. A BagNet-33 activation at 224 px is 50 MiB per image
(222 x 222 x 256 float32); at batch 8 a forward writes gigabytes of such maps. Measured on the
2-core AVX2 VM, BagNet-33 at 224, each setting in its own process, alternating
(benchmarks/cpu_malloc_speed.py, results/2026-12-02-s5-cpu-avx2-2core-peers/cpu-malloc-bagnet33.json):
batch 8 median 5.24 img/s kept vs 4.83 with glibc's defaults (1.08x; runs 4.75-5.73 vs
4.58-4.87); batch 1 no gain (5.19 vs 5.25, within noise: its maps are 8x smaller); 512 px
batch 2 1.02 vs 0.86 img/s (1.19x, three rounds, cpu-malloc-bagnet33-512.json). OpenVINO keeps its buffers
the same way; Intel's CPU tuning guides get the same effect by preloading jemalloc/tcmalloc.

How: ``mallopt(M_MMAP_MAX, 0)`` (large blocks come from the heap, so freed ones are reused) and
``mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)`` (the heap's free top is not handed back at once). The
cost: the process keeps its high-water mark of large blocks; after BagNet-33 forwards at 40
image sizes from 64 to 300 px (batch 2) resident memory was 2096 MiB against 1518 MiB.
The setting is process-wide. Opt out with ``BAGNET_FAST_CPU_MALLOC=system``, or choose the
caching allocator below with ``BAGNET_FAST_CPU_MALLOC=cache`` (read once, before the first
cpu-backend plan is built); :func:`state` says what was done and why.

The caching allocator (:func:`enable_caching_allocator`, opt-in, for training): glibc's setting
above reuses blocks but its heap keeps every high-water mark and fragments (a training step with
stage checkpointing held 2872 MiB resident for 1478 MiB of live tensors), and glibc's defaults
return memory but page-fault every large block anew. The C++ allocator of
csrc/cpu/caching_allocator.cpp keeps freed blocks of >= 1 MiB by size for requests of the same
size (up to 5/4 of it), maps new ones with transparent huge pages, and never keeps more than the
high-water mark of live blocks: the resident memory of a step follows its live tensors.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

__all__ = ["ENV", "caching_allocator_stats", "disable_caching_allocator", "empty_cache",
           "enable_caching_allocator", "keep_freed_memory", "reset_peak_stats", "state"]

ENV = "BAGNET_FAST_CPU_MALLOC"
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = (1 << 31) - 1  # the largest value the int parameter takes

_state: Optional[str] = None


def keep_freed_memory() -> str:
    """Apply the setting once per process (idempotent); returns :func:`state`. Public as
    ``bagnet_fast.keep_freed_cpu_memory()``: the cpu backend calls it when it prepares its first
    plan. Call it before training to have it there too: a BagNet-33 training step (SGD, 2-core
    AVX2 VM, two rounds, results/2026-12-03-s6-cpu-avx2-2core-training/) ran 1.80x the official
    modules' speed at batch 8, 224 and 1.65x at batch 2, 512 (the official modules themselves
    1.73x / 1.75x), with 1.26x the peak resident memory of the official modules' default."""
    global _state
    if _state is None:
        _state = _apply()
    return _state


def _apply() -> str:
    choice = os.environ.get(ENV, "keep")
    if choice not in ("keep", "system", "cache"):
        raise ValueError(f"{ENV}={choice!r}: expected 'keep' (the default), 'system' or 'cache'")
    if choice == "system":
        return f"the system allocator's defaults ({ENV}=system)"
    if not sys.platform.startswith("linux"):
        return f"the system allocator's defaults (not Linux: {sys.platform})"
    if choice == "cache":
        stats = enable_caching_allocator()
        return (f"bagnet_fast's caching allocator ({ENV}=cache; huge pages "
                f"{'on' if stats['huge_pages'] else 'off'})")
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        return "the system allocator's defaults (not glibc)"
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
        return f"glibc {version} defaults (mallopt refused the setting)"
    return f"glibc {version}: freed large blocks kept for reuse (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB; {ENV}=system opts out)"


def state() -> str:
    """What the cpu backend did to the allocator in this process ("not applied yet" before it ran)."""
    return _state or "not applied yet (the cpu backend has not built a plan in this process)"


# --- the caching allocator (csrc/cpu/caching_allocator.cpp) ------------------------------------


def _extension():
    try:
        from .. import _C
    except ImportError as error:  # the C++ extension is not built
        raise RuntimeError(f"the CPU caching allocator needs bagnet_fast's C++ extension ({error}); "
                           "build it with `pip install -e .`") from error
    if not hasattr(_C, "cpu_caching_allocator_set"):
        raise RuntimeError("bagnet_fast._C predates the CPU caching allocator: rebuild it (`pip install -e .`)")
    return _C


def enable_caching_allocator(huge_pages: bool = True) -> dict:
    """Make torch's CPU allocator bagnet_fast's caching allocator, for this process; returns
    :func:`caching_allocator_stats`. Linux only (it maps memory with mmap).

    Freed blocks of >= 1 MiB are kept and handed out again to requests of the same size (up to
    5/4 of it); new ones are mapped 2 MiB-aligned with ``MADV_HUGEPAGE`` when ``huge_pages``
    (fewer page faults where transparent huge pages are in "madvise" or "always" mode). The
    blocks kept never take live + kept bytes above the largest live total seen, so the resident
    memory follows the live tensors instead of the allocator's history. Measured on the 2-core
    AVX2 VM, BagNet-33 SGD step, batch 8 at 224 (results/2026-12-03-s7-cpu-avx2-2core-training/):
    see the README's fine-tuning table. Once installed the allocator stays torch's CPU allocator
    until the process ends (oneDNN frees its buffers through the current one);
    :func:`disable_caching_allocator` stops the caching and unmaps what is kept."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"the CPU caching allocator needs Linux (mmap, madvise), not {sys.platform}")
    global _state
    _extension().cpu_caching_allocator_set(True, bool(huge_pages))
    if _state is None:  # the cpu backend then leaves glibc's settings alone, and state() says why
        _state = f"bagnet_fast's caching allocator (enable_cpu_caching_allocator; huge pages {'on' if huge_pages else 'off'})"
    return caching_allocator_stats()


def disable_caching_allocator() -> dict:
    """Stop caching: kept blocks are unmapped, new blocks come from c10's allocator (glibc)."""
    C = _extension()
    C.cpu_caching_allocator_set(False, bool(C.cpu_caching_allocator_stats()["huge_pages"]))
    return caching_allocator_stats()


def caching_allocator_stats() -> dict:
    """The caching allocator's counters: ``installed``, ``enabled``, ``huge_pages``,
    ``live_bytes`` (its blocks in use), ``cached_bytes`` (kept for reuse), ``peak_live_bytes``
    (since :func:`reset_peak_stats`), ``bound_bytes`` (live + cached never exceed it),
    ``hits``, ``misses``, ``evictions`` (blocks unmapped to stay within the bound) and
    ``min_block_bytes`` (smaller blocks go to c10's allocator)."""
    return dict(_extension().cpu_caching_allocator_stats())


def empty_cache() -> int:
    """Unmap the kept blocks (like ``torch.cuda.empty_cache``); returns the bytes released."""
    return int(_extension().cpu_caching_allocator_empty_cache())


def reset_peak_stats() -> None:
    """Restart ``peak_live_bytes`` at the current live bytes (the bound is not changed)."""
    _extension().cpu_caching_allocator_reset_peak()
