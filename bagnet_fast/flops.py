"""FLOPs and bytes moved, per layer of a reference network and per unit of the inference plan.

Conventions (those of ``torch.utils.flop_counter``, which gives the GFLOP in BAGNET_SPEC.md):
- 2 FLOPs per multiply-add, only convolutions and matrix products counted (bias adds,
  BatchNorm, ReLU, residual adds and means count 0: they are memory traffic, not compute);
- bytes = every activation a layer reads + every activation it writes + its weights (floating
  parameters and buffers), once each, in the given dtype: the DRAM traffic of a layer that
  reuses nothing across calls. A fused unit (``pointwise_bottleneck``) keeps its intermediates
  on chip, so they are not counted; that is the point of fusing.

Reference layers are found by running the model on the ``meta`` device with forward hooks on
its leaf modules (no memory, no compute: any image size is free). Elementwise operations that
are not modules (the reference's residual ``out + residual``) do not appear in that table.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "Cost",
    "reference_layer_costs",
    "plan_unit_costs",
    "stage_of",
    "stage_totals",
    "total",
]


@dataclass
class Cost:
    """One layer (reference) or fused unit (plan) for one batch."""

    name: str  # module name ("layer4.0.conv2") or plan unit ("layer4.1")
    kind: str  # "Conv2d 3x3/1", "BatchNorm2d", "pointwise_bottleneck", ...
    input_shape: Tuple[int, ...]  # (N, C, H, W) of the main input
    output_shape: Tuple[int, ...]
    flops: int
    bytes: int

    @property
    def stage(self) -> str:
        return stage_of(self.name)

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte moved."""
        return self.flops / self.bytes if self.bytes else 0.0

    def as_dict(self) -> dict:
        row = asdict(self)
        row.update(stage=self.stage, intensity=self.intensity)
        return row


def stage_of(name: str) -> str:
    """"stem", "layer1".."layer4" or "head": ResNet-50 and BagNets share these module names."""
    first = name.split(".")[0]
    if first.startswith("layer"):
        return first
    if first in ("fc", "avgpool", "head"):
        return "head"
    return "stem"


def total(costs: Sequence[Cost]) -> Tuple[int, int]:
    """(FLOPs, bytes) summed over ``costs``."""
    return sum(c.flops for c in costs), sum(c.bytes for c in costs)


def stage_totals(costs: Sequence[Cost]) -> Dict[str, Dict[str, object]]:
    """FLOPs, bytes and the output (H, W) of the last layer of each stage, in stage order."""
    stages: Dict[str, Dict[str, object]] = {}
    for cost in costs:
        entry = stages.setdefault(cost.stage, {"flops": 0, "bytes": 0, "output_hw": None})
        entry["flops"] += cost.flops
        entry["bytes"] += cost.bytes
        if len(cost.output_shape) == 4:
            entry["output_hw"] = tuple(cost.output_shape[-2:])
    return stages


def _tensor_bytes(tensors, itemsize: int) -> int:
    return sum(t.numel() for t in tensors if t.is_floating_point()) * itemsize


def _leaf_flops(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    return 0


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return f"Conv2d {module.kernel_size[0]}x{module.kernel_size[1]}/{module.stride[0]}"
    return type(module).__name__


def reference_layer_costs(
    model: nn.Module, image_shape: Sequence[int], dtype: Optional[torch.dtype] = None
) -> List[Cost]:
    """Cost of every leaf-module call of ``model`` on images of ``image_shape`` (N, 3, H, W), in
    call order. ``dtype`` (default: the model's) sets the bytes per element. Works for any
    network of nn.Modules (BagNets, torchvision's ResNet-50). A module called several times
    (the blocks' shared ``relu``) gives one row per call: ``layer1.0.relu``, ``layer1.0.relu[2]``...
    """
    dtype = dtype or next(model.parameters()).dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    meta_model = _meta_copy(model).to(dtype=dtype)
    costs: List[Cost] = []
    calls: Dict[str, int] = {}

    def record(name):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            label = name if calls[name] == 1 else f"{name}[{calls[name]}]"
            x = inputs[0]
            own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            moved = (x.numel() + output.numel()) * itemsize + _tensor_bytes(own, itemsize)
            flops = _leaf_flops(module, output)
            costs.append(Cost(label, _kind(module), tuple(x.shape), tuple(output.shape), flops, moved))

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in meta_model.named_modules()
        if name and not list(module.children())
    ]
    try:
        with torch.no_grad():
            images = torch.empty(tuple(image_shape), device="meta", dtype=dtype)
            forward = getattr(meta_model, "reference_forward", meta_model)  # BagNet: never the plan
            forward(images)
    finally:
        for handle in handles:
            handle.remove()
    return costs


