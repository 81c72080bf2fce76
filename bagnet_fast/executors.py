"""Backends that execute an inference plan, and the choice between them.

- ``torch``: the pure-PyTorch composition of every fused unit (any device, any float dtype).
- ``cpu``: oneDNN convolutions with fused bias/ReLU/residual post-ops and prepacked weights,
  plus our C++ ``pointwise_bottleneck_`` from bagnet_fast._C. float32 on CPU.
- ``triton``: our Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1 for testing).
- ``cuda``: cuDNN/cuBLAS(Lt) convolutions through ATen, our CUDA C++ kernels from
  bagnet_fast._C for the memory-bound work between them (CUDA tensors, float32/float16/bfloat16).

A backend that was asked for and is unavailable raises with the reason; the automatic choice
takes the first usable backend of ``_PREFERENCE`` and warns, saying why, whenever that is not the
first one (never silently). On CUDA the automatic choice also falls back at run time, with a
warning, if its kernels fail to compile or launch on the device (:class:`FallbackBackend`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import warnings
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _extension
from .ops import has_op
from .ops import reference as ref

__all__ = [
    "Backend", "TorchBackend", "CpuBackend", "TritonBackend", "CudaBackend", "FallbackBackend",
    "available", "select", "backends", "backend_names", "is_kernel_failure",
]


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

    def block_mean_linear(self, unit, x, weight, bias) -> torch.Tensor:
        """The last block and the avg_pool=True head; backends that can fuse them override it."""
        return self.spatial_mean_linear(self.block(unit, x), weight, bias)

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

    # Which weight form oneDNN runs fastest depends on the layer (measured, BagNet-33 224x224,
    # 2-core Zen 5, per block, batch 1 / batch 8):
    # - the 3x3 blocks (stem and each stage's block 0): plain weights, equal or faster everywhere
    #   (layer4.0: 18 vs 79 ms at batch 1, 140 vs 197 ms at batch 8);
    # - the fused 1x1 blocks: oneDNN's blocked (prepacked) layout from 2,916 output pixels up
    #   (layer1 at batch 8: 53 vs 273 ms), plain weights at 676 pixels and below (layer4 at
    #   batch 1: 9.7 vs 41.6 ms). Prepacked here means packed without the input size (one form
    #   for every size), which oneDNN handles badly on small maps.
    POINTWISE_PREPACKED_MIN_PIXELS = 2048

    def _pack(self, unit) -> None:
        unit.prepared["onednn"] = self._mkldnn._reorder_convolution_weight(
            unit.weight, [0, 0], [unit.stride, unit.stride], [1, 1], 1, None
        )

    def prepare(self, plan) -> None:
        for block in plan.blocks:
            if block.is_pointwise:
                for unit in (block.conv1, block.conv2, block.conv3):
                    self._pack(unit)

    def conv(self, unit, x, stride, relu=True, residual=None):
        weight = unit.weight  # plain: see above
        stride = [stride, stride]
        x = _canonical_single_pixel(x)
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
        pixels = x.shape[0] * x.shape[2] * x.shape[3]
        form = "onednn" if pixels >= self.POINTWISE_PREPACKED_MIN_PIXELS else None
        c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
        w1, w2, w3 = (c.prepared[form] if form else c.weight for c in (c1, c2, c3))
        torch.ops.bagnet_fast.pointwise_bottleneck_(x, w1, c1.bias, w2, c2.bias, w3, c3.bias)
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

    # Triton launches on the current CUDA device, not on the tensors' (a model on cuda:1 while
    # cuda:0 is current would fault): every entry point makes the tensors' device current.
    def conv(self, unit, x, stride, relu=True, residual=None):
        with on_device_of(x):
            return self._ops.conv_bias_act(x, unit.weight, unit.bias, stride, relu=relu, residual=residual)

    def pointwise(self, unit, x):
        c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
        with on_device_of(x):
            return self._ops.pointwise_bottleneck(x, c1.weight, c1.bias, c2.weight, c2.bias, c3.weight, c3.bias)

    def spatial_mean_linear(self, x, weight, bias):
        with on_device_of(x):
            return self._ops.spatial_mean_linear(x, weight, bias)

    def block_mean_linear(self, unit, x, weight, bias):
        # A 1x1-only last block (all BagNets) adds its output into the means in the last GEMM's
        # epilogue: the widest map of the network (N, 2048, H', W') is never written. Those adds
        # are atomics, whose order varies from run to run once three or more tiles meet in one
        # image (the fp32 means then differ in the last bit, and a bf16 logit by one rounding):
        # under torch.use_deterministic_algorithms(True) the map is written and reduced by the
        # mean kernel instead, bitwise reproducible.
        if not unit.is_pointwise or torch.are_deterministic_algorithms_enabled():
            return super().block_mean_linear(unit, x, weight, bias)
        c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
        with on_device_of(x):
            mean = self._ops.pointwise_bottleneck_mean(x, c1.weight, c1.bias, c2.weight, c2.bias, c3.weight, c3.bias)
            return self._ops.mean_linear(mean, weight, bias, x.dtype)

    def patch_logits(self, x, weight, bias, classes=None):
        with on_device_of(x):
            return self._ops.patch_logits(x, weight, bias, classes)


def on_device_of(x: torch.Tensor):
    """The tensor's CUDA device made current for the block (nothing for other devices)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class CudaBackend(Backend):
    """Vendor-library convolutions with our fused epilogues (CUDA tensors, fp32/fp16/bf16).

    Activations stay (N, C, H, W) in channels-last memory, so a 1x1 convolution is a GEMM on
    the (N*H*W, C) pixel matrix, a view:
    - 1x1 convolutions without a residual (each block's conv1, every downsample): one cuBLASLt
      GEMM with the bias (and ReLU) in its epilogue (``torch._addmm_activation`` / ``addmm``
      take ATen's cuBLASLt path with the RELU_BIAS / BIAS epilogue for a 1-D bias): the output
      is written once. A cuDNN 1x1 convolution would run the same GEMM after its heuristics,
      then add the bias in a second pass.
    - the merged stem: our direct-convolution kernel ``stem_conv_bias_relu`` (see ``stem``).
    - the 3x3 of each stage's block 0 (and the stem with ``BAGNET_FAST_CUDA_STEM=cudnn``):
      cuDNN without a bias (``aten::cudnn_convolution``), then our ``bias_residual_act`` kernel
      for bias + ReLU in one pass (ATen's biased cuDNN convolution adds the bias in a pass of
      its own, and ReLU would be a third). float32 convolutions are exact fp32, not TF32
      (PyTorch's default for cuDNN convolutions), so that float32 holds the 1e-5 parity;
      ``BAGNET_FAST_TF32=1`` opts into TF32, as for the Triton backend. The GEMMs follow
      PyTorch's matmul precision setting (exact fp32 by default).
    - 1x1 convolutions with a residual (each conv3): a GEMM, then ``bias_residual_act`` reads
      the GEMM output and the residual (cropped top-left in the kernel, by strides, no copy) and
      writes relu(y + bias + residual) once.
    - 1x1-only blocks: ``pointwise_bottleneck_`` (csrc/cuda/ops_cuda.cpp), in place: the same
      GEMMs in one dispatcher call, the residual add + ReLU written into x.
    - the head: ``spatial_mean_linear`` (our mean kernel, then a (N, 2048) x (2048, K) GEMM);
      per-patch logits are one GEMM with the bias in the epilogue on the (N*H'*W', 2048)
      feature matrix (the reference ``patch_logits``): nothing memory-bound to fuse there.

    Every step runs on CPU tensors as well (the C++ twins of the ops), which is how the
    composition is tested without a GPU: ``plan.backend = CudaBackend(); plan.backend.prepare(plan)``.
    """

    name = "cuda"

    def __init__(self) -> None:
        self._allow_tf32 = os.environ.get("BAGNET_FAST_TF32") == "1"
        self._direct_stem = os.environ.get("BAGNET_FAST_CUDA_STEM", "direct") != "cudnn"

    # The merged stem (3 -> 64 channels, 3x3) writes the widest map of the early network
    # (64 x 222 x 222 per 224 image). Through cuDNN that map is written by the convolution, then
    # read and written again by bias_residual_act; our direct-convolution kernel
    # (stem_conv_bias_relu: 27 fp32 FMAs per output from shared memory) writes it once.
    # Predicted: about 3 passes over the map saved against ~22 GFLOP of FMA work at batch 256,
    # a win of roughly 1 ms; not yet measured. BAGNET_FAST_CUDA_STEM=cudnn takes the cuDNN path
    # (benchmarks/gpu_check.py times both).
    def stem(self, unit, x):
        c_out, c_in, k, _ = unit.weight.shape
        if self._direct_stem and (c_in, k, unit.stride) == (3, 3, 1) and c_out % 8 == 0 and c_out <= 256:
            return torch.ops.bagnet_fast.stem_conv_bias_relu(x, unit.weight, unit.bias)
        return self.conv(unit, x, unit.stride)

    def prepare(self, plan) -> None:
        units = [plan.stem] + [
            unit
            for block in plan.blocks
            for unit in (block.conv1, block.conv2, block.conv3, block.downsample)
            if unit is not None
        ]
        for unit in units:
            if unit.kernel_size == 1:
                unit.prepared["matrix_t"] = unit.matrix.t()  # (Cin, Cout) view for x @ W^T

    def conv(self, unit, x, stride, relu=True, residual=None):
        if unit.kernel_size == 1 and stride == 1:
            weight_t = unit.prepared["matrix_t"]
            # (N*H*W, Cin): a view of channels-last x; a copy of a subsampled view.
            pixels = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            if residual is None:
                gemm = torch._addmm_activation if relu else torch.addmm
                return _pixels_as_image(gemm(unit.bias, pixels, weight_t), x)
            y = _pixels_as_image(torch.mm(pixels, weight_t), x)
        elif x.is_cuda:
            cudnn = torch.backends.cudnn
            y = torch.ops.aten.cudnn_convolution(
                x, unit.weight, [0, 0], [stride, stride], [1, 1], 1,
                cudnn.benchmark, cudnn.deterministic, self._allow_tf32,
            )
        else:  # CPU tensors: the test path of this composition (the ops' C++ twins)
            y = F.conv2d(x, unit.weight, None, stride)
        return torch.ops.bagnet_fast.bias_residual_act(y, unit.bias, residual, relu)

    def pointwise(self, unit, x):
        # In place: x is an activation the plan owns (the stem's or a block's output).
        x = x.contiguous(memory_format=torch.channels_last)
        c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
        torch.ops.bagnet_fast.pointwise_bottleneck_(x, c1.weight, c1.bias, c2.weight, c2.bias, c3.weight, c3.bias)
        return x

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


