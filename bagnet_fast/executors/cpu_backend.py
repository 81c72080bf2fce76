"""The ``cpu`` backend: oneDNN convolutions with fused bias/ReLU/residual post-ops on weights
prepacked for each input shape, and our C++ ``pointwise_bottleneck_`` (bagnet_fast._C), which
runs a whole 1x1-only block in place. float32 on CPU tensors, and bfloat16 on CPUs with
AVX512-BF16 or AMX units: the same plan on bf16 activations and weights, oneDNN accumulating in
fp32 and rounding each unit's output to bf16 once (PyTorch's bf16 rounds after every op)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Tuple

import torch

from .. import _extension
from ..ops import has_op
from . import BackendInfo, cpu_memory, register_backend
from .base import Backend


def _probe(device: torch.device, dtype: torch.dtype):
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if not has_op("pointwise_bottleneck", "CPU"):
        return f"the C++ extension bagnet_fast._C is not loaded ({_extension.load_error()})"
    if dtype == torch.bfloat16:
        return bf16_units_missing()
    return None


def _cpu_flag(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)  # private probes: absent in some torch versions
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def bf16_units_missing() -> "str | None":
    """None if this CPU has bf16 dot-product units (AVX512-BF16 or AMX) and oneDNN uses them, else
    why the bf16 plan does not run here. Without those units oneDNN would emulate bf16 with
    conversions around fp32 arithmetic (AVX-512 without BF16) or has no bf16 convolutions
    (torch 2.14 on AVX2 raised "bf16 path needs avx_ne_convert or avx512bw"); the emulated case
    was not measured, and is left to the torch backend with this reason."""
    units = [name for name, flag in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
             if _cpu_flag(flag)]
    if not units:
        return (f"bfloat16 on the cpu backend needs AVX512-BF16 or AMX units; this CPU has neither "
                f"(torch: {torch.backends.cpu.get_cpu_capability()})")
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (RuntimeError, AttributeError):
        onednn = False
    if not onednn:
        return f"this CPU has {'/'.join(units)} but torch's oneDNN reports no bfloat16 support"
    return None


def _dtype_note(dtype: torch.dtype) -> str:
    """Why a float16 model does not run here, with what this CPU could do (oneDNN's fp16
    convolutions need AVX512-FP16/AMX-FP16 units)."""
    if dtype != torch.float16:
        return ""
    capability = torch.backends.cpu.get_cpu_capability()
    try:  # looked up here: a torch without the probe raises AttributeError
        has_units = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (RuntimeError, AttributeError):
        has_units = False
    return (f"no fused float16 CPU plan is built; this CPU: {capability}, oneDNN float16 kernels "
            f"{'available' if has_units else 'not available'}")


class CpuBackend(Backend):
    """oneDNN convolutions with fused post-ops and the C++ fused ops.

    Weights are reordered into oneDNN's blocked layout once per (unit, input shape): oneDNN then
    picks its kernel for that shape, and no call reorders plain weights on the fly. Measured on
    the 2-core Zen 5 machine (ms per call, plain / prepacked without a shape / prepacked for the
    shape): layer4.0's 3x3 512->512 on a 4x4 map 11.2 / 0.44 / 0.39, on 24x24 48 / 19.7 / 19.3;
    layer3.0's 3x3 256->256 on 10x10 1.23 / 28.2 / 0.74 (a shapeless prepack can pick a kernel
    that is 38x slower); a 1x1 1024->2048 on 2x2 3.56 / 0.35 / 0.28. Inputs of small images
    spent most of their time in those on-the-fly reorders (48 px images ran at 0.9x the
    reference); the packs of the most recent shapes are kept (``PACKED_SHAPES`` per unit).
    """

    name = "cpu"
    PACKED_SHAPES = 4  # per unit: a few image sizes in turn (heatmap tiles, mixed folders)

    def __init__(self) -> None:
        self._mkldnn = torch.ops.mkldnn

    def prepare(self, plan) -> None:
        # Large activations reused instead of page-faulted at every forward (cpu_memory: 1.08x at
        # BagNet-33 batch 8, measured); once per process, BAGNET_FAST_CPU_MALLOC=system opts out.
        cpu_memory.keep_freed_memory()

    def propagates_nan(self, device: torch.device) -> bool:
        # oneDNN's ReLU post-op (the zero-slope variant is a max with 0) maps NaN to 0, and it
        # is the only form torch exposes: the plan checks inputs and weights instead.
        return False

    def _packed(self, conv, shape: Tuple[int, ...]) -> torch.Tensor:
        """conv's weight prepacked for inputs of ``shape`` (cached, most recent shapes kept)."""
        cache = conv.prepared.setdefault("onednn", OrderedDict())
        shape = tuple(shape)
        packed = cache.get(shape)
        if packed is None:
            packed = self._mkldnn._reorder_convolution_weight(
                conv.weight, [0, 0], [conv.stride, conv.stride], [1, 1], 1, list(shape)
            )
            cache[shape] = packed
            while len(cache) > self.PACKED_SHAPES:
                cache.popitem(last=False)
        else:
            cache.move_to_end(shape)
        return packed

    def conv_bias_act(self, conv, x, relu=True, residual=None):
        x = _canonical_single_pixel(x)
        weight = self._packed(conv, x.shape)
        stride = [conv.stride, conv.stride]
        if residual is None:
            return self._mkldnn._convolution_pointwise(
                x, weight, conv.bias, [0, 0], stride, [1, 1], 1, "relu" if relu else "none", [], ""
            )
        # oneDNN's binary post-op reads a dense residual of the output's size (Backend.bottleneck
        # crops it and makes it dense).
        return self._mkldnn._convolution_pointwise.binary(
            x, residual, weight, conv.bias, [0, 0], stride, [1, 1], 1, "add", 1.0,
            "relu" if relu else None, [], "",
        )

    def pointwise_bottleneck(self, unit, x):
        # In place: x is an activation the plan owns (the stem's or a block's output). The op
        # convolves the (1, C, 1, N*H*W) pixel-row view of x: pack for that shape.
        pixels = x.shape[0] * x.shape[2] * x.shape[3]
        c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
        planes = c1.weight.shape[0]
        w1 = self._packed(c1, (1, x.shape[1], 1, pixels))
        w2 = self._packed(c2, (1, planes, 1, pixels))
        w3 = self._packed(c3, (1, planes, 1, pixels))
        torch.ops.bagnet_fast.pointwise_bottleneck_(x, w1, c1.bias, w2, c2.bias, w3, c3.bias)
        return x

    def dense(self, x):
        return x.contiguous(memory_format=torch.channels_last)

    def spatial_mean_linear(self, x, weight, bias):
        return torch.ops.bagnet_fast.spatial_mean_linear(x, weight, bias)


def _canonical_single_pixel(x: torch.Tensor) -> torch.Tensor:
    """A 1x1 map with the strides of a contiguous tensor (a view, no copy). A 1x1 map's strides
    along H and W address nothing; oneDNN's outputs carry channels-last ones, (C, 1, C, C), and
    the binary-post-op convolution of torch 2.11's oneDNN fails on such an input ("could not
    create a memory"; torch 2.14 accepts it). Seen on images of exactly the patch size."""
    n, c, height, width = x.shape
    if height == 1 and width == 1 and x.stride(1) == 1 and x.stride(0) == c:
        return x.as_strided(x.shape, (c, 1, 1, 1), x.storage_offset())
    return x


register_backend(BackendInfo(
    name="cpu",
    load=lambda: CpuBackend,
    summary="oneDNN convolutions + C++ fused ops",
    devices=("cpu",),
    dtypes=(torch.float32, torch.bfloat16),
    preference={"cpu": 0},
    probe=_probe,
    dtype_note=_dtype_note,
))
