"""The ``cuda`` backend: its composition (crops, residuals, strides, in-place blocks, head) on CPU
tensors through the C++ twins of its ops, and the real CUDA path on a GPU (skipped here)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

import bagnet_fast
from bagnet_fast import _extension, executors
from bagnet_fast.executors import CudaBackend
from conftest import FP32_RTOL, VARIANTS, make_model, randomize_batchnorm, rel_err

needs_extension = pytest.mark.skipif(not _extension.loaded(), reason=f"bagnet_fast._C missing: {_extension.load_error()}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (run benchmarks/gpu_check.sh)")


def cuda_backend_plan(model):
    """The model's plan run by CudaBackend (on whatever device the model is: CPU here)."""
    plan = bagnet_fast.build_plan(model, "torch")
    plan.backend = CudaBackend()
    plan.backend.prepare(plan)
    return plan


def reference(model, x, avg_pool=True):
    previous, model.avg_pool = model.avg_pool, avg_pool
    try:
        with torch.no_grad():
            return model.reference_forward(x)
    finally:
        model.avg_pool = previous


@needs_extension
@pytest.mark.parametrize("stem", ["direct", "cudnn"])
@pytest.mark.parametrize("name", VARIANTS)
def test_composition_on_cpu_matches_reference(name, stem, monkeypatch):
    monkeypatch.setenv("BAGNET_FAST_CUDA_STEM", stem)
    model = make_model(name, num_classes=20)
    q = model.patch_size
    plan = cuda_backend_plan(model)
    convolved = []
    conv = CudaBackend.conv
    monkeypatch.setattr(CudaBackend, "conv", lambda self, unit, *a, **kw: convolved.append(unit) or conv(self, unit, *a, **kw))
    # q: a 1x1 map; q + 9 by q + 3: ragged, non-square; 64: several output rows and columns.
    for batch, height, width in ((1, q, q), (2, q + 9, q + 3), (3, 64, 57)):
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height))
        with torch.no_grad():
            assert rel_err(plan.run(x), reference(model, x)) <= FP32_RTOL
            patches = plan.run(x, avg_pool=False)
        assert patches.shape == (batch, (height - q) // 8 + 1, (width - q) // 8 + 1, 20)
        assert rel_err(patches, reference(model, x, avg_pool=False)) <= FP32_RTOL
    # The direct stem kernel, unless the cuDNN path was asked for.
    assert any(unit is plan.stem for unit in convolved) == (stem == "cudnn")


@needs_extension
def test_composition_with_cropped_identity_residual_and_3x3_later_blocks():
    """kernel3 = 2 makes block 1 of stage 1 a 3x3 block with an identity residual: the residual is
    a top-left crop view of the block input, read by bias_residual_act without a copy."""
    torch.manual_seed(0)
    model = bagnet_fast.BagNet(layers=(2, 1, 1, 1), strides=(2, 2, 2, 1), kernel3=(2, 1, 0, 0), num_classes=10)
    model = randomize_batchnorm(model).eval()
    assert model.layer1[1].downsample is None and model.layer1[1].conv2.kernel_size == (3, 3)
    plan = cuda_backend_plan(model)
    x = torch.randn(2, 3, 45, 39)
    with torch.no_grad():
        assert rel_err(plan.run(x), reference(model, x)) <= FP32_RTOL


@needs_extension
def test_composition_does_not_modify_the_input():
    model = make_model("bagnet9", num_classes=5)
    plan = cuda_backend_plan(model)
    x = torch.randn(1, 3, 20, 20).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.no_grad():
        plan.run(x)
    assert torch.equal(x, before)


def test_report_on_cpu_says_why_not():
    entry = bagnet_fast.backends("cpu")["cuda"]
    assert entry["available"] is False
    assert "CUDA tensors" in entry["reason"]
    assert ("CUDA kernels" in entry["reason"]) or ("without its CUDA sources" in entry["reason"]) or (
        "not loaded" in entry["reason"]
    )
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: the cuda backend runs on CUDA tensors"):
        executors.select("cuda", torch.device("cpu"), torch.float32)
    model = make_model("bagnet9", num_classes=5)
    model.backend = "cuda"
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"), torch.no_grad():
        model(torch.randn(1, 3, 9, 9))


def test_cuda_backend_rejects_unsupported_dtypes():
    ok, reason = executors.available("cuda", torch.device("cuda"), torch.float64)
    assert not ok and "float64" in reason


def test_preference_triton_then_cuda_then_torch_with_a_warning(monkeypatch):
    assert executors._PREFERENCE["cuda"] == ("triton", "cuda", "torch")
    usable = {"triton": (False, "triton is not installed"), "cuda": (True, "yes"), "torch": (True, "always")}
    monkeypatch.setattr(executors, "available", lambda name, device, dtype: usable[name])
    monkeypatch.setattr(executors, "_warned", set())
    with pytest.warns(UserWarning, match="using the cuda backend on cuda/torch.bfloat16: triton: triton is not installed"):
        backend = executors.select(None, torch.device("cuda"), torch.bfloat16)
    assert isinstance(backend.current, CudaBackend)
    usable["triton"] = (True, "fused Triton kernels")
    monkeypatch.setitem(executors._BACKENDS, "triton", lambda: "triton backend")
    backend = executors.select(None, torch.device("cuda"), torch.float16)
    assert isinstance(backend, executors.FallbackBackend) and backend.current == "triton backend"
    usable["triton"] = (False, "no triton")
    usable["cuda"] = (False, "no kernels")
    monkeypatch.setattr(executors, "_warned", set())
    with pytest.warns(UserWarning, match="pure-PyTorch backend .*triton: no triton; cuda: no kernels"):
        assert executors.select(None, torch.device("cuda"), torch.float32).name == "torch"


class BrokenKernels(executors.TorchBackend):
    """A backend whose blocks raise ``error``: kernels that fail to compile or launch on this
    device (a Triton version or GPU they were never built for), or inputs they reject."""

    name = "triton"

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def block(self, unit, x):
        self.calls += 1
        raise self.error


def fallback_plan(model, primary, fallbacks):
    plan = bagnet_fast.build_plan(model, "torch")
    plan.backend = executors.FallbackBackend(primary, fallbacks, torch.device("cuda"), torch.bfloat16)
    plan.backend.prepare(plan)
    return plan


NO_KERNEL_IMAGE = "CUDA error: no kernel image is available for execution on the device"


def test_automatic_choice_falls_back_when_its_kernels_fail(monkeypatch):
    monkeypatch.setattr(executors, "_failed", {})
    model = make_model("bagnet9", num_classes=20)
    x = torch.randn(2, 3, 15, 17)
    broken = BrokenKernels(RuntimeError(NO_KERNEL_IMAGE))
    plan = fallback_plan(model, broken, ["torch"])
    with pytest.warns(UserWarning, match=r"the triton backend's kernels failed on cuda/torch.bfloat16 "
                                         r"\(RuntimeError: CUDA error: no kernel image .*using the torch backend"):
        out = plan.run(x)
    assert rel_err(out, reference(model, x)) <= FP32_RTOL
    assert plan.backend.name == "torch" and broken.calls == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only: later calls go to the fallback directly
        plan.run(x)
    assert broken.calls == 1
    # Plans built later skip the failed backend and say why.
    monkeypatch.setattr(executors, "available", lambda name, device, dtype: (True, "usable"))
    monkeypatch.setattr(executors, "_warned", set())
    with pytest.warns(UserWarning, match="using the cuda backend on cuda/torch.bfloat16: triton: its kernels "
                                         "failed here earlier: RuntimeError: CUDA error: no kernel image"):
        backend = executors.select(None, torch.device("cuda"), torch.bfloat16)
    assert backend.name == "cuda" and isinstance(backend, executors.FallbackBackend)
    assert executors.select("triton", torch.device("cuda"), torch.bfloat16).name == "triton"  # asked for: no skip


@pytest.mark.parametrize("error", [ValueError("bad input"), RuntimeError("shape mismatch"), RuntimeError(NO_KERNEL_IMAGE)],
                         ids=["value-error", "runtime-error", "kernel-failure-nothing-left"])
def test_fallback_never_hides_other_errors(error, monkeypatch):
    monkeypatch.setattr(executors, "_failed", {})
    kernel_failure = NO_KERNEL_IMAGE in str(error)
    plan = fallback_plan(make_model("bagnet9", num_classes=20), BrokenKernels(error), [] if kernel_failure else ["torch"])
    with pytest.raises(type(error), match=str(error)):
        plan.run(torch.randn(1, 3, 9, 9))
    assert plan.backend.name == "triton" and not executors._failed


def test_triton_entry_points_make_the_tensors_device_current(monkeypatch):
    # Triton launches on the current CUDA device; the backend enters the tensors' device first
    # (the launch itself is checked with two GPUs in test_gpu_models.py).
    class OnSecondGpu:
        is_cuda = True
        device = torch.device("cuda", 1)

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or "guard")
    assert executors.on_device_of(OnSecondGpu()) == "guard" and entered == [torch.device("cuda", 1)]
    with executors.on_device_of(torch.zeros(1)):  # nothing to do for CPU tensors
        pass
    assert entered == [torch.device("cuda", 1)]


