"""The backend registry: availability with reasons, the automatic choice and its warnings, the
run-time fallback (every method of the interface forwarded), and adding a backend."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import bagnet_fast
from bagnet_fast import executors
from bagnet_fast.executors import INTERFACE, Backend, BackendInfo, FallbackBackend
from bagnet_fast.executors.cuda_backend import CudaBackend
from bagnet_fast.executors.torch_backend import TorchBackend
from conftest import FP32_RTOL, make_model, rel_err


def reference(model, x):
    with torch.no_grad():
        return model.reference_forward(x)


@pytest.fixture
def registry(monkeypatch):
    """The registry's records, restorable: tests register and replace backends in it."""
    monkeypatch.setattr(executors, "_REGISTRY", dict(executors._REGISTRY))
    monkeypatch.setattr(executors, "_warned", set())
    monkeypatch.setattr(executors, "_failed", {})
    return executors._REGISTRY


def _replace(registry, name, **changes):
    fields = {f: getattr(registry[name], f) for f in BackendInfo.__dataclass_fields__}
    registry[name] = BackendInfo(**{**fields, **changes})


def test_report_lists_every_backend_with_a_reason():
    report = bagnet_fast.backends("cpu")
    assert list(report)[:2] == ["cpu", "torch"]  # preference order on CPUs, then the others
    assert set(report) == set(executors.backend_names()) == {"cpu", "torch", "triton", "cuda"}
    assert all(entry["reason"] for entry in report.values())
    assert report["cpu"]["available"] and report["torch"]["available"]
    assert not report["cuda"]["available"] and "cuda tensors" in report["cuda"]["reason"]
    assert report["triton"]["automatic"] is False  # never chosen automatically for CPU tensors
    assert bagnet_fast.backends("cpu", torch.float64)["cpu"]["reason"].startswith("the cpu backend computes in float32")
    assert list(bagnet_fast.backends("cuda"))[:3] == ["triton", "cuda", "torch"]
    # A bf16 model runs on the cpu backend where the CPU has bf16 units, else falls back with the
    # reason; an fp16 one always falls back, naming what this CPU has.
    bf16 = bagnet_fast.backends("cpu", torch.bfloat16)["cpu"]
    has_units = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert bf16["available"] is bool(has_units and torch.ops.mkldnn._is_mkldnn_bf16_supported()), bf16
    if not has_units:
        assert bf16["reason"].startswith("bfloat16 on the cpu backend needs AVX512-BF16 or AMX units")
    fp16 = bagnet_fast.backends("cpu", torch.float16)["cpu"]["reason"]
    units = "available" if torch.ops.mkldnn._is_mkldnn_fp16_supported() else "not available"
    assert f"this CPU: {torch.backends.cpu.get_cpu_capability()}, oneDNN float16 kernels {units}" in fp16


def test_bf16_on_a_cpu_without_bf16_units_falls_back_with_the_reason(monkeypatch, registry):
    """What a user with an AVX2 CPU gets from model.to(torch.bfloat16): the torch backend, with a
    warning that says why (simulated here by hiding this CPU's units)."""
    from bagnet_fast.executors import cpu_backend

    monkeypatch.setattr(cpu_backend, "_cpu_flag", lambda name: False)
    ok, reason = executors.available("cpu", "cpu", torch.bfloat16)
    assert not ok and "needs AVX512-BF16 or AMX units; this CPU has neither" in reason
    with pytest.warns(UserWarning, match="using the pure-PyTorch backend on cpu/torch.bfloat16: cpu: bfloat16 on the cpu"):
        backend = executors.select(None, "cpu", torch.bfloat16)
    assert backend.name == "torch" or backend.current.name == "torch"


