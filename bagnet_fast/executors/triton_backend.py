"""The ``triton`` backend: our Triton kernels (``kernels/``, launchers and ops in
:mod:`bagnet_fast.ops.triton_ops`). On CUDA tensors; on CPU tensors only under
TRITON_INTERPRET=1, which is how it is tested without a GPU."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

from . import BackendInfo, register_backend
from .base import Backend, downsample_input


def _probe(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only with TRITON_INTERPRET=1 (for testing)"
        if dtype != torch.float32:
            return "the Triton interpreter computes dots in float32 only"
        return _interpreter_problem()
    return None


@functools.lru_cache(maxsize=None)
def _interpreter_problem() -> Optional[str]:
    """Why the Triton interpreter cannot run our kernels with the installed triton and torch, or
    None: one tiny op, once per process. Seen failing: triton 3.6's interpreter on any loop with a
    run-time bound, and torch 2.11's wrap_triton on interpreted kernels (tested: triton 3.8 with
    torch 2.14). On a GPU the kernels are compiled and none of this applies."""
    import triton

    from ..ops import triton_ops

    try:
        x = torch.ones(1, 16, 2, 3).contiguous(memory_format=torch.channels_last)
        out = triton_ops.spatial_mean_linear(x, torch.ones(2, 16), torch.zeros(2))
        if not torch.equal(out, torch.full((1, 2), 16.0)):
            raise RuntimeError(f"a test mean came out {out.tolist()} instead of 16")
    except Exception as error:  # noqa: BLE001 - reported as the reason
        message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        return (f"the Triton interpreter of triton {triton.__version__} with torch {torch.__version__} cannot run "
                f"the kernels ({type(error).__name__}: {message}); tested with triton 3.8 and torch 2.14")
    return None


_JOINT_BIAS = "triton_bias_with_downsample"  # ConvUnit.prepared key of conv3: its bias + the downsample's


class TritonBackend(Backend):
    """The units as Triton ops; each op makes its tensors' CUDA device current itself."""

    name = "triton"

    def __init__(self) -> None:
        from ..ops import triton_ops  # imports triton: only when this backend is chosen

        self._ops = triton_ops

    def prepare(self, plan) -> None:
        # A first block's conv3 and downsample run as one GEMM (conv_downsample_bias_act), which
        # takes their biases summed: once per plan, in fp32 (the kernel adds biases in fp32).
        for unit in plan.blocks:
            if unit.downsample is not None:
                unit.conv3.prepared[_JOINT_BIAS] = unit.conv3.bias.float() + unit.downsample.bias.float()

    def conv_bias_act(self, conv, x, relu=True, residual=None):
        return self._ops.conv_bias_act(x, conv.weight, conv.bias, conv.stride, relu=relu, residual=residual)

    def bottleneck(self, unit, x):
        if unit.downsample is None:
            return super().bottleneck(unit, x)
        t = self.conv_bias_act(unit.conv1, x)
        t = self.conv_bias_act(unit.conv2, t)
        xs = downsample_input(x, unit.downsample_stride, *t.shape[-2:])
        return self._ops.conv_downsample_bias_act(t, unit.conv3.weight, unit.conv3.prepared[_JOINT_BIAS], xs,
                                                  unit.downsample.weight)

    def pointwise_bottleneck(self, unit, x):
        c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
        return self._ops.pointwise_bottleneck(x, c1.weight, c1.bias, c2.weight, c2.bias, c3.weight, c3.bias)

    def pointwise_bottleneck_mean(self, unit, x):
        # The last GEMM's epilogue adds its output into the means: the widest map of the network
        # (N, 2048, H', W') is never written. Those adds are atomics, whose order varies from run
        # to run once three or more tiles meet in one image (the fp32 means then differ in the
        # last bit, and a bf16 logit by one rounding): under
        # torch.use_deterministic_algorithms(True) the map is written and reduced in a fixed order.
        if torch.are_deterministic_algorithms_enabled():
            return super().pointwise_bottleneck_mean(unit, x)
        c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
        return self._ops.pointwise_bottleneck_mean(x, c1.weight, c1.bias, c2.weight, c2.bias, c3.weight, c3.bias)

    def spatial_mean_linear(self, x, weight, bias):
        return self._ops.spatial_mean_linear(x, weight, bias)

    def patch_logits(self, x, weight, bias, classes=None):
        return self._ops.patch_logits(x, weight, bias, classes)


register_backend(BackendInfo(
    name="triton",
    load=lambda: TritonBackend,
    summary=lambda device: ("Triton kernels in the interpreter (TRITON_INTERPRET=1)" if device.type == "cpu"
                            else "fused Triton kernels"),
    devices=("cuda", "cpu"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    # First on CUDA: its kernels fuse the epilogues into the GEMMs themselves (the cuda backend
    # writes each GEMM output once more). Not yet measured on a GPU: revisit with the GPU check.
    preference={"cuda": 0},
    probe=_probe,
    compiles_at_run_time=True,
))
