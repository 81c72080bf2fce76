"""Dead-branch elimination: residual blocks whose branch is a constant up to a proven bound are
removed from the inference plan, their constant folded into the neighbouring units' biases.

The official ImageNet BagNet-33 weights have such blocks (max |w| 8e-8…3.8e-7 in every conv of
layer1.1–1.2 and layer2.1–2.3: docs/bagnet.md). In float32 they change nothing, in reduced
precision they add noise, and they cost 4.4 GFLOP per 224² image in the reference (4.2 on the
217² corner a plan reads, see plan.InferencePlan.input_extent).

The bound. A 1x1-only block computes relu(x + f(x)) with the folded branch
f(x) = W3·relu(W2·relu(W1·x + b1) + b2) + b3. Its inputs follow a ReLU, so x ≥ 0. ReLU is
1-Lipschitz elementwise (|relu(a) − relu(b)| ≤ |a − b|), hence with c = f(0):

    |f(x) − c| ≤ |W3|·|W2|·|W1|·x ≤ g·‖x‖∞   (elementwise; |W| the entrywise absolute value)

where g_o is row o's sum of M = |W3||W2||W1| (computed as |W3|(|W2|(|W1|·1)), in float64), and
the block's **gain** is max_o g_o. A block is eliminated when its gain is at most the tolerance
τ: replacing the branch by c changes every output by at most τ·‖x‖∞, τ times the largest input
activation of the block.

The default τ = 2⁻⁴⁸ = u² (u = 2⁻²⁴, the float32 unit roundoff): the elimination then changes a
block's outputs by at most u times one float32 rounding unit at the scale of its largest input.
The float32 computation it replaces already rounds at that scale: the residual sum x + f(x)
rounds by up to u·|x_o + f_o(x)| and the next unit's GEMM sums the block's channels, the largest
of which is ~‖x‖∞, with rounding errors of order u·Σ|w||x|. So by default the elimination adds
less error than the float32 evaluation of the branch, by a factor 2²⁴ at the scale that
matters. (Outputs much smaller than u·‖x‖∞ are below float32's resolution of the sums that use
them.) The official weights' dead blocks have gains near 1e-15 (8e-8…3.8e-7 per entry, three
convs, 256–1024 channels); near-dead ones (layer3.3–3.5, 2e-6…2e-3) are far above u² and are
eliminated only with a looser, opt-in τ (``model.dead_branch_tolerance = 1e-7``, say), whose
guarantee is the same statement with that τ.

The fold. After a ReLU output y = relu(z): relu(y + d) = relu(z + min(d, 0)) + max(d, 0) per
channel (check d ≥ 0 and d < 0 separately). A run of dead blocks after a live unit U therefore
turns into (a, s), out = relu(z + a) + s with s ≥ 0, updated per block by d = s + c,
a += min(d, 0), s = max(d, 0). a is added to U's last bias; the post-activation shift s goes into
whatever reads the output: the next block's conv1 bias (+= W1·s), its residual (conv3 bias += s
for an identity residual, downsample bias += Wd·s), or the head's bias (+= W_fc·s). Only
1x1-only blocks with an identity residual are candidates (their geometry is the identity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

__all__ = ["DEFAULT_TOLERANCE", "DeadBranch", "dead_branches", "eliminate_dead_branches"]

DEFAULT_TOLERANCE = 2.0 ** -24


@dataclass
class DeadBranch:
    """One residual branch found constant: ``|f(x) − constant| ≤ gain·‖x‖∞`` for all x ≥ 0."""

    name: str  # the block, "layer1.1"
    gain: float  # max over output channels of the bound's row sum
    tolerance: float  # what it was compared against
    eliminated: bool
    flops_per_image_224: int  # what the block costs a plan per 224x224 image (saved if eliminated)
    constant: torch.Tensor = field(repr=False)  # (C,) float64: the branch at x = 0

    def as_dict(self) -> dict:
        return {"block": self.name, "gain": self.gain, "tolerance": self.tolerance,
                "eliminated": self.eliminated, "flops_per_image_224": self.flops_per_image_224}


def _fold64(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """conv + BatchNorm as a float64 (out, in) matrix and bias (1x1 convolutions)."""
    gamma = bn.weight.double() if bn.weight is not None else 1.0
    scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = -bn.running_mean.double() * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    return conv.weight.double().flatten(1) * scale[:, None], bias


def branch_bound(block: nn.Module):
    """(gain, constant) of a 1x1-only Bottleneck's branch, from its folded float64 weights."""
    w1, b1 = _fold64(block.conv1, block.bn1)
    w2, b2 = _fold64(block.conv2, block.bn2)
    w3, b3 = _fold64(block.conv3, block.bn3)
    ones = torch.ones(w1.shape[1], dtype=torch.float64, device=w1.device)
    rows = w3.abs() @ (w2.abs() @ (w1.abs() @ ones))
    constant = w3 @ torch.relu(w2 @ torch.relu(b1) + b2) + b3
    return float(rows.max()), constant


