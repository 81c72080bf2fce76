"""bagnet_fast.preprocess and the operator behind it (C++ CPU twin here, CUDA kernel on a GPU)
against the textbook formula computed in float64."""

from __future__ import annotations

import importlib

import pytest
import torch

import bagnet_fast
from bagnet_fast import _extension
from bagnet_fast.ops import reference as ref

# The module that defines bagnet_fast.preprocess (the function).
preprocess_module = importlib.import_module("bagnet_fast.preprocessing")
ops = torch.ops.bagnet_fast
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (run benchmarks/gpu_check.sh)")
needs_extension = pytest.mark.skipif(not _extension.loaded(), reason=f"bagnet_fast._C missing: {_extension.load_error()}")


def textbook(images_nchw, mean=bagnet_fast.IMAGENET_MEAN, std=bagnet_fast.IMAGENET_STD, pad=(0, 0, 0, 0)):
    """((x / 255 - mean) / std), zero padded, in float64: (N, 3, H', W')."""
    x = images_nchw.double() / 255.0
    x = (x - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    top, bottom, left, right = pad
    return torch.nn.functional.pad(x, (left, right, top, bottom))


def assert_matches_textbook(actual, expected, dtype):
    """float32: within 1e-6 (|values| <= 2.7, so ~4 ulp: scale/shift rounded to float32 plus two
    roundings). float16/bfloat16: the correctly rounded value within half an ulp, plus that
    float32 error."""
    assert actual.dtype == dtype
    assert actual.shape == expected.shape
    assert actual.is_contiguous(memory_format=torch.channels_last)
    expected = expected.to(actual.device)
    error = (actual.double() - expected).abs()
    bound = 1e-6 if dtype == torch.float32 else 0.5 * torch.finfo(dtype).eps * expected.abs() + 1e-6
    excess = error - bound
    worst = int(excess.flatten().argmax())
    assert (excess <= 0).all(), f"first mismatch at flat index {worst}: {actual.flatten()[worst]} vs {expected.flatten()[worst]}"


def random_images(shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# Ragged sizes (no 16-pixel chunk divides the widths 1, 17, 37), batch 1 and > 1.
SIZES = [(1, 1, 1), (2, 5, 17), (3, 31, 37), (1, 33, 64)]
PADS = [(0, 0, 0, 0), (16, 16, 16, 16), (1, 2, 3, 4), (0, 5, 7, 0)]


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pad", PADS)
def test_op_nhwc_matches_textbook(dtype, size, pad):
    n, h, w = size
    images = random_images((n, h, w, 3))
    nchw = images.permute(0, 3, 1, 2)  # the channels-last view the op reads in place
    actual = ops.preprocess(nchw, list(bagnet_fast.IMAGENET_MEAN), list(bagnet_fast.IMAGENET_STD), list(pad), dtype)
    assert_matches_textbook(actual, textbook(nchw, pad=pad), dtype)


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_any_strides(dtype):
    """NCHW planes, a cropped view, a flipped copy: the op reads strides, not a fixed layout."""
    base = random_images((2, 3, 29, 43), seed=1)
    mean, std = (0.5, 0.25, 0.125), (0.3, 0.2, 0.1)
    for images in (base, base[:, :, 3:20, 5:40], base.flip(3).contiguous()[:, :, ::2, ::3]):
        actual = ops.preprocess(images, list(mean), list(std), [2, 0, 1, 3], dtype)
        assert_matches_textbook(actual, textbook(images, mean, std, (2, 0, 1, 3)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_fallback_matches_textbook(dtype):
    images = random_images((2, 3, 11, 19), seed=2)
    actual = ref.preprocess(images, bagnet_fast.IMAGENET_MEAN, bagnet_fast.IMAGENET_STD, (3, 1, 0, 2), dtype)
    assert_matches_textbook(actual, textbook(images, pad=(3, 1, 0, 2)), dtype)


def test_api_layouts_single_images_and_numpy():
    nhwc = random_images((2, 20, 24, 3), seed=3)
    expected = textbook(nhwc.permute(0, 3, 1, 2), pad=(1, 1, 1, 1))
    assert_matches_textbook(bagnet_fast.preprocess(nhwc, pad=1), expected, torch.float32)
    assert_matches_textbook(bagnet_fast.preprocess(nhwc.permute(0, 3, 1, 2).contiguous(), pad=1), expected, torch.float32)
    assert_matches_textbook(bagnet_fast.preprocess(nhwc.numpy(), pad=1), expected, torch.float32)
    # One image -> a batch of one.
    assert_matches_textbook(bagnet_fast.preprocess(nhwc[1], pad=1), expected[1:], torch.float32)
    assert_matches_textbook(bagnet_fast.preprocess(nhwc[1].permute(2, 0, 1)), textbook(nhwc[1:].permute(0, 3, 1, 2)), torch.float32)
    # Ambiguous shape: (N, 3, H, 3) is NCHW with W = 3 or NHWC with H = 3.
    ambiguous = random_images((2, 3, 5, 3), seed=4)
    with pytest.raises(ValueError, match="layout="):
        bagnet_fast.preprocess(ambiguous)
    as_nhwc = bagnet_fast.preprocess(ambiguous, layout="NHWC")
    assert as_nhwc.shape == (2, 3, 3, 5)
    assert_matches_textbook(as_nhwc, textbook(ambiguous.permute(0, 3, 1, 2)), torch.float32)
    assert bagnet_fast.preprocess(ambiguous, layout="nchw").shape == (2, 3, 5, 3)


def test_api_heatmap_padding_gives_the_reference_geometry():
    assert bagnet_fast.heatmap_padding(33) == (16, 16, 16, 16)
    assert bagnet_fast.heatmap_padding(8) == (3, 4, 3, 4)
    q = 17
    images = random_images((1, 30, 26, 3), seed=5)
    padded = bagnet_fast.preprocess(images, pad=bagnet_fast.heatmap_padding(q))
    assert padded.shape[-2:] == (30 + q - 1, 26 + q - 1)  # H x W patches of q x q, one per pixel
    assert padded[:, :, :8].abs().max() == 0 and padded[:, :, :, -8:].abs().max() == 0


def test_api_mean_std_and_dtype_arguments():
    images = random_images((1, 7, 9, 3), seed=6)
    mean, std = torch.tensor([0.1, 0.2, 0.3]), [1.0, 2.0, 4.0]
    actual = bagnet_fast.preprocess(images, mean=mean, std=std, dtype=torch.bfloat16)
    assert_matches_textbook(actual, textbook(images.permute(0, 3, 1, 2), (0.1, 0.2, 0.3), std), torch.bfloat16)


def test_api_bad_inputs_raise_clear_errors():
    images = random_images((2, 8, 8, 3))
    with pytest.raises(TypeError, match="uint8"):
        bagnet_fast.preprocess(images.float())
    with pytest.raises(TypeError, match="uint8"):
        bagnet_fast.preprocess(images.to(torch.int32))
    with pytest.raises(TypeError, match="numpy"):
        bagnet_fast.preprocess([[1, 2, 3]])
    with pytest.raises(ValueError, match="3 colour channels"):
        bagnet_fast.preprocess(random_images((2, 8, 8, 4)))
    with pytest.raises(ValueError, match=r"got shape \(8, 8\)"):
        bagnet_fast.preprocess(images[0, :, :, 0])
    with pytest.raises(ValueError, match="has 8 channels"):
        bagnet_fast.preprocess(images, layout="NCHW")
    with pytest.raises(ValueError, match="layout must be"):
        bagnet_fast.preprocess(images, layout="CHWN")
    with pytest.raises(ValueError, match="dtype must be"):
        bagnet_fast.preprocess(images, dtype=torch.float64)
    with pytest.raises(ValueError, match="mean must have 3 values"):
        bagnet_fast.preprocess(images, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std must be positive"):
        bagnet_fast.preprocess(images, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="pad must be non-negative"):
        bagnet_fast.preprocess(images, pad=-1)
    with pytest.raises(ValueError, match="top, bottom, left, right"):
        bagnet_fast.preprocess(images, pad=(1, 2))


@needs_extension
def test_op_bad_inputs_raise_named_errors():
    images = random_images((1, 3, 4, 4))
    m, s = [0.5] * 3, [0.5] * 3
    with pytest.raises(RuntimeError, match="images must be uint8"):
        ops.preprocess(images.float(), m, s, [0] * 4, torch.float32)
    with pytest.raises(RuntimeError, match=r"images must be \(N, 3, H, W\)"):
        ops.preprocess(images[:, :2], m, s, [0] * 4, torch.float32)
    with pytest.raises(RuntimeError, match="mean and std must have 3 values"):
        ops.preprocess(images, m[:2], s, [0] * 4, torch.float32)
    with pytest.raises(RuntimeError, match="pad must be"):
        ops.preprocess(images, m, s, [0] * 3, torch.float32)
    with pytest.raises(RuntimeError, match="pad must be non-negative"):
        ops.preprocess(images, m, s, [0, 0, -1, 0], torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be"):
        ops.preprocess(images, m, s, [0] * 4, torch.float64)
    with pytest.raises(RuntimeError, match="std must be positive"):
        ops.preprocess(images, m, [0.5, -1.0, 0.5], [0] * 4, torch.float32)


@needs_extension
def test_opcheck():
    images = random_images((2, 5, 6, 3)).permute(0, 3, 1, 2)
    for dtype in DTYPES:
        torch.library.opcheck(ops.preprocess.default, (images, [0.4, 0.5, 0.6], [0.2, 0.3, 0.4], [1, 0, 2, 3], dtype))


def test_fallback_without_the_extension_warns_with_the_reason(monkeypatch):
    monkeypatch.setattr(preprocess_module, "implementation", lambda device: ("torch", "the test says so"))
    monkeypatch.setattr(preprocess_module, "_warned_devices", set())
    images = random_images((1, 6, 5, 3))
    with pytest.warns(UserWarning, match="pure-PyTorch path: the test says so"):
        actual = bagnet_fast.preprocess(images, pad=2, dtype=torch.float16)
    assert_matches_textbook(actual, textbook(images.permute(0, 3, 1, 2), pad=(2, 2, 2, 2)), torch.float16)


def test_cuda_kernel_is_registered_when_the_cuda_part_is_built():
    if not _extension.with_cuda():
        pytest.skip("bagnet_fast._C was built without its CUDA sources")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("bagnet_fast::preprocess", "CUDA")
    assert preprocess_module.implementation("cuda")[0] == "extension"


def test_implementation_report():
    which, reason = preprocess_module.implementation("cpu")
    assert (which == "extension") == _extension.loaded(), reason
    which, reason = preprocess_module.implementation("meta")
    assert which == "torch" and "meta" in reason


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad", PADS)
def test_cuda_op_matches_textbook(dtype, pad):
    for shape, layout in (((3, 31, 37, 3), "NHWC"), ((2, 3, 224, 225), "NCHW"), ((1, 1, 1, 3), "NHWC")):
        images = random_images(shape, seed=7)
        nchw = images.permute(0, 3, 1, 2) if layout == "NHWC" else images
        actual = bagnet_fast.preprocess(images.cuda(), dtype=dtype, pad=pad, layout=layout)
        assert actual.device.type == "cuda"
        assert_matches_textbook(actual, textbook(nchw, pad=pad), dtype)
    strided = random_images((2, 3, 40, 50), seed=8).cuda()[:, :, 3:30:2, 1:45:3]
    assert_matches_textbook(bagnet_fast.preprocess(strided, dtype=dtype, pad=pad), textbook(strided.cpu(), pad=pad), dtype)


@needs_cuda
def test_cuda_opcheck_and_errors():
    images = random_images((2, 5, 6, 3)).cuda().permute(0, 3, 1, 2)
    torch.library.opcheck(ops.preprocess.default, (images, [0.4, 0.5, 0.6], [0.2, 0.3, 0.4], [1, 0, 2, 3], torch.bfloat16))
    with pytest.raises(RuntimeError, match="images must be uint8"):
        ops.preprocess(images.float(), [0.5] * 3, [0.5] * 3, [0] * 4, torch.float32)