def _pixels_as_image(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N*H*W, C) pixel matrix -> (N, C, H, W) channels-last view, H and W those of ``like``."""
    n, _, height, width = like.shape
    return matrix.view(n, height, width, matrix.shape[1]).permute(0, 3, 1, 2)


_BACKENDS = {"torch": TorchBackend, "cpu": CpuBackend, "triton": TritonBackend, "cuda": CudaBackend}


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
            problem = _interpreter_problem()
            if problem:
                return False, problem
            return True, "Triton kernels in the interpreter (TRITON_INTERPRET=1)"
        if device.type != "cuda":
            return False, f"Triton kernels run on CUDA devices, not {device.type}"
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False, f"the Triton kernels support float32/float16/bfloat16, not {dtype}"
        return True, "fused Triton kernels"
    if name == "cuda":
        if device.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, not {device.type} ({_cuda_kernels_status()})"
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False, f"the cuda backend supports float32/float16/bfloat16, not {dtype}"
        if not has_op("bias_residual_act", "CUDA"):
            return False, _cuda_kernels_status()
        return True, "cuDNN/cuBLAS convolutions + fused CUDA kernels (bagnet_fast._C)"
    raise ValueError(f"unknown backend {name!r}; choose from {sorted(_BACKENDS)} or None")


@functools.lru_cache(maxsize=None)
def _interpreter_problem() -> Optional[str]:
    """Why the Triton interpreter cannot run our kernels with the installed triton and torch, or
    None: one tiny op, once per process. Seen failing: triton 3.6's interpreter on any loop with a
    run-time bound, and torch 2.11's wrap_triton on interpreted kernels (tested: triton 3.8 with
    torch 2.14). On a GPU the kernels are compiled and none of this applies."""
    import triton

    from .ops import triton_ops

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


def _cuda_kernels_status() -> str:
    if not _extension.loaded():
        return f"the C++ extension bagnet_fast._C is not loaded ({_extension.load_error()})"
    if not _extension.with_cuda():
        return "bagnet_fast._C was built without its CUDA sources (no nvcc or a CPU-only torch at build time)"
    if not has_op("bias_residual_act", "CUDA"):
        return "bagnet_fast._C has no CUDA kernels registered (rebuild the extension)"
    return "bagnet_fast._C has its CUDA kernels"


# Triton first on CUDA: its kernels fuse the epilogues into the GEMMs themselves (the cuda
# backend writes each GEMM output once more); the cuda backend is the fallback where Triton is
# missing or a dtype is unsupported. Not yet measured on a GPU: revisit with
# benchmarks/gpu_check.sh numbers.
_PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}
_warned: set = set()


# Backends whose kernels failed to compile or launch in this process, per (backend, device,
# dtype), with the error: the automatic choice skips them from then on (see FallbackBackend).
_failed: Dict[Tuple[str, str, torch.dtype], str] = {}


def select(name: Optional[str], device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend ``name`` (raises if unusable), or the fastest usable one when None (on CUDA,
    wrapped in a :class:`FallbackBackend` over the slower usable ones)."""
    if name is not None:
        ok, reason = available(name, device, dtype)
        if not ok:
            raise RuntimeError(f"backend {name!r} is unavailable: {reason}")
        return _BACKENDS[name]()
    usable, reasons = [], []
    for candidate in _PREFERENCE.get(device.type, ("torch",)):
        ok, reason = available(candidate, device, dtype)
        if ok and (candidate, device.type, dtype) in _failed:
            ok, reason = False, "its kernels failed here earlier: " + _failed[(candidate, device.type, dtype)]
        if ok:
            usable.append(candidate)
        elif not usable and candidate != "torch" and _relevant(candidate, device):
            reasons.append(f"{candidate}: {reason}")
    if reasons and (device.type, dtype) not in _warned:
        _warned.add((device.type, dtype))
        label = "the pure-PyTorch backend" if usable[0] == "torch" else f"the {usable[0]} backend"
        warnings.warn(f"bagnet_fast: using {label} on {device.type}/{dtype}: " + "; ".join(reasons), stacklevel=3)
    backend = _BACKENDS[usable[0]]()
    if device.type == "cuda" and len(usable) > 1:
        return FallbackBackend(backend, usable[1:], device, dtype)
    return backend


