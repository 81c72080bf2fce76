"""The input pipeline: uint8 images -> normalised, channels-last, optionally padded model input.

``preprocess(images)`` does in one pass (one read of the uint8 pixels, one write of the result,
by the C++/CUDA operator ``torch.ops.bagnet_fast.preprocess``) what usually takes four or five
PyTorch calls (``/ 255``, ``- mean``, ``/ std``, ``permute``/``contiguous``, ``pad``).

The BagNets were trained on RGB images scaled to [0, 1] and normalised with the ImageNet mean
and std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`): that is the default.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple, Union

import torch

from . import _extension
from .ops import has_op
from .ops import reference as ref

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "preprocess", "heatmap_padding", "implementation"]

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CHANNELS_LAST = ("NHWC", "HWC")
_CHANNELS_FIRST = ("NCHW", "CHW")
_warned_devices: set = set()

Padding = Union[int, Sequence[int]]


def heatmap_padding(patch_size: int) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of the dense-heatmap convention: the patch of
    size q centred on pixel (y, x) is padded[y : y + q, x : x + q]."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    before = (patch_size - 1) // 2
    after = patch_size - 1 - before
    return before, after, before, after


def implementation(device: "str | torch.device" = "cpu") -> Tuple[str, str]:
    """("extension" | "torch", reason): which implementation ``preprocess`` uses on ``device``."""
    device = torch.device(device)
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if not _extension.loaded():
        return "torch", f"the C++ extension bagnet_fast._C is not loaded ({_extension.load_error()})"
    if key is None:
        return "torch", f"the preprocess operator has no kernel for {device.type} tensors"
    if not has_op("preprocess", key):
        if key == "CUDA" and not _extension.with_cuda():
            return "torch", "bagnet_fast._C was built without its CUDA sources"
        return "torch", f"bagnet_fast._C has no {key} kernel of preprocess (rebuild the extension)"
    return "extension", f"fused {key} operator bagnet_fast::preprocess"


def preprocess(
    images,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    pad: Padding = 0,
    layout: Optional[str] = None,
) -> torch.Tensor:
    """uint8 RGB images -> the model's input: ``(x / 255 - mean) / std``, channels-last, ``dtype``.

    Args:
        images: uint8 tensor (or numpy array) of a batch, (N, H, W, 3) or (N, 3, H, W), or of one
            image, (H, W, 3) or (3, H, W); any strides. On the device where the result is
            wanted (moving uint8 pixels to a GPU is 4x cheaper than moving float32 ones).
        mean, std: per-channel (R, G, B) statistics of images scaled to [0, 1]; ImageNet's by
            default.
        dtype: torch.float32, torch.float16 or torch.bfloat16 (the model's dtype).
        pad: zeros added around the normalised image: one int for all sides, or
            (top, bottom, left, right). ``heatmap_padding(q)`` gives the dense-heatmap padding.
        layout: "NHWC" or "NCHW" ("HWC"/"CHW" for one image). None: inferred from where the
            size-3 channel dimension is; a shape with 3 in both places (e.g. (N, 3, H, 3)) is
            ambiguous and raises, asking for ``layout=``.

    Returns:
        (N, 3, H + top + bottom, W + left + right) in channels-last memory (a single image gives
        a batch of one, N = 1), on the images' device; a new tensor.
    """
    images = _as_tensor(images)
    nchw = _as_nchw(images, layout)
    mean_, std_ = _statistics(mean, "mean"), _statistics(std, "std")
    if any(s <= 0 for s in std_):
        raise ValueError(f"std must be positive, got {std_}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    padding = _padding(pad)
    which, reason = implementation(nchw.device)
    if which == "extension":
        return torch.ops.bagnet_fast.preprocess(nchw, list(mean_), list(std_), list(padding), dtype)
    if nchw.device.type not in _warned_devices:
        _warned_devices.add(nchw.device.type)
        warnings.warn(f"bagnet_fast.preprocess: using the pure-PyTorch path: {reason}", stacklevel=2)
    return ref.preprocess(nchw, mean_, std_, padding, dtype)


def _as_tensor(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        tensor = images
    elif hasattr(images, "__array_interface__") or hasattr(images, "__array__"):
        import numpy as np

        tensor = torch.from_numpy(np.ascontiguousarray(images))
    else:
        raise TypeError(f"expected a uint8 torch.Tensor or numpy array of images, got {type(images).__name__}")
    if tensor.dtype != torch.uint8:
        hint = (
            "; floating-point images are already scaled: normalise them with "
            "(x - mean) / std directly" if tensor.is_floating_point() else ""
        )
        raise TypeError(f"expected uint8 images (pixel values 0-255), got {tensor.dtype}{hint}")
    return tensor


def _as_nchw(images: torch.Tensor, layout: Optional[str]) -> torch.Tensor:
    """A (N, 3, H, W) view of the images (no copy)."""
    shape = tuple(images.shape)
    if images.dim() not in (3, 4):
        raise ValueError(
            f"expected images (N, H, W, 3) or (N, 3, H, W), or one image (H, W, 3) or (3, H, W); "
            f"got shape {shape}"
        )
    batch = images if images.dim() == 4 else images.unsqueeze(0)
    if layout is None:
        last, first = batch.shape[3] == 3, batch.shape[1] == 3
        if last and first:
            raise ValueError(
                f"ambiguous layout for shape {shape}: both dimension {images.dim() - 3} and the last "
                "have size 3; pass layout='NHWC' or layout='NCHW'"
            )
        if not (last or first):
            raise ValueError(f"expected 3 colour channels (RGB) first or last, got shape {shape}")
        channels_last = last
    else:
        name = layout.upper()
        if name not in _CHANNELS_LAST + _CHANNELS_FIRST:
            raise ValueError(f"layout must be 'NHWC' or 'NCHW' (or None to infer it), got {layout!r}")
        channels_last = name in _CHANNELS_LAST
        channels = batch.shape[3] if channels_last else batch.shape[1]
        if channels != 3:
            raise ValueError(f"layout {name} of shape {shape} has {channels} channels, expected 3 (RGB)")
    return batch.permute(0, 3, 1, 2) if channels_last else batch


def _statistics(values: Sequence[float], name: str) -> Tuple[float, float, float]:
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {len(values)}")
    return values


def _padding(pad: Padding) -> Tuple[int, int, int, int]:
    if isinstance(pad, int) and not isinstance(pad, bool):
        padding = (pad,) * 4
    else:
        padding = tuple(pad)
        if len(padding) != 4 or not all(isinstance(p, int) and not isinstance(p, bool) for p in padding):
            raise ValueError(f"pad must be an int or (top, bottom, left, right) ints, got {pad!r}")
    if any(p < 0 for p in padding):
        raise ValueError(f"pad must be non-negative, got {pad!r}")
    return padding
