"""Backends that execute an inference plan, and the choice between them.

- ``torch``: the pure-PyTorch composition of every fused unit (any device, any float dtype).
- ``cpu``: oneDNN convolutions with fused bias/ReLU/residual post-ops and prepacked weights,
  plus our C++ ``pointwise_bottleneck_`` from bagnet_fast._C. float32 on CPU.
- ``triton``: our Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1 for testing).

A backend that was asked for and is unavailable raises with the reason; the automatic choice
falls back to ``torch`` with a warning that says why (never silently).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Dict, Optional, Tuple

import torch

from . import _extension
from .ops import has_op
from .ops import reference as ref

__all__ = ["Backend", "TorchBackend", "CpuBackend", "available", "select", "backends"]


class Backend:
    name = "abstract"

    def prepare(self, plan) -> None:
        """Precompute backend-specific weight forms (prepacked layouts, ...)."""

    def conv(self, unit, x, stride: int, relu=True, residual=None) -> torch.Tensor:
        """act(conv_valid(x, stride) + bias [+ residual cropped])."""
        raise NotImplementedError

    def pointwise(self, unit, x: torch.Tensor) -> torch.Tensor:
        """A whole 1x1-only block (``unit.is_pointwise``)."""
        raise NotImplementedError

    def stem(self, unit, x: torch.Tensor) -> torch.Tensor:
        return self.conv(unit, x, unit.stride)

    def block(self, unit, x: torch.Tensor) -> torch.Tensor:
        if unit.is_pointwise:
            return self.pointwise(unit, x)
        t = self.conv(unit.conv1, x, unit.conv1.stride)
        t = self.conv(unit.conv2, t, unit.conv2.stride)
        height, width = t.shape[-2:]
        if unit.downsample is not None:
            xs = downsample_input(x, unit.downsample.stride, height, width)
            residual = self.conv(unit.downsample, self._dense(xs), 1, relu=False)  # xs is subsampled
        else:
            residual = self._dense(ref.crop_top_left(x, height, width))
        return self.conv(unit.conv3, t, unit.conv3.stride, residual=residual)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """A strided view in the form this backend's convolutions read (default: as is)."""
        return x

    def spatial_mean_linear(self, x, weight, bias) -> torch.Tensor:
        return ref.spatial_mean_linear(x, weight, bias)

    def patch_logits(self, x, weight, bias, classes=None) -> torch.Tensor:
        return ref.patch_logits(x, weight, bias, classes)

    def __repr__(self) -> str:
        return f"<bagnet_fast backend {self.name!r}>"


