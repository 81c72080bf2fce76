"""Precision: float32 stays exact float32 whatever the caller set globally, and a report of what
each reduced-precision mode costs on a user's own weights and images.

Why: the official BagNet-33 weights lose ImageNet top-1 under TF32 (66.70 -> 64.23) and fp16
autocast (-> 57.96) (berenslab/bagnetsv2, 2025; docs/bagnet.md). PyTorch's global knobs —
``torch.backends.cuda.matmul.allow_tf32`` / ``fp32_precision``, ``torch.backends.cudnn.allow_tf32``
(on by default for convolutions), ``torch.set_float32_matmul_precision("high"/"medium")``, and
oneDNN's ``torch.backends.mkldnn.{matmul,conv}.fp32_precision`` ("bf16"/"tf32" on CPUs that have
them) — would each silently run the fast path's float32 GEMMs and convolutions in reduced
precision. The plan runs every float32 forward inside :func:`exact_fp32`, which sets them to
"ieee" and restores them after (about 20 us). Reduced precision only through bagnet_fast's own
settings: ``BAGNET_FAST_TF32=1`` (TF32 dots and convolutions on GPUs), or a bfloat16/float16
model. Under a caller's ``torch.autocast`` the fast path keeps the model's dtype (autocast does
not reach it); the reference path (training, gradients) follows autocast as PyTorch does.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

__all__ = ["exact_fp32", "fast_path_precision", "tf32_requested"]


def tf32_requested() -> bool:
    """Whether the user asked bagnet_fast for TF32 (``BAGNET_FAST_TF32=1``)."""
    return os.environ.get("BAGNET_FAST_TF32") == "1"


def _knobs():
    backends = torch.backends
    return (backends.cuda.matmul, backends.cudnn.conv, backends.mkldnn.matmul, backends.mkldnn.conv)


@contextlib.contextmanager
def exact_fp32(enabled: bool = True) -> Iterator[None]:
    """float32 GEMMs and convolutions in exact float32 (IEEE) inside the block, whatever the
    global TF32/bf16 settings; restored on exit. Not thread-safe against other threads changing
    the same settings at the same time (they are process-wide in PyTorch)."""
    if not enabled or tf32_requested():
        yield
        return
    knobs = _knobs()
    previous = [knob.fp32_precision for knob in knobs]
    if all(value == "ieee" for value in previous):
        yield
        return
    for knob in knobs:
        knob.fp32_precision = "ieee"
    try:
        yield
    finally:
        for knob, value in zip(knobs, previous):
            knob.fp32_precision = value


@contextlib.contextmanager
def fast_path_precision(dtype: torch.dtype, device_type: str) -> Iterator[None]:
    """The fast path's numerics: the model's own dtype (a caller's autocast switched off for the
    block) and, for float32, :func:`exact_fp32`."""
    with torch.autocast(device_type, enabled=False), exact_fp32(dtype == torch.float32):
        yield
