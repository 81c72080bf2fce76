"""The one op-test harness: where each implementation of an op runs, the float64 oracle, the
tolerance table per dtype, and the comparison that says where it failed.

Implementations: ``cpu`` (torch.ops.bagnet_fast.<op> on CPU tensors, the C++ kernels), ``cuda``
(the same ops on CUDA tensors), ``triton`` (bagnet_fast.ops.triton_ops.<op>: on a GPU, or on CPU
tensors in the Triton interpreter, float32 only). The oracle is the pure-PyTorch twin of the op
(bagnet_fast.ops.reference) evaluated in float64 on the same inputs.

Tolerances (max |actual - oracle| / max |oracle|):
- float64: 1e-12 (summation order only);
- float32: 1e-5 (the fp32 parity bound; GEMMs reorder fp32 sums, ~1e-7 observed, and a TF32
  leak, ~1e-3, fails it); ops without a reduction may state a tighter bound;
- bfloat16 / float16: twice PyTorch's own error in that dtype (the reference evaluated on the
  same 16-bit inputs), flash-attention's rule for low-precision kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from bagnet_fast import _extension
from bagnet_fast.ops import has_op

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
LOW_PRECISION = (torch.bfloat16, torch.float16)
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def tolerance(dtype: torch.dtype, torch_error: Optional[float] = None, tight: Optional[float] = None) -> float:
    if dtype in LOW_PRECISION:
        assert torch_error is not None, "16-bit comparisons need PyTorch's own error"
        return 2 * torch_error
    return tight if tight is not None and dtype == torch.float32 else TOLERANCE[dtype]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, bound: float) -> None:
    """Shapes equal and relative error within ``bound``; on failure, the first mismatching index."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != oracle {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    error = relative_error(actual, expected)
    if not error <= bound:
        diff = (actual.double() - expected.double()).abs()
        scale = expected.double().abs().max().clamp_min(1e-30)
        first = tuple(int(i) for i in (diff > bound * scale).nonzero()[0])
        raise AssertionError(f"relative error {error:.3e} > {bound:.1e}; first mismatch at {first}: "
                             f"actual {actual[first].item():.7g}, oracle {expected[first].item():.7g}")


@dataclass(frozen=True)
class Implementation:
    name: str
    device: str
    dtypes: Tuple[torch.dtype, ...]

    def skip_reason(self, op: str, dtype: torch.dtype) -> Optional[str]:
        """Why this implementation of ``op`` cannot run here in ``dtype`` (None: it can)."""
        if dtype not in self.dtypes:
            return f"{self.name} is not tested in {dtype} here"
        if self.name in ("cpu", "cuda"):
            if not _extension.loaded():
                return f"bagnet_fast._C is not loaded ({_extension.load_error()})"
            if self.name == "cuda" and not torch.cuda.is_available():
                return "needs an NVIDIA GPU (run benchmarks/gpu_check.sh)"
            if not has_op(op, self.name.upper()):
                return f"torch.ops.bagnet_fast.{op} has no {self.name.upper()} kernel"
            return None
        if self.device == "cuda" and not torch.cuda.is_available():
            return "Triton needs a GPU or TRITON_INTERPRET=1"
        from bagnet_fast.executors import available

        usable, why_not = available("triton", torch.device(self.device), dtype)
        return None if usable else why_not

    def function(self, op: str) -> Callable:
        if self.name == "triton":
            from bagnet_fast.ops import triton_ops

            return getattr(triton_ops, op)
        return getattr(torch.ops.bagnet_fast, op)


_16BIT_ON_GPU = (torch.float32, torch.bfloat16, torch.float16)
IMPLEMENTATIONS = {
    "cpu": Implementation("cpu", "cpu", (torch.float64, torch.float32, torch.bfloat16, torch.float16)),
    "cuda": Implementation("cuda", "cuda", _16BIT_ON_GPU),
    # The interpreter has no bf16/fp16 dot (it multiplies raw bits) and ignores input_precision.
    "triton": Implementation("triton", "cpu", (torch.float32,)) if INTERPRETING
    else Implementation("triton", "cuda", _16BIT_ON_GPU),
}
