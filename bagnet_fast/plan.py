"""The inference plan: a BagNet compiled into a short list of fused units.

Exact rewrites applied when the plan is built (same function, float rounding aside):
- BatchNorm folded into each convolution's weight and a bias;
- the stem's conv1 (1x1, 3->64) and conv2 (3x3, 64->64), with nothing between them, merged into
  one 3x3 conv 3->64: W[o, c] = sum_m W2[o, m] W1[m, c] (saves 3.5 GFLOP per 224 image);
- the downsample of a cropped residual computed on the crop only (1x1 conv commutes with it);
- the linear head applied after the spatial mean.

The plan is cached on the model and rebuilt whenever a parameter or buffer changes: its key
holds every tensor's storage pointer and version counter (bumped by in-place writes such as
optimizer steps and load_state_dict), plus device, dtype and backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import executors as _backends

__all__ = [
    "ConvUnit",
    "BlockUnit",
    "InferencePlan",
    "build_plan",
    "get_plan",
    "check_input",
    "receptive_field",
    "uses_inference_plan",
]


@dataclass
class ConvUnit:
    """A valid k x k convolution with folded BatchNorm: weight (Cout, Cin, k, k), bias (Cout,)."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: int = 1
    prepared: Dict[str, object] = field(default_factory=dict)  # backend-specific forms

    @property
    def kernel_size(self) -> int:
        return self.weight.shape[-1]

    @property
    def matrix(self) -> torch.Tensor:
        """The (Cout, Cin) matrix of a 1x1 convolution."""
        return self.weight.flatten(1)


@dataclass
class BlockUnit:
    """One bottleneck block of the plan."""

    conv1: ConvUnit
    conv2: ConvUnit
    conv3: ConvUnit
    downsample: Optional[ConvUnit]

    @property
    def is_pointwise(self) -> bool:
        """A 1x1-only block with an identity residual: one fused `pointwise_bottleneck`."""
        return self.conv2.kernel_size == 1 and self.conv2.stride == 1 and self.downsample is None