def test_asking_for_an_unusable_or_unknown_backend_raises_with_the_reason():
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: the cuda backend runs on cuda tensors"):
        executors.select("cuda", "cpu", torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        executors.select("tpu", "cpu", torch.float32)
    ok, reason = executors.available("cuda", "cuda", torch.float64)
    assert not ok and "float64" in reason


def test_preference_triton_then_cuda_then_torch_with_a_warning(registry):
    _replace(registry, "triton", probe=lambda device, dtype: "triton is not installed")
    _replace(registry, "cuda", probe=lambda device, dtype: None)
    with pytest.warns(UserWarning, match="using the cuda backend on cuda/torch.bfloat16: triton: triton is not installed"):
        backend = executors.select(None, "cuda", torch.bfloat16)
    assert isinstance(backend, FallbackBackend) and isinstance(backend.current, CudaBackend)
    _replace(registry, "triton", probe=lambda device, dtype: None, load=lambda: TorchBackend)
    backend = executors.select(None, "cuda", torch.float16)
    assert isinstance(backend, FallbackBackend) and backend._fallbacks == ["cuda", "torch"]
    _replace(registry, "triton", probe=lambda device, dtype: "no triton")
    _replace(registry, "cuda", probe=lambda device, dtype: "no kernels")
    with pytest.warns(UserWarning, match="pure-PyTorch backend .*triton: no triton; cuda: no kernels"):
        assert executors.select(None, "cuda", torch.float32).name == "torch"


def test_every_method_of_the_interface_is_forwarded_by_the_fallback():
    """A method added to Backend and overridden in one backend must reach it through the
    automatic choice's wrapper, not the base default."""
    assert {"conv_bias_act", "stem_conv_bias_relu", "bottleneck", "pointwise_bottleneck",
            "pointwise_bottleneck_mean", "spatial_mean_linear", "patch_logits", "propagates_nan",
            "dense", "prepare"} <= set(INTERFACE)
    calls = []

    class Recording(Backend):
        name = "recording"

    for method in INTERFACE:
        setattr(Recording, method, lambda self, *args, _m=method, **kwargs: calls.append(_m) or _m)
    fallback = FallbackBackend(Recording(), ["torch"], torch.device("cuda"), torch.float32)
    for method in INTERFACE:
        if method == "prepare":
            continue  # the wrapper prepares its current backend itself (checked below)
        arity = len(inspect.signature(getattr(Backend, method)).parameters) - 1
        assert getattr(fallback, method)(*([None] * arity)) == method, method
    assert calls == [m for m in INTERFACE if m != "prepare"]
    plan = bagnet_fast.build_plan(make_model("bagnet9", num_classes=3), "torch")
    fallback.prepare(plan)
    assert calls[-1] == "prepare"


class BrokenKernels(TorchBackend):
    """A backend whose pointwise blocks raise ``error``: kernels that fail to compile or launch on
    this device (a Triton version or GPU they were never built for), or inputs they reject."""

    name = "triton"

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def pointwise_bottleneck(self, unit, x):
        self.calls += 1
        raise self.error


def fallback_plan(model, primary, fallbacks):
    plan = bagnet_fast.build_plan(model, "torch")
    plan.backend = FallbackBackend(primary, fallbacks, torch.device("cuda"), torch.bfloat16)
    plan.backend.prepare(plan)
    return plan


NO_KERNEL_IMAGE = "CUDA error: no kernel image is available for execution on the device"


def test_automatic_choice_falls_back_when_its_kernels_fail(registry):
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
    for name in ("triton", "cuda"):
        _replace(registry, name, probe=lambda device, dtype: None)
    with pytest.warns(UserWarning, match="using the cuda backend on cuda/torch.bfloat16: triton: its kernels "
                                         "failed here earlier: RuntimeError: CUDA error: no kernel image"):
        backend = executors.select(None, "cuda", torch.bfloat16)
    assert backend.name == "cuda" and isinstance(backend, FallbackBackend)
    assert executors.select("triton", "cuda", torch.bfloat16).name == "triton"  # asked for: no skip


@pytest.mark.parametrize("error", [ValueError("bad input"), RuntimeError("shape mismatch"), RuntimeError(NO_KERNEL_IMAGE)],
                         ids=["value-error", "runtime-error", "kernel-failure-nothing-left"])
def test_fallback_never_hides_other_errors(error, registry):
    kernel_failure = NO_KERNEL_IMAGE in str(error)
    plan = fallback_plan(make_model("bagnet9", num_classes=20), BrokenKernels(error), [] if kernel_failure else ["torch"])
    with pytest.raises(type(error), match=str(error)):
        plan.run(torch.randn(1, 3, 9, 9))
    assert plan.backend.name == "triton" and not executors._failed


class DoubleConv(Backend):
    """The smallest complete backend: one unit method; the others are its default compositions."""

    name = "double"

    def conv_bias_act(self, conv, x, relu=True, residual=None):
        y = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), conv.stride)
        if residual is not None:
            y = y + residual[:, :, : y.shape[-2], : y.shape[-1]].double()
        return (torch.relu(y) if relu else y).to(x.dtype).contiguous(memory_format=torch.channels_last)


def test_adding_a_backend_is_one_class_and_one_registration(registry):
    executors.register_backend(BackendInfo(
        name="double", load=lambda: DoubleConv, summary="float64 convolutions", devices=("cpu",),
        dtypes=(torch.float32,), preference={"cpu": -1},
    ))
    with pytest.raises(ValueError, match="already registered"):
        executors.register_backend(registry["double"])
    assert bagnet_fast.backends("cpu")["double"] == {"available": True, "reason": "float64 convolutions", "automatic": True}
    model = make_model("bagnet17", num_classes=7)
    x = torch.randn(2, 3, 40, 33)
    with torch.no_grad():
        out = model(x)  # the automatic choice: the new backend ranks first on CPUs
    assert bagnet_fast.get_plan(model).backend.name == "double"
    assert rel_err(out, reference(model, x)) <= FP32_RTOL
    model.backend = "cpu"
    with torch.no_grad():
        model(x)
    assert bagnet_fast.get_plan(model).backend.name == "cpu"
