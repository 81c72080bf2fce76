"""The interface every backend implements: one method per fused unit of the inference plan,
named like the unit's op (``bagnet_fast/ops/README.md`` has the table of ops and their
implementations).

A unit method takes the plan's unit (folded weights, biases, stride, backend-specific
``prepared`` forms) and activations as logical (N, C, H, W) tensors in channels-last memory, and
returns the same. The defaults compose the units from ``conv_bias_act``, so a new backend needs
only that one method to be complete, and overrides the others where it fuses more.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from ..ops import reference as ref

__all__ = ["Backend", "INTERFACE", "downsample_input", "on_device_of"]


class Backend:
    """A way to run the units of an inference plan. Subclasses set ``name`` (the registry's)."""

    name = "abstract"

    def prepare(self, plan) -> None:
        """Precompute backend-specific weight forms into ``unit.prepared`` (prepacked layouts, ...)."""

    def propagates_nan(self, device: torch.device) -> bool:
        """Whether every ReLU of this backend keeps NaN as torch.relu does on ``device``. Where
        it does not (oneDNN's fused ReLU maps NaN to 0), the plan runs inputs that are not all
        finite, and plans whose weights are not, through the torch backend."""
        return True

    # --- the units --------------------------------------------------------------------------

    def conv_bias_act(self, conv, x: torch.Tensor, relu: bool = True,
                      residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """act(conv_valid(x, conv.weight, conv.stride) + conv.bias [+ residual cropped top-left])."""
        raise NotImplementedError

    def stem_conv_bias_relu(self, unit, x: torch.Tensor) -> torch.Tensor:
        """The merged stem: relu(conv3x3_valid(x) + bias), 3 input channels."""
        return self.conv_bias_act(unit.conv, x)

    def bottleneck(self, unit, x: torch.Tensor) -> torch.Tensor:
        """A block with a 3x3 conv2 or a downsample (the first block of each stage)."""
        t = self.conv_bias_act(unit.conv1, x)
        t = self.conv_bias_act(unit.conv2, t)
        height, width = t.shape[-2:]
        if unit.downsample is not None:
            # The plan's downsample is the 1x1 conv applied to the pixels it reads (stride 1 on
            # the subsampled, cropped input): the rows the residual crop drops are never computed.
            xs = downsample_input(x, unit.downsample_stride, height, width)
            residual = self.conv_bias_act(unit.downsample, self.dense(xs), relu=False)
        else:
            residual = self.dense(ref.crop_top_left(x, height, width))
        return self.conv_bias_act(unit.conv3, t, residual=residual)

    def pointwise_bottleneck(self, unit, x: torch.Tensor) -> torch.Tensor:
        """A whole 1x1-only block with an identity residual. The plan owns x: it may be overwritten."""
        t = self.conv_bias_act(unit.conv1, x)
        t = self.conv_bias_act(unit.conv2, t)
        return self.conv_bias_act(unit.conv3, t, residual=x)

    def pointwise_bottleneck_mean(self, unit, x: torch.Tensor) -> torch.Tensor:
        """The spatial mean (N, C) of ``pointwise_bottleneck`` (float32 for 16-bit x): the last
        block and the mean of the avg_pool=True head (a backend may avoid writing its output)."""
        return ref.accumulation(self.pointwise_bottleneck(unit, x)).mean(dim=(2, 3))

    def spatial_mean_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The avg_pool=True head: linear(mean over H and W): (N, C, H, W) -> (N, K)."""
        return ref.spatial_mean_linear(x, weight, bias)

    def patch_logits(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     classes: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Per-patch logits (N, H, W, K) of features (N, C, H, W), optionally for ``classes``."""
        return ref.patch_logits(x, weight, bias, classes)

    # --- helpers ----------------------------------------------------------------------------

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """A strided view in the form this backend's convolutions read (default: as it is)."""
        return x

    def __repr__(self) -> str:
        return f"<bagnet_fast backend {self.name!r}>"


# The methods a backend offers the plan: what the run-time fallback forwards (every one of them;
# tests/test_backends.py fails if one is added here and not forwarded).
INTERFACE = tuple(
    name for name, value in vars(Backend).items() if callable(value) and not name.startswith("_")
)


def downsample_input(x: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """The pixels of x that a strided 1x1 downsample reads for a (height, width) output:
    crop-before-downsample skips the rows and columns the residual crop would discard."""
    return x[:, :, : (height - 1) * stride + 1 : stride, : (width - 1) * stride + 1 : stride]


def on_device_of(x: torch.Tensor):
    """The tensor's CUDA device made current for the block (nothing for other devices)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