@dataclass
class InferencePlan:
    stem: ConvUnit
    blocks: List[BlockUnit]
    fc_weight: torch.Tensor  # (K, 2048)
    fc_bias: torch.Tensor  # (K,)
    patch_size: int
    backend: "_backends.Backend"

    @property
    def device(self) -> torch.device:
        return self.fc_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fc_weight.dtype

    def features(self, x: torch.Tensor, blocks: Optional[int] = None) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, 2048, H', W') features in channels-last memory (the output
        of the first ``blocks`` blocks if given)."""
        backend = self.backend
        x = backend.stem(self.stem, x.contiguous(memory_format=torch.channels_last))
        for block in self.blocks[:blocks]:
            x = backend.block(block, x)
        return x

    def run(self, x: torch.Tensor, avg_pool: bool = True) -> torch.Tensor:
        """Logits (N, K) with avg_pool, else per-patch logits (N, H', W', K)."""
        if avg_pool:  # the last block and the head together: a backend may fuse them
            x = self.features(x, blocks=len(self.blocks) - 1)
            return self.backend.block_mean_linear(self.blocks[-1], x, self.fc_weight, self.fc_bias)
        features = self.features(x)
        return self.backend.patch_logits(features, self.fc_weight, self.fc_bias, None)


def receptive_field(model: nn.Module) -> int:
    """Patch size q of a BagNet-architecture model (stem 3x3, then each block's conv2)."""
    size, jump = 3, 1
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            kernel, stride = block.conv2.kernel_size[0], block.conv2.stride[0]
            size += (kernel - 1) * jump
            jump *= stride
    return size


def check_input(x: torch.Tensor, patch_size: int) -> None:
    """Clear errors for what the reference would reject with a cryptic one (or accept wrongly)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"expected a 4-D batch of images (N, 3, H, W), got shape {tuple(x.shape)}; "
            "use x.unsqueeze(0) for a single image"
        )
    if x.shape[1] != 3:
        raise ValueError(
            f"expected 3 colour channels in dimension 1 (N, 3, H, W), got shape {tuple(x.shape)}"
            + ("; the images look channels-last (N, H, W, 3): permute(0, 3, 1, 2)" if x.shape[-1] == 3 else "")
        )
    if not x.is_floating_point():
        raise TypeError(
            f"expected floating-point images normalised with the ImageNet mean/std, got {x.dtype}; "
            "see bagnet_fast.preprocess for uint8 images"
        )
    if x.shape[2] < patch_size or x.shape[3] < patch_size:
        raise ValueError(
            f"images must be at least {patch_size}x{patch_size} pixels (the patch size of this "
            f"BagNet), got {x.shape[2]}x{x.shape[3]}"
        )


def _parameters_and_buffers(model: nn.Module) -> List[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers())


def check_model_input_match(model: nn.Module, x: torch.Tensor) -> None:
    weight = model.fc.weight
    if x.device != weight.device:
        raise ValueError(f"images are on {x.device} but the model is on {weight.device}")
    if x.dtype != weight.dtype:
        raise TypeError(
            f"images are {x.dtype} but the model is {weight.dtype}; convert one of them "
            f"(e.g. x.to({weight.dtype}) or model.to({x.dtype}))"
        )


def uses_inference_plan(model: nn.Module, x: torch.Tensor) -> bool:
    """Eval mode and no autograd graph to record: run the fused plan.

    With grad enabled, the plan is used only if neither the input nor any parameter requires
    grad, so that gradients (saliency maps, fine-tuning in eval mode) always come from the
    reference computation.
    """
    if model.training:
        return False
    if torch.is_grad_enabled():
        if x.requires_grad or any(p.requires_grad for p in model.parameters()):
            return False
    return True


def _version(t: torch.Tensor) -> int:
    # Tensors created under torch.inference_mode have no version counter; only their storage
    # pointer is tracked (in-place edits of them inside inference_mode are not detected).
    return -1 if t.is_inference() else t._version


def _plan_key(model: nn.Module, backend_name: Optional[str]) -> Tuple:
    tensors = _parameters_and_buffers(model)
    return (backend_name,) + tuple((t.data_ptr(), _version(t), t.dtype, t.device) for t in tensors)


def get_plan(model: nn.Module) -> InferencePlan:
    """The model's cached plan, rebuilt if any weight changed since it was built."""
    backend_name = getattr(model, "backend", None)
    key = _plan_key(model, backend_name)
    cached = getattr(model, "_inference_plan", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = build_plan(model, backend_name)
    model._inference_plan = (key, plan)
    return plan


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm(conv(x)) == conv'(x) + bias' in eval mode; computed in float64 for accuracy."""
    weight = conv.weight if weight is None else weight
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    folded = weight.double() * scale.view(-1, 1, 1, 1)
    bias = bn.bias.double() - bn.running_mean.double() * scale
    return folded.to(weight.dtype), bias.to(weight.dtype)


def _conv_unit(conv: nn.Conv2d, bn: nn.BatchNorm2d, weight: Optional[torch.Tensor] = None) -> ConvUnit:
    w, b = _fold(conv, bn, weight)
    if conv.padding not in ((0, 0), 0) or conv.dilation != (1, 1) or conv.groups != 1:
        raise ValueError("not a BagNet: convolutions must be valid (padding 0), undilated, ungrouped")
    stride_h, stride_w = conv.stride
    if stride_h != stride_w:
        raise ValueError(f"not a BagNet: non-square stride {conv.stride}")
    return ConvUnit(w.contiguous(memory_format=torch.channels_last), b.contiguous(), stride_h)


def merged_stem_weight(model: nn.Module) -> torch.Tensor:
    """conv2 o conv1 as one 3x3 conv 3->64 (both linear, nothing between them)."""
    w1 = model.conv1.weight.double()[:, :, 0, 0]  # (64, 3)
    w2 = model.conv2.weight.double()  # (64, 64, 3, 3)
    return torch.einsum("omhw,mc->ochw", w2, w1).to(model.conv2.weight.dtype)


@torch.no_grad()
def build_plan(model: nn.Module, backend_name: Optional[str] = None) -> InferencePlan:
    """Fold, merge and prepare a BagNet-architecture model for ``backend_name`` (None: the
    fastest correct backend for the model's device and dtype)."""
    device, dtype = model.fc.weight.device, model.fc.weight.dtype
    backend = _backends.select(backend_name, device, dtype)
    stem = _conv_unit(model.conv2, model.bn1, merged_stem_weight(model))
    blocks = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            downsample = None
            if block.downsample is not None:
                downsample = _conv_unit(block.downsample[0], block.downsample[1])
            blocks.append(
                BlockUnit(
                    _conv_unit(block.conv1, block.bn1),
                    _conv_unit(block.conv2, block.bn2),
                    _conv_unit(block.conv3, block.bn3),
                    downsample,
                )
            )
    plan = InferencePlan(
        stem=stem,
        blocks=blocks,
        fc_weight=model.fc.weight.detach().clone(),
        fc_bias=model.fc.bias.detach().clone(),
        patch_size=receptive_field(model),
        backend=backend,
    )
    backend.prepare(plan)
    return plan