def is_kernel_failure(error: BaseException) -> bool:
    """Whether ``error`` says a backend's kernels cannot compile or launch on this device (not
    that the inputs are wrong): triton's own errors (compilation, PTX assembly, out of shared
    memory or registers, autotuning), an MLIR pass failure in triton's compiler, or a CUDA binary
    built for other GPU architectures."""
    triton_errors = sys.modules.get("triton.errors")
    if triton_errors is not None and isinstance(error, getattr(triton_errors, "TritonError", ())):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and (
        "PassManager::run failed" in message or "no kernel image is available" in message
    )


class FallbackBackend(Backend):
    """The automatic choice on CUDA: runs the preferred backend and, the first time its kernels
    fail to compile or launch on this device (:func:`is_kernel_failure`; a Triton version or GPU
    the kernels were never compiled for), warns with the error and hands that call and every later
    one to the next usable backend. Other errors (bad inputs) propagate unchanged. Asking for a
    backend by name (``backend="triton"``) never falls back: the error is raised."""

    def __init__(self, backend: Backend, fallbacks, device: torch.device, dtype: torch.dtype) -> None:
        self.current = backend
        self._fallbacks = list(fallbacks)
        self._where = (device.type, dtype)
        self._plan = None

    @property
    def name(self) -> str:
        return self.current.name

    def prepare(self, plan) -> None:
        self._plan = weakref.ref(plan)
        self.current.prepare(plan)

    def _call(self, method: str, *args):
        while True:
            try:
                return getattr(self.current, method)(*args)
            except Exception as error:  # noqa: BLE001 - re-raised unless a kernel failure
                if not self._fallbacks or not is_kernel_failure(error):
                    raise
                self._fall_back(error)

    def _fall_back(self, error: BaseException) -> None:
        failed = self.current.name
        summary = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
        _failed[(failed,) + self._where] = summary
        self.current = _BACKENDS[self._fallbacks.pop(0)]()
        plan = self._plan() if self._plan is not None else None
        if plan is not None:
            self.current.prepare(plan)
        warnings.warn(
            f"bagnet_fast: the {failed} backend's kernels failed on {self._where[0]}/{self._where[1]} ({summary}); "
            f"using the {self.current.name} backend from now on (backend={failed!r} raises the error)",
            stacklevel=4,
        )

    def stem(self, unit, x):
        return self._call("stem", unit, x)

    def block(self, unit, x):
        return self._call("block", unit, x)

    def conv(self, unit, x, stride, relu=True, residual=None):
        return self._call("conv", unit, x, stride, relu, residual)

    def pointwise(self, unit, x):
        return self._call("pointwise", unit, x)

    def _dense(self, x):
        return self._call("_dense", x)

    def spatial_mean_linear(self, x, weight, bias):
        return self._call("spatial_mean_linear", x, weight, bias)

    def block_mean_linear(self, unit, x, weight, bias):
        return self._call("block_mean_linear", unit, x, weight, bias)

    def patch_logits(self, x, weight, bias, classes=None):
        return self._call("patch_logits", x, weight, bias, classes)

    def __repr__(self) -> str:
        return f"<bagnet_fast backend {self.name!r}, falling back to {self._fallbacks}>"


def _relevant(backend: str, device: torch.device) -> bool:
    return {"cpu": "cpu", "triton": "cuda", "cuda": "cuda"}.get(backend) == device.type


def backend_names() -> Tuple[str, ...]:
    """The names ``backend=`` accepts."""
    return tuple(_BACKENDS)


def backends(device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float32) -> Dict[str, Dict[str, object]]:
    """Which backends can run on ``device``/``dtype`` and why (not)."""
    report = {}
    for name in ("cpu", "triton", "cuda", "torch"):
        ok, reason = available(name, torch.device(device), dtype)
        report[name] = {"available": ok, "reason": reason}
    return report
