"""Pure-PyTorch reference of every fused unit: the oracle of the op tests and the ``torch``
backend (any device, any floating dtype).

Layout convention of the inference plan: activations are logical (N, C, H, W) tensors in
channels-last memory (the bytes of an NHWC array), so every backend sees the same tensors.
Weights are folded (BatchNorm inside) and carry a bias.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "conv_bias_act",
    "stem_conv_bias_relu",
    "bias_residual_act",
    "bottleneck",
    "pointwise_bottleneck",
    "pointwise_bottleneck_mean",
    "spatial_mean_linear",
    "mean_linear",
    "patch_logits",
    "crop_top_left",
    "preprocess",
]


def crop_top_left(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """x[:, :, :height, :width] (a view); the residual crop of a BagNet block."""
    if x.shape[-2] == height and x.shape[-1] == width:
        return x
    return x[:, :, :height, :width]


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride: int = 1,
    relu: bool = True,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """act(conv_valid(x, weight, stride) + bias [+ residual cropped top-left]).

    x: (N, Cin, H, W); weight: (Cout, Cin, k, k); residual: (N, Cout, >=Ho, >=Wo).
    """
    y = F.conv2d(x, weight, bias, stride=stride)
    if residual is not None:
        y = y + crop_top_left(residual, y.shape[-2], y.shape[-1])
    return torch.relu(y) if relu else y


def stem_conv_bias_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The merged stem: relu(conv3x3_valid(x) + bias) for x (N, 3, H, W), weight (Cout, 3, 3, 3)
    -> (N, Cout, H - 2, W - 2) channels-last. The CUDA and C++ kernels accumulate in float32
    (whatever the storage dtype) starting from the bias."""
    y = F.conv2d(x.float(), weight.float(), bias.float())
    return torch.relu(y).to(x.dtype).contiguous(memory_format=torch.channels_last)


def bias_residual_act(
    y: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor], relu: bool
) -> torch.Tensor:
    """act(y + bias[c] + residual[:, :, :H, :W]): the epilogue the cuda backend runs after a
    vendor GEMM or convolution. y (N, C, H, W); residual (N, C, >=H, >=W) or None."""
    out = y + bias.view(1, -1, 1, 1)
    if residual is not None:
        out = out + crop_top_left(residual, y.shape[-2], y.shape[-1])
    return torch.relu(out) if relu else out


def bottleneck(
    x: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor,
    w2: torch.Tensor, b2: torch.Tensor, stride: int,
    w3: torch.Tensor, b3: torch.Tensor,
    wd: Optional[torch.Tensor] = None, bd: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A block with a k x k conv2 of ``stride`` and/or a 1x1 downsample (wd, bd) of the same
    stride: relu(W3·relu(W2 * relu(W1·x + b1) + b2) + b3 + residual), residual = the downsample
    of x (or x), cropped top-left to the output."""
    t = conv_bias_act(conv_bias_act(x, w1, b1), w2, b2, stride)
    residual = x if wd is None else conv_bias_act(x, wd, bd, stride, relu=False)
    return conv_bias_act(t, w3, b3, residual=residual)


def pointwise_bottleneck(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
) -> torch.Tensor:
    """A whole 1x1-only bottleneck, per pixel: relu(W3·relu(W2·relu(W1·x + b1) + b2) + b3 + x).

    x: (N, C, H, W); 1x1 conv weights w1: (p, C, 1, 1), w2: (p, p, 1, 1), w3: (C, p, 1, 1).
    """
    t = conv_bias_act(x, w1, b1)
    t = conv_bias_act(t, w2, b2)
    return conv_bias_act(t, w3, b3, residual=x)


def pointwise_bottleneck_mean(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
) -> torch.Tensor:
    """The spatial mean (N, C) of ``pointwise_bottleneck``, in float32 for 16-bit x (else x's
    dtype): the last block and the mean of the avg_pool=True head (the Triton op never writes
    the block's output)."""
    return accumulation(pointwise_bottleneck(x, w1, b1, w2, b2, w3, b3)).mean(dim=(2, 3))


def accumulation(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype sums are accumulated in: float32 for 16-bit types, else its own."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def mean_linear(mean: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The head's linear on (N, C) means, computed in float32 for 16-bit ``dtype`` (else in
    ``dtype``), returned in ``dtype``."""
    wide = torch.promote_types(dtype, torch.float32)
    return torch.addmm(bias.to(wide), mean.to(wide), weight.to(wide).t()).to(dtype)


def spatial_mean_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The BagNet head with avg_pool=True: linear(mean over H and W). (N, C, H, W) -> (N, K)."""
    return F.linear(x.mean(dim=(2, 3)), weight, bias)


def patch_logits(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    classes: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Per-patch logits (N, H, W, K) (avg_pool=False), optionally for ``classes`` only."""
    if classes is not None:
        index = torch.as_tensor(classes, device=weight.device, dtype=torch.long)
        weight, bias = weight.index_select(0, index), bias.index_select(0, index)
    return F.linear(x.permute(0, 2, 3, 1), weight, bias)


def preprocess(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    pad: Sequence[int] = (0, 0, 0, 0),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The input pipeline: uint8 images (N, 3, H, W), any strides -> (N, 3, H + top + bottom,
    W + left + right) channels-last ``dtype``: (x / 255 - mean[c]) / std[c] inside, zeros in the
    padding ``pad = (top, bottom, left, right)`` (applied after normalisation).

    Computed as x * scale[c] + shift[c] in float32 with scale = 1 / (255 std) and shift =
    -mean / std rounded to float32 from float64, like the C++ and CUDA kernels.
    """
    top, bottom, left, right = pad
    n, _, height, width = images.shape
    mean64 = torch.tensor(list(mean), dtype=torch.float64)
    std64 = torch.tensor(list(std), dtype=torch.float64)
    scale = (1.0 / (255.0 * std64)).float().view(1, 3, 1, 1).to(images.device)
    shift = (-mean64 / std64).float().view(1, 3, 1, 1).to(images.device)
    out = torch.zeros(
        (n, 3, height + top + bottom, width + left + right),
        dtype=dtype,
        device=images.device,
    ).contiguous(memory_format=torch.channels_last)
    out[:, :, top : top + height, left : left + width] = images.float() * scale + shift
    return out
