"""The compiled operators (torch.ops.bagnet_fast) against their pure-PyTorch references."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from bagnet_fast import _extension
from bagnet_fast.ops import reference as ref
from conftest import rel_err

ops = torch.ops.bagnet_fast


def test_extension_was_built():
    """The test suite fails when the build should have produced the extension and did not."""
    assert _extension.loaded(), f"bagnet_fast._C is missing: {_extension.load_error()}"


def test_extension_has_cuda_part_when_buildable():
    wanted = os.environ.get("BAGNET_FAST_CUDA", "auto") not in ("0", "false", "no", "off")
    buildable = torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or os.path.isfile("/usr/local/cuda/bin/nvcc")
    )
    if not (wanted and buildable):
        pytest.skip("no CUDA toolkit or a CPU-only torch: the CUDA part is not built")
    assert _extension.with_cuda(), "torch is a CUDA build and nvcc exists, but _C has no CUDA part"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("bagnet_fast::pointwise_bottleneck", "CUDA")


def _bottleneck_args(batch, channels, planes, height, width, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x = rand(batch, channels, height, width).contiguous(memory_format=torch.channels_last)
    return (
        x,
        rand(planes, channels, 1, 1, scale=channels**-0.5), rand(planes, scale=0.1),
        rand(planes, planes, 1, 1, scale=planes**-0.5), rand(planes, scale=0.1),
        rand(channels, planes, 1, 1, scale=planes**-0.5), rand(channels, scale=0.1),
    )


# Ragged shapes: pixel counts no tile size divides, batch 1 and > 1, real BagNet widths.
BOTTLENECK_SHAPES = [(1, 256, 64, 7, 5), (3, 256, 64, 11, 13), (2, 512, 128, 3, 9), (1, 2048, 512, 2, 3)]


@pytest.mark.parametrize("shape", BOTTLENECK_SHAPES)
def test_pointwise_bottleneck_matches_reference(shape):
    args = _bottleneck_args(*shape)
    expected = ref.pointwise_bottleneck(*args)
    actual = ops.pointwise_bottleneck(*args)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(actual, expected) <= 1e-5
    x = args[0].clone()
    ops.pointwise_bottleneck_(x, *args[1:])
    assert rel_err(x, expected) <= 1e-5


def test_pointwise_bottleneck_float64_fallback():
    args = _bottleneck_args(2, 64, 16, 5, 3, dtype=torch.float64)
    assert rel_err(ops.pointwise_bottleneck(*args), ref.pointwise_bottleneck(*args)) <= 1e-12


def test_pointwise_bottleneck_with_prepacked_weights():
    args = list(_bottleneck_args(2, 256, 64, 6, 7))
    expected = ref.pointwise_bottleneck(*args)
    for i in (1, 3, 5):
        args[i] = torch.ops.mkldnn._reorder_convolution_weight(args[i], [0, 0], [1, 1], [1, 1], 1, None)
    assert rel_err(ops.pointwise_bottleneck(*args), expected) <= 1e-5


def test_pointwise_bottleneck_bad_input():
    x, w1, b1, w2, b2, w3, b3 = _bottleneck_args(1, 64, 16, 4, 4)
    with pytest.raises(RuntimeError, match="w1 must have shape"):
        ops.pointwise_bottleneck(x, w1[:, :10], b1, w2, b2, w3, b3)
    with pytest.raises(RuntimeError, match="bias of w2"):
        ops.pointwise_bottleneck(x, w1, b1, w2, b2[:3], w3, b3)
    with pytest.raises(RuntimeError, match="4-D"):
        ops.pointwise_bottleneck(x[0], w1, b1, w2, b2, w3, b3)
    with pytest.raises(RuntimeError, match="dtype of x"):
        ops.pointwise_bottleneck(x, w1.double(), b1, w2, b2, w3, b3)
    with pytest.raises(RuntimeError, match="channels-last"):
        ops.pointwise_bottleneck_(x.contiguous(), w1, b1, w2, b2, w3, b3)


@pytest.mark.parametrize("crop", [(0, 0), (1, 2), (5, 3)])
@pytest.mark.parametrize("relu", [True, False])
def test_bias_residual_act_matches_reference(crop, relu):
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 24, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(24, generator=g)
    residual = torch.randn(2, 24, 5 + crop[0], 7 + crop[1], generator=g)
    expected = y + bias.view(1, -1, 1, 1) + residual[:, :, :5, :7]
    expected = expected.relu() if relu else expected
    assert rel_err(ops.bias_residual_act(y, bias, residual, relu), expected) <= 1e-6
    no_residual = y + bias.view(1, -1, 1, 1)
    assert rel_err(ops.bias_residual_act(y, bias, None, relu), no_residual.relu() if relu else no_residual) <= 1e-6


def test_bias_residual_act_bad_input():
    y = torch.randn(1, 4, 3, 3)
    with pytest.raises(RuntimeError, match="cannot be cropped"):
        ops.bias_residual_act(y, torch.zeros(4), torch.randn(1, 4, 2, 3), True)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.bias_residual_act(y, torch.zeros(5), None, True)
    with pytest.raises(RuntimeError, match="bias must have the dtype of y"):
        ops.bias_residual_act(y, torch.zeros(4, dtype=torch.float64), None, True)
    with pytest.raises(RuntimeError, match="residual must have the dtype of y"):
        ops.bias_residual_act(y, torch.zeros(4), torch.randn(1, 4, 3, 3).half(), True)
    with pytest.raises(RuntimeError, match="residual must be 4-D"):
        ops.bias_residual_act(y, torch.zeros(4), torch.randn(4, 3, 3), True)


@pytest.mark.parametrize("shape", [(1, 2048, 1, 1), (3, 2048, 4, 5), (2, 64, 7, 3)])
def test_spatial_mean_linear_matches_reference(shape):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(11, shape[1], generator=g), torch.randn(11, generator=g)
    assert rel_err(ops.spatial_mean_linear(x, weight, bias), ref.spatial_mean_linear(x, weight, bias)) <= 1e-5
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops.spatial_mean_linear(x, weight[:, :-1], bias)


def test_bias_residual_act_reads_cropped_channels_last_views():
    """The residual as the plan passes it: a top-left crop view of a channels-last map."""
    g = torch.Generator().manual_seed(3)
    y = torch.randn(2, 16, 4, 5, generator=g).contiguous(memory_format=torch.channels_last)
    full = torch.randn(2, 16, 7, 9, generator=g).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(16, generator=g)
    expected = (y + bias.view(1, -1, 1, 1) + full[:, :, :4, :5]).relu()
    assert rel_err(ops.bias_residual_act(y, bias, full[:, :, :4, :5], True), expected) <= 1e-6
    assert rel_err(ops.bias_residual_act(y, bias, full, True), expected) <= 1e-6


def _stem_args(batch, height, width, c_out=64, dtype=torch.float32, layout="channels_last", seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, height, width + (3 if layout == "sliced" else 0), generator=g).to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # a strided view: a crop of a wider image
        x = x[..., 2 : 2 + width]
    weight = (torch.randn(c_out, 3, 3, 3, generator=g) * 27**-0.5).to(device, dtype)
    bias = (torch.randn(c_out, generator=g) * 0.1).to(device, dtype)
    return x, weight.contiguous(memory_format=torch.channels_last), bias


def _stem_reference(x, weight, bias):
    return torch.nn.functional.conv2d(x.double(), weight.double(), bias.double()).relu()


# 3x3 images give a 1x1 output; the others are ragged. Cout = 64 is BagNet's, 8 the smallest.
@pytest.mark.parametrize("batch,height,width,c_out", [(1, 3, 3, 64), (2, 9, 11, 64), (3, 17, 5, 8)])
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
def test_stem_conv_bias_relu_matches_reference(batch, height, width, c_out, layout):
    args = _stem_args(batch, height, width, c_out, layout=layout)
    assert (layout == "sliced") != args[0].is_contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    actual = ops.stem_conv_bias_relu(*args)
    assert actual.shape == (batch, c_out, height - 2, width - 2)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(actual, _stem_reference(*args)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stem_conv_bias_relu_rounds_once_in_16_bit(dtype):
    # fp32 accumulation and one rounding: within one rounding of the exact result (eps / 2 of the
    # largest value; eps leaves room for a different fp32 summation order flipping one).
    args = _stem_args(2, 8, 10, dtype=dtype)
    actual = ops.stem_conv_bias_relu(*args)
    assert actual.dtype == dtype
    assert rel_err(actual, _stem_reference(*args)) <= torch.finfo(dtype).eps


def test_stem_conv_bias_relu_bad_input():
    x, w, b = _stem_args(1, 5, 5)
    cases = [
        ((x[:, :2], w, b), "x must be \\(N, 3, H, W\\)"),
        ((x[..., :2, :], w, b), "at least 3x3 pixels"),
        ((x, w[:, :, :1, :1], b), "weight must be \\(Cout, 3, 3, 3\\)"),
        ((x, w[:60], b[:60]), "multiple of 8"),
        ((x, w, b[:8]), "bias must have shape"),
        ((x, w.double(), b), "dtype and device of x"),
        ((x.double(), w.double(), b.double()), "supports float32, float16 and bfloat16"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.stem_conv_bias_relu(*args)


def test_opcheck():
    """Schemas, fake kernels and dispatcher registrations are consistent (torch.library.opcheck)."""
    bottleneck = _bottleneck_args(2, 64, 16, 5, 3)
    y = torch.randn(2, 8, 3, 4).contiguous(memory_format=torch.channels_last)
    cases = [
        (ops.pointwise_bottleneck.default, bottleneck),
        (ops.pointwise_bottleneck_.default, (bottleneck[0].clone(),) + bottleneck[1:]),
        (ops.bias_residual_act.default, (y, torch.randn(8), torch.randn(2, 8, 4, 6), True)),
        (ops.bias_residual_act.default, (y, torch.randn(8), None, False)),
        (ops.spatial_mean_linear.default, (y, torch.randn(5, 8), torch.randn(5))),
        (ops.stem_conv_bias_relu.default, _stem_args(2, 6, 7, c_out=16)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (run benchmarks/gpu_check.sh)")


def _low_precision_tolerance(dtype, torch_error):
    """DESIGN.md: fp32 within 1e-5 relative; fp16/bf16 within twice PyTorch's own error in that
    dtype (both measured against a float64 reference)."""
    return 1e-5 if dtype == torch.float32 else 2 * torch_error


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# Channel counts with and without the 16-byte vector path (C % (16 / itemsize) == 0).
@pytest.mark.parametrize("channels", [64, 2048, 3, 12])
@pytest.mark.parametrize("crop", [(0, 0), (1, 2), (5, 3)])
def test_cuda_bias_residual_act(dtype, channels, crop):
    g = torch.Generator().manual_seed(4)
    y = torch.randn(3, channels, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(channels, generator=g)
    full = torch.randn(3, channels, 5 + crop[0], 7 + crop[1], generator=g).contiguous(memory_format=torch.channels_last)
    y, bias, full = y.to(dtype).cuda(), bias.to(dtype).cuda(), full.to(dtype).cuda()
    for residual in (full, full[:, :, :5, :7], full.contiguous(), None):
        actual = ops.bias_residual_act(y, bias, residual, True)
        assert actual.is_contiguous(memory_format=torch.channels_last)
        # The kernel computes (y + bias) + residual in fp32 and rounds once: bit-identical to
        # PyTorch doing the same in fp32 from the same inputs.
        expected = y.float() + bias.float().view(1, -1, 1, 1)
        if residual is not None:
            expected = expected + residual.float()[:, :, :5, :7]
        assert torch.equal(actual, expected.relu().to(dtype))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", BOTTLENECK_SHAPES)
def test_cuda_pointwise_bottleneck(dtype, shape):
    args = [a.cuda() for a in _bottleneck_args(*shape)]
    expected = ref.pointwise_bottleneck(*[a.double() for a in args])
    low = [a.to(dtype) for a in args]
    low[0] = low[0].contiguous(memory_format=torch.channels_last)
    tolerance = _low_precision_tolerance(dtype, rel_err(ref.pointwise_bottleneck(*low), expected))
    assert rel_err(ops.pointwise_bottleneck(*low), expected) <= tolerance
    x = low[0].clone()
    ops.pointwise_bottleneck_(x, *low[1:])
    assert rel_err(x, expected) <= tolerance


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_spatial_mean_linear(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2048, 5, 7, generator=g).contiguous(memory_format=torch.channels_last).cuda()
    w, b = torch.randn(10, 2048, generator=g).cuda(), torch.randn(10, generator=g).cuda()
    expected = ref.spatial_mean_linear(x.double(), w.double(), b.double())
    low = [t.to(dtype) for t in (x, w, b)]
    tolerance = _low_precision_tolerance(dtype, rel_err(ref.spatial_mean_linear(*low), expected))
    assert rel_err(ops.spatial_mean_linear(*low), expected) <= tolerance


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
@pytest.mark.parametrize("batch,height,width,c_out", [(1, 3, 3, 64), (3, 37, 29, 64), (2, 224, 224, 64), (1, 9, 7, 8)])
def test_cuda_stem_conv_bias_relu(dtype, layout, batch, height, width, c_out):
    x, w, b = _stem_args(batch, height, width, c_out, dtype=dtype, layout=layout, device="cuda")
    assert (layout == "sliced") != x.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    actual = ops.stem_conv_bias_relu(x, w, b)
    assert actual.is_contiguous(memory_format=torch.channels_last) and actual.dtype == dtype
    # As on the CPU: fp32 within 1e-6, 16-bit within one rounding of the exact result.
    bound = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert rel_err(actual, _stem_reference(x, w, b)) <= bound
    torch.library.opcheck(ops.stem_conv_bias_relu.default, (x, w, b))


@needs_cuda
def test_cuda_opcheck_and_bad_input():
    bottleneck = [a.cuda() for a in _bottleneck_args(2, 64, 16, 5, 3)]
    y = torch.randn(2, 8, 3, 4, device="cuda").contiguous(memory_format=torch.channels_last)
    cases = [
        (ops.pointwise_bottleneck.default, bottleneck),
        (ops.pointwise_bottleneck_.default, [bottleneck[0].clone()] + bottleneck[1:]),
        (ops.bias_residual_act.default, (y, torch.randn(8, device="cuda"), torch.randn(2, 8, 4, 6, device="cuda"), True)),
        (ops.spatial_mean_linear.default, (y, torch.randn(5, 8, device="cuda"), torch.randn(5, device="cuda"))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ops.bias_residual_act(y, torch.zeros(8, device="cuda"), torch.randn(2, 8, 3, 4), True)
    with pytest.raises(RuntimeError, match="support float32, float16 and bfloat16"):
        ops.bias_residual_act(y.double(), torch.zeros(8, device="cuda", dtype=torch.float64), None, True)
    with pytest.raises(RuntimeError, match="w1 must have shape"):
        ops.pointwise_bottleneck(bottleneck[0], bottleneck[1][:, :10], *bottleneck[2:])
    with pytest.raises(RuntimeError, match="channels-last"):
        ops.pointwise_bottleneck_(bottleneck[0].contiguous(), *bottleneck[1:])
