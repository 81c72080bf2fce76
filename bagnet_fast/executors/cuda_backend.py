"""The ``cuda`` backend: vendor-library GEMMs and convolutions with our fused CUDA epilogues.

Activations stay (N, C, H, W) in channels-last memory, so a 1x1 convolution is a GEMM on the
(N*H*W, C) pixel matrix, a view:
- 1x1 convolutions without a residual (each block's conv1, every downsample): one cuBLASLt GEMM
  with the bias (and ReLU) in its epilogue (``torch._addmm_activation`` / ``addmm`` take ATen's
  cuBLASLt path with the RELU_BIAS / BIAS epilogue for a 1-D bias): the output is written once.
- the merged stem: our direct-convolution kernel ``stem_conv_bias_relu`` (see ``stem_conv_bias_relu``).
- the 3x3 of each stage's block 0 (and the stem with ``BAGNET_FAST_CUDA_STEM=cudnn``): cuDNN
  without a bias (``aten::cudnn_convolution``), then our ``bias_residual_act`` kernel for bias +
  ReLU in one pass. float32 convolutions are exact fp32, not TF32 (PyTorch's default for cuDNN
  convolutions), unless ``BAGNET_FAST_TF32=1``. The GEMMs follow PyTorch's matmul precision
  setting (exact fp32 by default).
- 1x1 convolutions with a residual (each conv3): a GEMM, then ``bias_residual_act`` reads the
  GEMM output and the residual (cropped top-left in the kernel, by strides, no copy) and writes
  relu(y + bias + residual) once.
- 1x1-only blocks: ``pointwise_bottleneck_`` (csrc/cuda/ops_cuda.cpp), in place.
- the head: ``spatial_mean_linear`` (our mean kernel, then a (N, 2048) x (2048, K) GEMM).

Whether cuBLASLt's ReLU epilogue keeps NaN (as torch.relu does) is checked once per device
with a one-element GEMM; where it does not, the ReLU runs as torch.relu_ after the GEMM (the C++
op does the same check).

Every step runs on CPU tensors as well (the C++ twins of the ops), which is how the composition
is tested without a GPU: ``plan.backend = CudaBackend(); plan.backend.prepare(plan)``.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .. import _extension
from ..ops import has_op
from . import BackendInfo, register_backend
from .base import Backend


def _kernels_status() -> str:
    if not _extension.loaded():
        return f"the C++ extension bagnet_fast._C is not loaded ({_extension.load_error()})"
    if not _extension.with_cuda():
        return "bagnet_fast._C was built without its CUDA sources (no nvcc or a CPU-only torch at build time)"
    if not has_op("bias_residual_act", "CUDA"):
        return "bagnet_fast._C has no CUDA kernels registered (rebuild the extension)"
    return "bagnet_fast._C has its CUDA kernels"


def _probe(device: torch.device, dtype: torch.dtype):
    if not has_op("bias_residual_act", "CUDA"):
        return _kernels_status()
    return None


@functools.lru_cache(maxsize=None)
def relu_epilogue_keeps_nan(device: torch.device) -> bool:
    """Whether ``torch._addmm_activation`` (cuBLASLt's RELU_BIAS epilogue on CUDA) keeps a NaN."""
    a = torch.full((2, 16), float("nan"), device=device)
    b = torch.ones(16, 16, device=device)
    return bool(torch._addmm_activation(torch.zeros(16, device=device), a, b).isnan().all())


class CudaBackend(Backend):
    """Vendor-library convolutions with our fused epilogues (CUDA tensors, fp32/fp16/bf16)."""

    name = "cuda"

    def __init__(self) -> None:
        self._allow_tf32 = os.environ.get("BAGNET_FAST_TF32") == "1"
        self._direct_stem = os.environ.get("BAGNET_FAST_CUDA_STEM", "direct") != "cudnn"

    def propagates_nan(self, device: torch.device) -> bool:
        # On CPU tensors (the test path) pointwise_bottleneck_ is the oneDNN kernel.
        return device.type == "cuda"

    # The merged stem (3 -> 64 channels, 3x3) writes the widest map of the early network
    # (64 x 222 x 222 per 224 image). Through cuDNN that map is written by the convolution, then
    # read and written again by bias_residual_act; our direct-convolution kernel
    # (stem_conv_bias_relu: 27 fp32 FMAs per output from shared memory) writes it once.
    # Predicted: about 3 passes over the map saved against ~22 GFLOP of FMA work at batch 256,
    # a win of roughly 1 ms; not yet measured. BAGNET_FAST_CUDA_STEM=cudnn takes the cuDNN path
    # (benchmarks/gpu_check.py times both).
    def stem_conv_bias_relu(self, unit, x):
        conv = unit.conv
        c_out, c_in, k, _ = conv.weight.shape
        if self._direct_stem and (c_in, k, conv.stride) == (3, 3, 1) and c_out % 8 == 0 and c_out <= 256:
            return torch.ops.bagnet_fast.stem_conv_bias_relu(x, conv.weight, conv.bias)
        return self.conv_bias_act(conv, x)

    def prepare(self, plan) -> None:
        for conv in plan.convolutions():
            if conv.kernel_size == 1:
                conv.prepared["matrix_t"] = conv.matrix.t()  # (Cin, Cout) view for x @ W^T

    def conv_bias_act(self, conv, x, relu=True, residual=None):
        if conv.kernel_size == 1 and conv.stride == 1:
            weight_t = conv.prepared["matrix_t"]
            # (N*H*W, Cin): a view of channels-last x; a copy of a subsampled view.
            pixels = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            if residual is None:
                if not relu:
                    return _pixels_as_image(torch.addmm(conv.bias, pixels, weight_t), x)
                if relu_epilogue_keeps_nan(x.device):
                    return _pixels_as_image(torch._addmm_activation(conv.bias, pixels, weight_t), x)
                return _pixels_as_image(torch.addmm(conv.bias, pixels, weight_t).relu_(), x)
            y = _pixels_as_image(torch.mm(pixels, weight_t), x)
        elif x.is_cuda:
            cudnn = torch.backends.cudnn
            y = torch.ops.aten.cudnn_convolution(
                x, conv.weight, [0, 0], [conv.stride, conv.stride], [1, 1], 1,
                cudnn.benchmark, cudnn.deterministic, self._allow_tf32,
            )
        else:  # CPU tensors: the test path of this composition (the ops' C++ twins)
            y = F.conv2d(x, conv.weight, None, conv.stride)
        return torch.ops.bagnet_fast.bias_residual_act(y, conv.bias, residual, relu)

    def pointwise_bottleneck(self, unit, x):
        # In place: x is an activation the plan owns (the stem's or a block's output).
        x = x.contiguous(memory_format=torch.channels_last)
        c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
        torch.ops.bagnet_fast.pointwise_bottleneck_(x, c1.weight, c1.bias, c2.weight, c2.bias, c3.weight, c3.bias)
        return x

    def spatial_mean_linear(self, x, weight, bias):
        return torch.ops.bagnet_fast.spatial_mean_linear(x, weight, bias)


def _pixels_as_image(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N*H*W, C) pixel matrix -> (N, C, H, W) channels-last view, H and W those of ``like``."""
    n, _, height, width = like.shape
    return matrix.view(n, height, width, matrix.shape[1]).permute(0, 3, 1, 2)


register_backend(BackendInfo(
    name="cuda",
    load=lambda: CudaBackend,
    summary="cuDNN/cuBLAS convolutions + fused CUDA kernels (bagnet_fast._C)",
    devices=("cuda",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    preference={"cuda": 1},
    probe=_probe,
    compiles_at_run_time=True,  # a binary built for other GPU architectures fails at launch
))
