"""Backends that execute an inference plan, and the choice between them.

- ``torch``: the pure-PyTorch composition of every fused unit (any device, any float dtype).
- ``cpu``: oneDNN convolutions with fused bias/ReLU/residual post-ops and prepacked weights,
  plus our C++ ``pointwise_bottleneck`` (cache-tiled) from bagnet_fast._C. float32 on CPU.

A backend that was asked for and is unavailable raises with the reason; the automatic choice
falls back to ``torch`` with a warning that says why (never silently).
"""

from __future__ import annotations

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

    def stem(self, unit, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block(self, unit, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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

    def stem(self, unit, x):
        return ref.conv_bias_act(x, unit.weight, unit.bias, unit.stride, relu=True)

    def block(self, unit, x):
        if unit.is_pointwise:
            c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
            return ref.pointwise_bottleneck(
                x, c1.weight, c1.bias, c2.weight, c2.bias, c3.weight, c3.bias
            )
        t = ref.conv_bias_act(x, unit.conv1.weight, unit.conv1.bias)
        t = ref.conv_bias_act(t, unit.conv2.weight, unit.conv2.bias, unit.conv2.stride)
        residual = x
        if unit.downsample is not None:
            ds = unit.downsample
            xs = downsample_input(x, ds.stride, t.shape[-2], t.shape[-1])
            residual = ref.conv_bias_act(xs, ds.weight, ds.bias, relu=False)
        return ref.conv_bias_act(t, unit.conv3.weight, unit.conv3.bias, residual=residual)


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

    def _conv(self, unit, x, relu=True, residual=None, stride=None):
        weight = unit.prepared["onednn"]
        stride = [unit.stride, unit.stride] if stride is None else [stride, stride]
        if residual is None:
            return self._mkldnn._convolution_pointwise(
                x, weight, unit.bias, [0, 0], stride, [1, 1], 1, "relu" if relu else "none", [], ""
            )
        return self._mkldnn._convolution_pointwise.binary(
            x, residual, weight, unit.bias, [0, 0], stride, [1, 1], 1, "add", 1.0,
            "relu" if relu else None, [], "",
        )

    def stem(self, unit, x):
        return self._conv(unit, x)

    def block(self, unit, x):
        if unit.is_pointwise:
            # In place: x is an activation the plan owns (the stem's or a block's output).
            c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
            torch.ops.bagnet_fast.pointwise_bottleneck_(
                x, c1.prepared["onednn"], c1.bias, c2.prepared["onednn"], c2.bias,
                c3.prepared["onednn"], c3.bias,
            )
            return x
        t = self._conv(unit.conv1, x)
        t = self._conv(unit.conv2, t)
        height, width = t.shape[-2:]
        if unit.downsample is not None:
            xs = downsample_input(x, unit.downsample.stride, height, width)
            xs = xs.contiguous(memory_format=torch.channels_last)
            residual = self._conv(unit.downsample, xs, relu=False, stride=1)  # xs is subsampled
        else:
            residual = ref.crop_top_left(x, height, width).contiguous(memory_format=torch.channels_last)
        return self._conv(unit.conv3, t, residual=residual)

    def spatial_mean_linear(self, x, weight, bias):
        return torch.ops.bagnet_fast.spatial_mean_linear(x, weight, bias)


_BACKENDS = {"torch": TorchBackend, "cpu": CpuBackend}


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
    if name in ("triton", "cuda"):
        return False, f"the {name} backend is not implemented yet"
    raise ValueError(f"unknown backend {name!r}; choose from {sorted(_BACKENDS)} or None")


_PREFERENCE = ("cpu", "torch")
_warned: set = set()


def select(name: Optional[str], device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend ``name`` (raises if unusable), or the fastest usable one when None."""
    if name is not None:
        ok, reason = available(name, device, dtype)
        if not ok:
            raise RuntimeError(f"backend {name!r} is unavailable: {reason}")
        return _BACKENDS[name]()
    reasons = []
    for candidate in _PREFERENCE:
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
