"""The whole Triton path (backend="triton") of every variant vs the reference model, run by the
Triton interpreter on CPU (TRITON_INTERPRET=1, float32)."""

from __future__ import annotations

import importlib.util
import os

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

import bagnet_fast  # noqa: E402
from conftest import VARIANTS, make_model, rel_err  # noqa: E402

if not torch.cuda.is_available():
    _usable, _why_not = bagnet_fast.executors.available("triton", torch.device("cpu"), torch.float32)
    if not _usable:
        pytest.skip(_why_not, allow_module_level=True)

# The interpreter's dots are float32 numpy products; 1e-4 is issue #3's bound for the full model.
TRITON_FP32_RTOL = 1e-4


@pytest.fixture(autouse=True)
def large_interpreter_tiles(monkeypatch):
    """The interpreter runs programs one after another, each tile op as a numpy call: large tiles
    cut the full-model tests several-fold (ragged tiles are the kernel tests' job)."""
    from bagnet_fast.ops import triton_tuning

    monkeypatch.setattr(triton_tuning, "INTERPRETER_TILE", triton_tuning.Tile(128, 128, 64, 4, 1))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="TRITON_INTERPRET was set to another value")
@pytest.mark.parametrize("name", VARIANTS)
def test_full_triton_path_matches_reference(name, monkeypatch):
    from bagnet_fast.ops import triton_ops

    model = make_model(name, num_classes=20)
    q = model.patch_size
    fast = bagnet_fast.accelerate(model, backend="triton")
    x = torch.randn(2, 3, q + 9, q + 3)
    with torch.no_grad():
        expected = model.reference_forward(x)
    joint = []  # each stage's first block: conv3 and downsample as one GEMM
    fused = triton_ops.conv_downsample_bias_act
    monkeypatch.setattr(triton_ops, "conv_downsample_bias_act", lambda *a: joint.append(1) or fused(*a))
    actual = fast(x)
    assert bagnet_fast.get_plan(fast).backend.name == "triton" and len(joint) == 4
    assert rel_err(actual, expected) <= TRITON_FP32_RTOL
    fast.avg_pool = False
    patches = fast(x)
    model.avg_pool = False
    with torch.no_grad():
        assert rel_err(patches, model.reference_forward(x)) <= TRITON_FP32_RTOL


def test_triton_backend_report_on_cpu():
    entry = bagnet_fast.backends("cpu")["triton"]
    assert entry["available"] is True and "TRITON_INTERPRET" in entry["reason"]
    assert bagnet_fast.backends("cpu", torch.float16)["triton"]["available"] is False


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="TRITON_INTERPRET was set to another value")
def test_dense_heatmap_through_triton_matches_the_cpu_backend():
    """Shift-and-stitch feeds the kernels phase-stacked batches of views: the GPU path's inputs."""
    model = make_model("bagnet9", num_classes=20)
    x = torch.randn(2, 3, 11, 13)
    targets = torch.tensor([[3, 7], [19, 0]])
    expected = bagnet_fast.dense_heatmap(model, x, targets)  # cpu backend
    model.backend = "triton"
    actual = bagnet_fast.dense_heatmap(model, x, targets)
    assert bagnet_fast.get_plan(model).backend.name == "triton"
    assert rel_err(actual, expected) <= TRITON_FP32_RTOL


def test_triton_compile_failure_falls_back_through_the_registered_ops(monkeypatch):
    """A kernel that fails to compile raises triton's own error type through the torch.ops
    dispatcher, which the automatic choice recognises and answers by falling back."""
    from triton.runtime.errors import PTXASError

    from bagnet_fast import executors
    from bagnet_fast.ops import triton_ops

    def launch_fails(*args, **kwargs):
        raise PTXASError("ptxas fatal: Value 'sm_90a' is not defined for option 'gpu-name'")

    monkeypatch.setattr(triton_ops, "_launch", launch_fails)
    monkeypatch.setattr(executors, "_failed", {})
    model = make_model("bagnet9", num_classes=20)
    x = torch.randn(2, 3, 15, 17)
    with torch.no_grad():
        expected = model.reference_forward(x)
    plan = bagnet_fast.build_plan(model, "torch")
    from bagnet_fast.executors.triton_backend import TritonBackend

    plan.backend = executors.FallbackBackend(TritonBackend(), ["cpu"], torch.device("cuda"), torch.float32)
    plan.backend.prepare(plan)
    with pytest.warns(UserWarning, match="triton backend's kernels failed .*PTXASError: PTXAS error: ptxas fatal"):
        actual = plan.run(x)
    assert plan.backend.name == "cpu"
    assert rel_err(actual, expected) <= TRITON_FP32_RTOL


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="TRITON_INTERPRET was set to another value")
def test_deterministic_algorithms_take_the_head_without_atomics(monkeypatch):
    """By default the last block adds into the means with atomics (run-to-run order varies on a
    GPU); torch.use_deterministic_algorithms(True) writes the map and reduces it instead."""
    from bagnet_fast.ops import triton_ops

    model = make_model("bagnet9", num_classes=20)
    x = torch.randn(2, 3, 15, 17)
    with torch.no_grad():
        expected = model.reference_forward(x)
    fast = bagnet_fast.accelerate(model, backend="triton")
    fused = []
    fused_mean = triton_ops.pointwise_bottleneck_mean
    monkeypatch.setattr(triton_ops, "pointwise_bottleneck_mean", lambda *a: fused.append(1) or fused_mean(*a))
    assert rel_err(fast(x), expected) <= TRITON_FP32_RTOL and fused == [1]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = fast(x)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert fused == [1], "the atomic head ran in deterministic mode"
    assert rel_err(deterministic, expected) <= TRITON_FP32_RTOL