def test_info_cli_lists_the_cuda_backend():
    # A subprocess, as a user runs it (and importing the CLI's modules here, in the test process,
    # was seen to break the Triton interpreter tests that run after this file).
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "bagnet_fast", "info"], capture_output=True, text=True,
                            cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line.split(None, 3) for line in result.stdout.splitlines()]
    cuda = [line for line in lines if line[:2] == ["cpu", "cuda"]]
    assert cuda and cuda[0][2] == "no" and "CUDA tensors" in cuda[0][3], result.stdout


# --- on a GPU ---------------------------------------------------------------------------------


def _gpu_model(name, dtype, **kwargs):
    model = make_model(name, num_classes=100, **kwargs).cuda().to(dtype)
    model.backend = "cuda"
    return model


@needs_cuda
@pytest.mark.parametrize("name", VARIANTS)
def test_cuda_fp32_matches_reference(name):
    model = _gpu_model(name, torch.float32)
    exact = make_model(name, num_classes=100).cuda().double()
    q = model.patch_size
    for shape in ((2, 3, 224, 224), (3, 3, q + 9, q + 3), (1, 3, q, q)):
        x = torch.randn(shape, device="cuda")
        with torch.no_grad():
            actual = model(x)
            assert bagnet_fast.get_plan(model).backend.name == "cuda"
            assert rel_err(actual, reference(exact, x.double())) <= FP32_RTOL
            model.avg_pool = False
            patches = model(x)
            model.avg_pool = True
        assert rel_err(patches, reference(exact, x.double(), avg_pool=False)) <= FP32_RTOL


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", VARIANTS)
def test_cuda_low_precision_within_twice_torch_error(name, dtype):
    """DESIGN.md: |ours - fp64| <= 2 |PyTorch in the same dtype - fp64|, and the same top-1 as
    the fp64 reference wherever PyTorch's own low-precision top-1 agrees with it."""
    model = _gpu_model(name, dtype)
    exact = make_model(name, num_classes=100).cuda().double()
    x = torch.randn(8, 3, 160, 176, device="cuda")
    with torch.no_grad():
        expected = reference(exact, x.double())
        torch_low = reference(model, x.to(dtype))
        actual = model(x.to(dtype))
    assert bagnet_fast.get_plan(model).backend.name == "cuda"
    torch_error = rel_err(torch_low, expected)
    assert rel_err(actual, expected) <= 2 * torch_error, (rel_err(actual, expected), torch_error)
    agree = torch_low.argmax(1) == expected.argmax(1)
    assert torch.equal(actual.argmax(1)[agree], expected.argmax(1)[agree])


@needs_cuda
def test_cuda_backend_with_preprocess_and_selected_patch_logits():
    model = _gpu_model("bagnet33", torch.bfloat16)
    images = torch.randint(0, 256, (2, 100, 90, 3), dtype=torch.uint8, device="cuda")
    x = bagnet_fast.preprocess(images, dtype=torch.bfloat16)
    plan = bagnet_fast.get_plan(model)
    matmul = torch.backends.cuda.matmul
    reduced, matmul.allow_bf16_reduced_precision_reduction = matmul.allow_bf16_reduced_precision_reduction, False
    try:
        with torch.no_grad():
            features = plan.features(x)
            selected = plan.backend.patch_logits(features, plan.fc_weight, plan.fc_bias, [3, 7])
            every = plan.backend.patch_logits(features, plan.fc_weight, plan.fc_bias)
    finally:
        matmul.allow_bf16_reduced_precision_reduction = reduced
    # Two bf16 GEMMs (fp32 accumulation, no bf16 split-K partial sums) that cuBLAS may run with
    # different kernels for 2 and 100 classes: equal up to one bf16 rounding of the largest logit.
    assert selected.shape == every.shape[:-1] + (2,)
    assert rel_err(selected, every[..., [3, 7]]) <= 2**-7
