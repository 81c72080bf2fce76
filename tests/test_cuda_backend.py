"""The ``cuda`` backend: its composition (crops, residuals, strides, in-place blocks, head) on CPU
tensors through the C++ twins of its ops, and the real CUDA path on a GPU (skipped here)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

import bagnet_fast
from bagnet_fast import _extension
from bagnet_fast.executors.cuda_backend import CudaBackend
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
    conv = CudaBackend.conv_bias_act
    monkeypatch.setattr(CudaBackend, "conv_bias_act",
                        lambda self, unit, *a, **kw: convolved.append(unit) or conv(self, unit, *a, **kw))
    # q: a 1x1 map; q + 9 by q + 3: ragged, non-square; 64: several output rows and columns.
    for batch, height, width in ((1, q, q), (2, q + 9, q + 3), (3, 64, 57)):
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height))
        with torch.no_grad():
            assert rel_err(plan.run(x), reference(model, x)) <= FP32_RTOL
            patches = plan.run(x, avg_pool=False)
        assert patches.shape == (batch, (height - q) // 8 + 1, (width - q) // 8 + 1, 20)
        assert rel_err(patches, reference(model, x, avg_pool=False)) <= FP32_RTOL
    # The direct stem kernel, unless the cuDNN path was asked for.
    assert any(unit is plan.stem.conv for unit in convolved) == (stem == "cudnn")


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
    assert entry["available"] is False and "cuda tensors" in entry["reason"]
    model = make_model("bagnet9", num_classes=5)
    model.backend = "cuda"
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"), torch.no_grad():
        model(torch.randn(1, 3, 9, 9))


def test_relu_epilogue_without_nan_falls_back_to_a_separate_relu(monkeypatch):
    """Where cuBLASLt's ReLU epilogue would drop a NaN, conv_bias_act runs addmm + relu_."""
    from bagnet_fast.executors import cuda_backend

    model = make_model("bagnet9", num_classes=5)
    plan = cuda_backend_plan(model)
    conv = plan.blocks[1].conv1
    x = torch.randn(1, conv.weight.shape[1], 4, 5).contiguous(memory_format=torch.channels_last)
    x[0, 0, 1, 2] = float("nan")
    for keeps in (True, False):
        monkeypatch.setattr(cuda_backend, "relu_epilogue_keeps_nan", lambda device, keeps=keeps: keeps)
        with torch.no_grad():
            out = plan.backend.conv_bias_act(conv, x)
        assert out[0, :, 1, 2].isnan().all() and not out[0, :, 0, 0].isnan().any()


def test_info_cli_lists_the_cuda_backend():
    # A subprocess, as a user runs it (and importing the CLI's modules here, in the test process,
    # was seen to break the Triton interpreter tests that run after this file).
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "bagnet_fast", "info"], capture_output=True, text=True,
                            cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line.split(None, 3) for line in result.stdout.splitlines()]
    cuda = [line for line in lines if line[:2] == ["cpu", "cuda"]]
    assert cuda and cuda[0][2] == "no" and "cuda tensors" in cuda[0][3], result.stdout


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
