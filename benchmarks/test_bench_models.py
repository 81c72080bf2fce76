"""Model-level benchmarks: BagNet-9/17/33 x implementation x dtype x batch, and ResNet-50.

Implementations: the reference forward (eager, NCHW: what users of the authors' code run; and
channels-last), the fast plan with each backend that can run here, and ``torch.compile`` of the
reference with ``--bagnet-compile``, and on CPUs the peers that are installed, in the group of
their precision (``peer-onnxruntime`` and ``peer-openvino-fp32`` in float32,
``peer-openvino-bf16`` in bfloat16 where the CPU has bf16 units: bagnet_fast.peers, the
reference graph exported to ONNX once per shape). One benchmark group per (network, dtype, batch), so the
table compares implementations side by side. extra_info: img/s, TFLOP/s and GB/s from the FLOPs
and bytes counted by bagnet_fast.flops (the reference's for reference rows, the plan's for the
fast rows: the plan does fewer FLOPs, img/s is the comparable number).
"""

from __future__ import annotations

import pytest
import torch

from bagnet_fast import flops, peers
from bagnet_fast.plan import get_plan

VARIANTS = ("bagnet9", "bagnet17", "bagnet33")


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bagnet(run_timed, make_model, images, settings, variant, dtype_and_implementation, batch):
    dtype, implementation = dtype_and_implementation
    x = images(batch, dtype)
    extra = {"network": variant, "implementation": implementation, "dtype": dtype, "batch": batch,
             "size": settings.size}
    if implementation.startswith("peer-"):  # ONNX Runtime / OpenVINO on the exported reference graph
        # The float32 graph, as a user exports it; OpenVINO bf16 converts it under its bf16 hint
        # and takes the bf16 group's images as float32.
        model = make_model(variant, "float32")
        name = next(n for n, short in peers.PEER_IDS.items() if implementation == f"peer-{short}")
        peer = peers.peer_runner(name, model, tuple(x.shape))
        costs = flops.reference_layer_costs(model, x.shape, x.dtype)
        fn = peer["fn"]
        extra.update(precision=peer["precision"], setup_seconds=peer["setup_seconds"], note=peer["note"])
    elif implementation.startswith("fast-"):
        model = make_model(variant, dtype)
        model.backend = implementation[len("fast-"):]
        costs = flops.plan_unit_costs(get_plan(model), x.shape, x.dtype)
        fn = model
    else:
        channels_last = implementation == "reference-channels-last"
        model = make_model(variant, dtype, channels_last=channels_last)
        costs = flops.reference_layer_costs(model, x.shape, x.dtype)
        if implementation == "reference-compile":
            fn = torch.compile(model.reference_forward)
        elif channels_last:
            fn = lambda images: model.reference_forward(_channels_last(images))  # noqa: E731
        else:
            fn = model.reference_forward
    flop, moved = flops.total(costs)
    run_timed(fn, (x,), images=batch, flops=flop, bytes=moved, group=f"{variant} {dtype} b{batch}", extra=extra)


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_resnet50(run_timed, make_model, images, settings, layout, dtype, batch):
    """The yardstick of the paper's comparison (BagNet-33 155 vs ResNet-50 570 img/s)."""
    x = images(batch, dtype)
    model = make_model("resnet50", dtype, channels_last=layout == "channels-last")
    flop, moved = flops.total(flops.reference_layer_costs(model, x.shape, x.dtype))
    fn = model if layout == "nchw" else (lambda images: model(_channels_last(images)))
    extra = {"network": "resnet50", "implementation": f"torchvision-{layout}", "dtype": dtype, "batch": batch,
             "size": settings.size}
    run_timed(fn, (x,), images=batch, flops=flop, bytes=moved, group=f"resnet50 {dtype} b{batch}", extra=extra)
