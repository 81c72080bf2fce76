"""Op-level benchmarks at the real shapes of BagNet-33 (all unit kinds and channel widths):

- ``test_unit``: each kind of unit of the inference plan (stem, a 3x3 block with downsample, a
  fused pointwise block per stage, the head) run by each backend that can run here; the
  ``torch`` backend is the pure-PyTorch composition (bagnet_fast/ops/reference.py) the others
  replace. Inputs are the activations the plan really feeds that unit for the benchmark's images.
- ``test_op``: each registered operator (torch.ops.bagnet_fast.*) against its pure-PyTorch
  composition, on the same activations.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch

from bagnet_fast import flops
from bagnet_fast.ops import has_op
from bagnet_fast.ops import reference as ref
from bagnet_fast.plan import build_plan

UNITS = ("stem", "layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.0", "layer4.1", "head")


@pytest.fixture(scope="module")
def plans(make_model):
    """``plans(dtype, backend)``: a BagNet-33 plan per backend (built once: folding, prepacking)."""
    cache: Dict[tuple, object] = {}

    def get(dtype: str, backend: str):
        if (dtype, backend) not in cache:
            cache[(dtype, backend)] = build_plan(make_model("bagnet33", dtype), backend)
        return cache[(dtype, backend)]

    return get


@pytest.fixture(scope="module")
def unit_inputs(plans, settings):
    """``unit_inputs(images)``: the input of every plan unit (name -> tensor), computed by the
    pure-PyTorch backend in the images' dtype."""
    cache: Dict[tuple, Dict[str, torch.Tensor]] = {}

    def get(images: torch.Tensor, dtype: str) -> Dict[str, torch.Tensor]:
        key = (dtype, images.shape[0])
        if key not in cache:
            plan = plans(dtype, "torch")
            inputs = {}

            def record(unit, run, x):
                inputs[unit.name] = x
                return run(x)

            with torch.inference_mode():
                plan.run(images, hook=record)
            cache[key] = inputs
        return cache[key]

    return get


def _unit_call(plan, unit: str):
    """(fn, needs a fresh input per call): the backend's call for one plan unit."""
    backend = plan.backend
    if unit == "head":
        return (lambda x: backend.spatial_mean_linear(x, plan.fc_weight, plan.fc_bias)), False
    step = plan.unit(unit)
    method = getattr(backend, step.kind)
    # The cpu backend's pointwise block writes into its input: give every call a fresh copy.
    return (lambda x: method(step, x)), step.kind == "pointwise_bottleneck"


@pytest.mark.parametrize("unit", UNITS)
def test_unit(run_timed, plans, unit_inputs, images, settings, unit, dtype_and_backend, batch):
    dtype, backend = dtype_and_backend
    x_images = images(batch, dtype)
    x = unit_inputs(x_images, dtype)[unit]
    plan = plans(dtype, backend)
    cost = next(c for c in flops.plan_unit_costs(plan, x_images.shape, x_images.dtype) if c.name == unit)
    fn, in_place = _unit_call(plan, unit)
    extra = {"unit": unit, "kind": cost.kind, "backend": backend, "dtype": dtype, "batch": batch,
             "input_shape": list(x.shape), "size": settings.size}
    run_timed(fn, (x,), setup=(lambda: (x.clone(),)) if in_place else None, images=batch, flops=cost.flops,
              bytes=cost.bytes, group=f"unit {unit} {dtype} b{batch}", extra=extra)


def _op_cases() -> List[tuple]:
    """(op, plan unit whose shapes and weights it uses)."""
    cases = [("pointwise_bottleneck", f"layer{s}.1") for s in (1, 2, 3, 4)]
    cases += [("bias_residual_act", f"layer{s}.1") for s in (1, 2, 3, 4)]
    return cases + [("spatial_mean_linear", "head")]


@pytest.mark.parametrize("implementation", ["op", "reference"])
@pytest.mark.parametrize("op, unit", _op_cases(), ids=[f"{op}-{unit}" for op, unit in _op_cases()])
def test_op(run_timed, plans, unit_inputs, images, settings, op, unit, implementation, dtype, batch):
    dispatch_key = "CUDA" if settings.device == "cuda" else "CPU"
    if implementation == "op" and not has_op(op, dispatch_key):
        pytest.skip(f"torch.ops.bagnet_fast.{op} has no {dispatch_key} kernel (extension not built for it)")
    x_images = images(batch, dtype)
    x = unit_inputs(x_images, dtype)[unit]
    plan = plans(dtype, "torch")  # plain folded weights, as the registered ops take them
    itemsize = x.element_size()
    if op == "pointwise_bottleneck":
        block = plan.unit(unit)
        weights = [t for u in (block.conv1, block.conv2, block.conv3) for t in (u.weight, u.bias)]
        fn = torch.ops.bagnet_fast.pointwise_bottleneck if implementation == "op" else ref.pointwise_bottleneck
        args = (x, *weights)
        cost = next(c for c in flops.plan_unit_costs(plan, x_images.shape, x.dtype) if c.name == unit)
        counted_flops, counted_bytes = cost.flops, cost.bytes
    elif op == "bias_residual_act":
        # The epilogue of a block's last convolution: y + bias + residual, ReLU; y and the
        # residual are block outputs of that stage (the real shape and value range).
        bias = plan.unit(unit).conv3.bias
        fn = torch.ops.bagnet_fast.bias_residual_act if implementation == "op" else ref.bias_residual_act
        args = (x, bias, x, True)
        counted_flops, counted_bytes = 0, (3 * x.numel() + bias.numel()) * itemsize
    else:
        fn = torch.ops.bagnet_fast.spatial_mean_linear if implementation == "op" else ref.spatial_mean_linear
        args = (x, plan.fc_weight, plan.fc_bias)
        cost = next(c for c in flops.plan_unit_costs(plan, x_images.shape, x.dtype) if c.name == "head")
        counted_flops, counted_bytes = cost.flops, cost.bytes
    extra = {"op": op, "unit": unit, "implementation": implementation, "dtype": dtype, "batch": batch,
             "input_shape": list(x.shape), "size": settings.size}
    run_timed(fn, args, images=batch, flops=counted_flops, bytes=counted_bytes,
              group=f"op {op} {unit} {dtype} b{batch}", extra=extra)