def _meta_copy(model: nn.Module) -> nn.Module:
    """The module structure with every parameter and buffer on the meta device; copying the
    weights first (deepcopy then .to("meta")) took 1.9 s for BagNet-33 here."""
    memo: dict = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _conv_cost(name, conv, n, h, w, itemsize) -> Tuple[Cost, int, int]:
    """A plan convolution on (n, Cin, h, w): its cost and output (h, w)."""
    cout, cin, k, _ = conv.weight.shape
    ho, wo = (h - k) // conv.stride + 1, (w - k) // conv.stride + 1
    flops = 2 * n * ho * wo * cout * cin * k * k
    moved = (n * cin * h * w + n * cout * ho * wo) * itemsize
    moved += (conv.weight.numel() + conv.bias.numel()) * itemsize
    return Cost(name, f"conv {k}x{k}/{conv.stride}", (n, cin, h, w), (n, cout, ho, wo), flops, moved), ho, wo


def plan_unit_costs(
    plan, image_shape: Sequence[int], dtype: Optional[torch.dtype] = None, avg_pool: bool = True
) -> List[Cost]:
    """Cost of each unit the plan runs (``plan.units``, then ``head``) on images of
    ``image_shape`` (N, 3, H, W), with the unit's name and op as its kind. A
    ``pointwise_bottleneck`` keeps its intermediates on chip (reads x, writes x, weights); a
    ``bottleneck`` runs its convolutions (conv1, conv2, the downsample of the pixels the crop
    keeps, conv3 with the residual add), whose intermediates do go through memory."""
    dtype = dtype or plan.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    n, _, h, w = image_shape
    h, w = plan.input_extent(h, w)  # what the plan reads (see InferencePlan.input_extent)
    costs = []
    for unit in plan.units:
        if unit.kind == "stem_conv_bias_relu":
            cost, h, w = _conv_cost(unit.name, unit.conv, n, h, w, itemsize)
            cost.kind = unit.kind
            costs.append(cost)
            continue
        cin = unit.in_channels
        if unit.kind == "pointwise_bottleneck":
            p = unit.conv1.weight.shape[0]
            weights = sum(c.weight.numel() + c.bias.numel() for c in unit.convolutions())
            flops = 2 * n * h * w * (p * cin + p * p + cin * p)
            moved = (2 * n * cin * h * w + weights) * itemsize
            costs.append(Cost(unit.name, unit.kind, (n, cin, h, w), (n, cin, h, w), flops, moved))
            continue
        c1, h1, w1 = _conv_cost(unit.name, unit.conv1, n, h, w, itemsize)
        c2, h2, w2 = _conv_cost(unit.name, unit.conv2, n, h1, w1, itemsize)
        parts = [c1, c2]
        if unit.downsample is not None:  # a stride-1 conv on the (h2, w2) pixels it reads
            ds, _, _ = _conv_cost(unit.name, unit.downsample, n, h2, w2, itemsize)
            parts.append(ds)
            residual_read = n * unit.out_channels * h2 * w2  # the downsample's output
        else:
            residual_read = n * cin * h2 * w2  # the cropped input
        c3, _, _ = _conv_cost(unit.name, unit.conv3, n, h2, w2, itemsize)
        parts.append(c3)
        flops, moved = total(parts)
        moved += residual_read * itemsize
        costs.append(Cost(unit.name, unit.kind, (n, cin, h, w), (n, unit.out_channels, h2, w2), flops, moved))
        h, w = h2, w2
    costs.append(_head_cost(plan, n, h, w, itemsize, avg_pool))
    return costs


def _head_cost(plan, n, h, w, itemsize, avg_pool) -> Cost:
    """Linear after the spatial mean (avg_pool) or per patch; the mean itself is 0 FLOPs."""
    classes, channels = plan.fc_weight.shape
    weights = (plan.fc_weight.numel() + plan.fc_bias.numel()) * itemsize
    if avg_pool:
        return Cost("head", "spatial_mean_linear", (n, channels, h, w), (n, classes), 2 * n * channels * classes,
                    (n * channels * h * w + n * classes) * itemsize + weights)
    return Cost("head", "patch_logits", (n, channels, h, w), (n, h, w, classes), 2 * n * h * w * channels * classes,
                (n * channels * h * w + n * h * w * classes) * itemsize + weights)
