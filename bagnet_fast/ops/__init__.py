"""Fused operators of bagnet_fast (namespace torch.ops.bagnet_fast) and their references.

The schemas and CPU/CUDA kernels live in csrc/ (the extension bagnet_fast._C); this package
registers their fake kernels (so torch.compile and opcheck can trace them) and holds the
pure-PyTorch reference of every op (:mod:`bagnet_fast.ops.reference`).
"""

from __future__ import annotations

import torch

from .. import _extension

__all__ = ["has_op"]


def has_op(name: str, dispatch_key: str = "CPU") -> bool:
    """Whether torch.ops.bagnet_fast.<name> has a kernel for ``dispatch_key``."""
    if not _extension.loaded():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"bagnet_fast::{name}", dispatch_key)


if _extension.loaded():

    @torch.library.register_fake("bagnet_fast::pointwise_bottleneck")
    def _pointwise_bottleneck_fake(x, w1, b1, w2, b2, w3, b3):
        torch._check(x.dim() == 4, lambda: "x must be 4-D (N, C, H, W)")
        torch._check(w1.shape[1] == x.shape[1] and w3.shape[0] == x.shape[1], lambda: "channel mismatch")
        return torch.empty_like(x, memory_format=torch.channels_last)

    @torch.library.register_fake("bagnet_fast::pointwise_bottleneck_")
    def _pointwise_bottleneck_inplace_fake(x, w1, b1, w2, b2, w3, b3):
        torch._check(x.dim() == 4, lambda: "x must be 4-D (N, C, H, W)")
        return None

    @torch.library.register_fake("bagnet_fast::bias_residual_act")
    def _bias_residual_act_fake(y, bias, residual, relu):
        torch._check(y.dim() == 4, lambda: "y must be 4-D (N, C, H, W)")
        return torch.empty_like(y)

    @torch.library.register_fake("bagnet_fast::spatial_mean_linear")
    def _spatial_mean_linear_fake(x, weight, bias):
        torch._check(x.dim() == 4, lambda: "x must be 4-D (N, C, H, W)")
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("bagnet_fast::preprocess")
    def _preprocess_fake(images, mean, std, pad, dtype):
        torch._check(images.dim() == 4 and images.shape[1] == 3, lambda: "images must be (N, 3, H, W)")
        torch._check(images.dtype == torch.uint8, lambda: "images must be uint8")
        torch._check(len(pad) == 4, lambda: "pad must be [top, bottom, left, right]")
        n, _, height, width = images.shape
        top, bottom, left, right = pad
        return images.new_empty(
            (n, 3, height + top + bottom, width + left + right), dtype=dtype
        ).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("bagnet_fast::stem_conv_bias_relu")
    def _stem_conv_bias_relu_fake(x, weight, bias):
        torch._check(x.dim() == 4 and x.shape[1] == 3, lambda: "x must be (N, 3, H, W)")
        torch._check(tuple(weight.shape[1:]) == (3, 3, 3), lambda: "weight must be (Cout, 3, 3, 3)")
        n, _, height, width = x.shape
        return x.new_empty((n, weight.shape[0], height - 2, width - 2)).contiguous(memory_format=torch.channels_last)