def _is_candidate(block: nn.Module) -> bool:
    return (block.downsample is None and block.conv2.kernel_size == (1, 1) and block.conv2.stride == (1, 1)
            and block.conv1.kernel_size == (1, 1) and block.conv3.kernel_size == (1, 1))


@torch.no_grad()
def dead_branches(model: nn.Module, tolerance: Optional[float] = None) -> List[DeadBranch]:
    """Every 1x1-only identity block of ``model`` with its bound, and whether a plan with
    ``tolerance`` (default: the model's ``dead_branch_tolerance``, else 2**-48) eliminates it.
    Non-finite weights are never eliminated (their branch is not a constant)."""
    if tolerance is None:
        tolerance = getattr(model, "dead_branch_tolerance", DEFAULT_TOLERANCE)
    found, size = [], _input_extent_224(model) - 2  # the merged stem's output on what a plan reads at 224
    for s in range(1, 5):
        for i, block in enumerate(getattr(model, f"layer{s}")):
            size = (size - block.conv2.kernel_size[0]) // block.conv2.stride[0] + 1
            if not _is_candidate(block):
                continue
            gain, constant = branch_bound(block)
            c, p = block.conv1.in_channels, block.conv1.out_channels
            flops = 2 * size * size * (p * c + p * p + c * p)
            finite = bool(torch.isfinite(constant).all()) and gain == gain and gain != float("inf")
            found.append(DeadBranch(f"layer{s}.{i}", gain, float(tolerance), finite and gain <= tolerance,
                                    flops, constant))
    return found


def _input_extent_224(model: nn.Module) -> int:
    """The side of a 224 image's corner the patch map depends on (plan.InferencePlan.input_extent,
    from the modules: 217 for the shipped BagNets)."""
    from .plan import patch_geometry  # plan imports this module

    field, jump = patch_geometry(model)
    return (224 - field) // jump * jump + field if field <= 224 else 224


def _add(bias: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (bias.double() + delta.to(bias.device)).to(bias.dtype).contiguous()


def eliminate_dead_branches(plan, model: nn.Module, tolerance: float) -> List[DeadBranch]:
    """Remove the blocks :func:`dead_branches` marks from ``plan`` (built from ``model``) and fold
    their constants into the neighbouring biases, in place; returns the records."""
    report = dead_branches(model, tolerance)
    dead = {d.name: d for d in report if d.eliminated}
    if not dead:
        return report
    units = plan.units  # [stem, *blocks]
    kept = [units[0]]
    index = 1
    while index < len(units):
        unit = units[index]
        if unit.name not in dead:
            kept.append(unit)
            index += 1
            continue
        previous = kept[-1]
        run_end = index
        while run_end < len(units) and units[run_end].name in dead:
            run_end += 1
        if run_end == len(units) and plan.head is None:
            # A shift could not go into a head module of the user's: keep the trailing blocks.
            for block in units[index:]:
                dead[block.name].eliminated = False
                kept.append(block)
            break
        shift = torch.zeros(unit.out_channels, dtype=torch.float64)
        lower = torch.zeros_like(shift)
        while index < len(units) and units[index].name in dead:
            d = shift + dead[units[index].name].constant.cpu()
            lower += d.clamp(max=0)
            shift = d.clamp(min=0)
            index += 1
        last = previous.conv if previous.kind == "stem_conv_bias_relu" else previous.conv3
        last.bias = _add(last.bias, lower)
        if bool((shift != 0).any()):
            following = units[index] if index < len(units) else None
            _absorb_shift(plan, following, shift)
    plan.blocks = kept[1:]
    return report


def _absorb_shift(plan, unit, shift: torch.Tensor) -> None:
    """Fold a post-activation shift s of ``unit``'s input (None: the head's) into biases."""
    if unit is None:
        head = plan.head
        head.bias = _add(head.bias, head.weight.double() @ shift.to(head.weight.device))
        return
    unit.conv1.bias = _add(unit.conv1.bias, unit.conv1.matrix.double() @ shift.to(unit.conv1.weight.device))
    if unit.downsample is not None:
        unit.downsample.bias = _add(unit.downsample.bias,
                                    unit.downsample.matrix.double() @ shift.to(unit.downsample.weight.device))
    else:  # the identity residual (cropped or not) carries the shift: add it after conv3
        unit.conv3.bias = _add(unit.conv3.bias, shift)