def downsample_input(x: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """The pixels of x that a strided 1x1 downsample reads for a (height, width) output:
    crop-before-downsample skips the rows and columns the residual crop would discard."""
    return x[:, :, : (height - 1) * stride + 1 : stride, : (width - 1) * stride + 1 : stride]


class TorchBackend(Backend):
    name = "torch"

    def conv(self, unit, x, stride, relu=True, residual=None):
        return ref.conv_bias_act(x, unit.weight, unit.bias, stride, relu=relu, residual=residual)

    def pointwise(self, unit, x):
        c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
        return ref.pointwise_bottleneck(x, c1.weight, c1.bias, c2.weight, c2.bias, c3.weight, c3.bias)


class CpuBackend(Backend):
    """oneDNN convolutions with fused post-ops, prepacked weights, and the C++ fused ops."""

    name = "cpu"

    def __init__(self) -> None:
        self._mkldnn = torch.ops.mkldnn

    def _pack(self, unit) -> None:
        # oneDNN's blocked weight layout, computed once (reordering per call cost 6 % of a
        # BagNet-33 forward). The packed form is valid for any input size.
        unit.prepared["onednn"] = self._mkldnn._reorder_convolution_weight(
            unit.weight, [0, 0], [unit.stride, unit.stride], [1, 1], 1, None
        )

    def prepare(self, plan) -> None:
        self._pack(plan.stem)
        for block in plan.blocks:
            for unit in (block.conv1, block.conv2, block.conv3, block.downsample):
                if unit is not None:
                    self._pack(unit)

    def conv(self, unit, x, stride, relu=True, residual=None):
        weight = unit.prepared["onednn"]
        stride = [stride, stride]
        if residual is None:
            return self._mkldnn._convolution_pointwise(
                x, weight, unit.bias, [0, 0], stride, [1, 1], 1, "relu" if relu else "none", [], ""
            )
        # oneDNN's binary post-op reads a dense residual of the output's size (Backend.block
        # crops it and makes it dense).
        return self._mkldnn._convolution_pointwise.binary(
            x, residual, weight, unit.bias, [0, 0], stride, [1, 1], 1, "add", 1.0,
            "relu" if relu else None, [], "",
        )

    def pointwise(self, unit, x):
        # In place: x is an activation the plan owns (the stem's or a block's output).
        c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
        torch.ops.bagnet_fast.pointwise_bottleneck_(
            x, c1.prepared["onednn"], c1.bias, c2.prepared["onednn"], c2.bias,
            c3.prepared["onednn"], c3.bias,
        )
        return x

    def _dense(self, x):
        return x.contiguous(memory_format=torch.channels_last)

    def spatial_mean_linear(self, x, weight, bias):
        return torch.ops.bagnet_fast.spatial_mean_linear(x, weight, bias)


class TritonBackend(Backend):
    """Our Triton kernels (kernels/, launchers in bagnet_fast/ops/triton_ops.py). On CUDA
    tensors; on CPU tensors only under TRITON_INTERPRET=1 (how it is tested without a GPU)."""

    name = "triton"

    def __init__(self) -> None:
        from .ops import triton_ops  # imports triton: only when this backend is chosen

        self._ops = triton_ops

    def conv(self, unit, x, stride, relu=True, residual=None):
        return self._ops.conv_bias_act(x, unit.weight, unit.bias, stride, relu=relu, residual=residual)

    def pointwise(self, unit, x):
        c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
        return self._ops.pointwise_bottleneck(x, c1.weight, c1.bias, c2.weight, c2.bias, c3.weight, c3.bias)

    def spatial_mean_linear(self, x, weight, bias):
        return self._ops.spatial_mean_linear(x, weight, bias)

    def patch_logits(self, x, weight, bias, classes=None):
        return self._ops.patch_logits(x, weight, bias, classes)


_BACKENDS = {"torch": TorchBackend, "cpu": CpuBackend, "triton": TritonBackend}


def available(name: str, device: torch.device, dtype: torch.dtype) -> Tuple[bool, str]:
    """(usable, reason) for backend ``name`` on ``device`` with ``dtype``."""
    device = torch.device(device)
    if name == "torch":
        return True, "pure PyTorch, any device and dtype"
    if name == "cpu":
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, not {device.type}"
        if dtype != torch.float32:
            return False, f"the cpu backend computes in float32, not {dtype}"
        if not torch.backends.mkldnn.is_available():
            return False, "this torch build has no oneDNN (mkldnn)"
        if not has_op("pointwise_bottleneck", "CPU"):
            return False, f"the C++ extension bagnet_fast._C is not loaded ({_extension.load_error()})"
        return True, "oneDNN convolutions + C++ fused ops"
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install triton)"
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return False, "Triton runs on CPU tensors only with TRITON_INTERPRET=1 (for testing)"
            if dtype != torch.float32:
                return False, "the Triton interpreter computes dots in float32 only"
            return True, "Triton kernels in the interpreter (TRITON_INTERPRET=1)"
        if device.type != "cuda":
            return False, f"Triton kernels run on CUDA devices, not {device.type}"
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False, f"the Triton kernels support float32/float16/bfloat16, not {dtype}"
        return True, "fused Triton kernels"
    if name == "cuda":
        return False, "the cuda backend is not implemented yet"
    raise ValueError(f"unknown backend {name!r}; choose from {sorted(_BACKENDS)} or None")


_PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")}
_warned: set = set()


def select(name: Optional[str], device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend ``name`` (raises if unusable), or the fastest usable one when None."""
    if name is not None:
        ok, reason = available(name, device, dtype)
        if not ok:
            raise RuntimeError(f"backend {name!r} is unavailable: {reason}")
        return _BACKENDS[name]()
    reasons = []
    for candidate in _PREFERENCE.get(device.type, ("torch",)):
        ok, reason = available(candidate, device, dtype)
        if ok:
            if reasons and (device.type, dtype) not in _warned and candidate == "torch":
                _warned.add((device.type, dtype))
                warnings.warn(
                    f"bagnet_fast: using the pure-PyTorch backend on {device.type}/{dtype}: "
                    + "; ".join(reasons),
                    stacklevel=3,
                )
            return _BACKENDS[candidate]()
        if candidate != "torch" and _relevant(candidate, device):
            reasons.append(f"{candidate}: {reason}")
    raise AssertionError("the torch backend is always available")


def _relevant(backend: str, device: torch.device) -> bool:
    return {"cpu": "cpu", "triton": "cuda", "cuda": "cuda"}.get(backend) == device.type


def backends(device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float32) -> Dict[str, Dict[str, object]]:
    """Which backends can run on ``device``/``dtype`` and why (not)."""
    report = {}
    for name in ("cpu", "triton", "cuda", "torch"):
        ok, reason = available(name, torch.device(device), dtype)
        report[name] = {"available": ok, "reason": reason}
    return report
