"""bagnet_fast.cuda_graph: clear errors here (no GPU), capture and replay on a GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import bagnet_fast
from conftest import make_model, rel_err

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (run benchmarks/gpu_check.sh)")


def test_cpu_model_raises_a_clear_error():
    model = make_model("bagnet9", num_classes=5)
    with pytest.raises(RuntimeError, match="captures CUDA work.*got cpu"):
        bagnet_fast.cuda_graph(model, torch.randn(1, 3, 9, 9))


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="BagNet module"):
        bagnet_fast.cuda_graph("model", torch.randn(1, 3, 9, 9))
    with pytest.raises(TypeError, match="example input"):
        bagnet_fast.cuda_graph(make_model("bagnet9"), [1, 2, 3])


# --- on a GPU ---------------------------------------------------------------------------------

BACKENDS = ["cuda", "torch"] + (["triton"] if importlib.util.find_spec("triton") else [])


@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("avg_pool", [True, False])
def test_replay_matches_eager_plan(backend, avg_pool):
    model = make_model("bagnet33", num_classes=50).cuda().to(torch.bfloat16)
    model.backend = backend
    example = torch.randn(4, 3, 96, 80, device="cuda", dtype=torch.bfloat16)
    runner = bagnet_fast.cuda_graph(model, example, avg_pool=avg_pool)
    for seed in (1, 2):
        x = torch.randn(4, 3, 96, 80, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)).to(torch.bfloat16)
        with torch.no_grad():
            expected = bagnet_fast.get_plan(model).run(x, avg_pool=avg_pool)
        actual = runner(x)
        # Same kernels on the same data: the graph replays exactly what the eager plan runs. The
        # Triton head's atomic adds are no exception at this size: a 48-pixel final map and
        # tiles of >= 32 pixels give at most two adds per (image, channel), and 0 + a + b does
        # not depend on their order (three or more could differ by one bf16 rounding).
        assert rel_err(actual, expected) <= 1e-6
        assert actual.data_ptr() != runner.static_output.data_ptr()  # a fresh tensor


@needs_cuda
def test_static_output_mode_and_input_checks():
    model = make_model("bagnet9", num_classes=10).cuda()
    model.backend = "cuda"
    example = torch.randn(2, 3, 40, 40, device="cuda")
    runner = bagnet_fast.cuda_graph(model, example, copy_output=False)
    out = runner(example)
    assert out.data_ptr() == runner.static_output.data_ptr()
    with torch.no_grad():
        assert rel_err(out, model(example)) <= 1e-5
    with pytest.raises(ValueError, match=r"captured for images of shape \(2, 3, 40, 40\)"):
        runner(torch.randn(3, 3, 40, 40, device="cuda"))
    with pytest.raises(ValueError, match="captured for images"):
        runner(example.double())
    with pytest.raises(ValueError, match="captured for images"):
        runner(example.cpu())
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="changed since this CUDA graph was captured"):
        runner(example)
    model.train()
    with pytest.raises(ValueError, match="model.eval()"):
        bagnet_fast.cuda_graph(model, example)
