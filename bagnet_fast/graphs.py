"""CUDA graph capture of a BagNet's inference plan at a fixed input shape.

A BagNet-33 forward launches ~100 kernels; at small batches the CPU time to launch them (Python,
dispatcher, cuBLAS/cuDNN setup) exceeds the GPU time. A CUDA graph records the launches once and
replays them with one call. Any backend whose kernels are capturable works: ``cuda``, ``triton``
and ``torch`` on CUDA tensors.

    runner = bagnet_fast.cuda_graph(model, example)   # example: (N, 3, H, W) on the GPU
    logits = runner(images)                            # same shape, dtype and device as example
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .plan import check_input, check_model_input_match, get_plan, plan_is_fresh

__all__ = ["CudaGraphRunner", "cuda_graph"]


class CudaGraphRunner:
    """Replays a captured forward. ``runner(x)`` copies ``x`` into the static input buffer, replays
    the graph and returns the output: a fresh tensor (a copy of the static output buffer) unless
    ``copy_output=False`` was given, in which case it returns the static buffer itself, which the
    next call overwrites."""

    def __init__(self, model, plan, graph, static_input, static_output, copy_output, check_weights):
        self.model = model
        self.graph = graph
        self.static_input = static_input  # (N, 3, H, W) channels-last
        self.static_output = static_output  # (N, K), or (N, H', W', K) with avg_pool=False
        self.copy_output = copy_output
        self.check_weights = check_weights
        self._plan = plan  # keeps the captured weights alive

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        static = self.static_input
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
        if x.shape != static.shape or x.dtype != static.dtype or x.device != static.device:
            raise ValueError(
                f"this CUDA graph was captured for images of shape {tuple(static.shape)}, {static.dtype}, "
                f"on {static.device}; got {tuple(x.shape)}, {x.dtype}, on {x.device}. "
                "Capture another with bagnet_fast.cuda_graph(model, example) for other shapes."
            )
        if self.check_weights and not (self.model._inference_plan is self._plan and plan_is_fresh(self.model)):
            raise RuntimeError(
                "the model's weights, dtype, device or backend changed since this CUDA graph was "
                "captured; capture it again with bagnet_fast.cuda_graph(model, example)"
            )
        static.copy_(x)
        self.graph.replay()
        return self.static_output.clone() if self.copy_output else self.static_output


def cuda_graph(
    model: nn.Module,
    example_input: torch.Tensor,
    avg_pool: Optional[bool] = None,
    *,
    warmup: int = 2,
    copy_output: bool = True,
    check_weights: bool = True,
) -> CudaGraphRunner:
    """Capture ``model``'s inference plan for inputs shaped like ``example_input``.

    Args:
        model: a BagNet (ours, or from :func:`bagnet_fast.accelerate`) in eval mode, on a CUDA
            device.
        example_input: (N, 3, H, W) images with the model's dtype and device; its shape, dtype
            and device are the ones the runner accepts (its values are only used for warm-up).
        avg_pool: None: the model's setting; True: logits (N, K); False: per-patch logits
            (N, H', W', K).
        warmup: forwards run on a side stream before capture (as PyTorch requires; it also lets
            Triton compile and cuBLAS/cuDNN pick their algorithms outside the capture).
        copy_output: return a fresh tensor per call (default) or the static output buffer.
        check_weights: before each replay, check that no parameter or buffer changed since the
            capture (the graph holds the plan built then; the freshness check of the plan, ~0.1 ms).

    Raises:
        RuntimeError: not on a CUDA device, or capture failed.
        ValueError / TypeError: the model is in training mode, or the example is not a valid
            input of the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a BagNet module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor example input, got {type(example_input).__name__}")
    if example_input.device.type != "cuda":
        raise RuntimeError(
            "bagnet_fast.cuda_graph captures CUDA work: the model and the example input must be on a "
            f"CUDA device, got {example_input.device}"
            + ("" if torch.cuda.is_available() else " (and no CUDA device is available here)")
        )
    if model.training:
        raise ValueError("call model.eval() before cuda_graph: the capture runs the inference plan")
    check_input(example_input, model.patch_size)
    check_model_input_match(model, example_input)
    avg_pool = bool(model.avg_pool if avg_pool is None else avg_pool)
    device = example_input.device

    with torch.no_grad(), torch.cuda.device(device):
        plan = get_plan(model)
        static_input = torch.empty_like(example_input, memory_format=torch.channels_last)
        static_input.copy_(example_input)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                plan.run(static_input, avg_pool=avg_pool)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = plan.run(static_input, avg_pool=avg_pool)
    return CudaGraphRunner(model, plan, graph, static_input, static_output, copy_output, check_weights)
