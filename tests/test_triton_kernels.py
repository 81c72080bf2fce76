"""Triton kernels vs the pure-PyTorch reference, run by the Triton CPU interpreter (no GPU needed).

float32 only: the interpreter has no bf16 dot (it multiplies raw bits) and ignores
input_precision. Shapes are small but ragged (the interpreter's 32×32×32 tile never divides the
pixel or channel counts) and use real BagNet widths where affordable; the whole file runs in
about a minute on two cores. With TRITON_INTERPRET=0 on a GPU machine the same tests run on CUDA
(benchmarks/gpu_check.sh does); tests/test_gpu_models.py adds bf16/fp16 and every GPU tile.
"""

from __future__ import annotations

import os

# Must be set before triton is first imported, or kernels would need a GPU to launch.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from bagnet_fast.ops import reference  # noqa: E402
from bagnet_fast.ops import triton_ops  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is not 1 and there is no GPU to run Triton kernels", allow_module_level=True)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cpu":
    from bagnet_fast.executors import available  # noqa: E402

    usable, why_not = available("triton", torch.device("cpu"), torch.float32)
    if not usable:
        pytest.skip(why_not, allow_module_level=True)
CL = torch.channels_last

# max |out - ref| / max |ref| in float32. The kernels only reorder fp32 sums (~1e-7 observed);
# 1e-4 is the brief's bound and also catches any tf32 leak (~1e-3).
FP32_REL_TOL = 1e-4


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float = FP32_REL_TOL) -> None:
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"dtype {out.dtype} != reference {ref.dtype}"
    diff = (out.float() - ref.float()).abs()
    scale = ref.float().abs().max().clamp_min(1e-30)
    rel = (diff.max() / scale).item()
    if not rel <= tol:
        first = tuple(int(i) for i in (diff > tol * scale).nonzero()[0])
        raise AssertionError(
            f"relative error {rel:.3e} > {tol:.0e}; first mismatch at {first}: "
            f"out={out[first].item():.6g} ref={ref[first].item():.6g}"
        )


def randn_cl(*shape: int, scale: float = 1.0) -> torch.Tensor:
    """A (N, C, H, W) float32 tensor in channels-last memory."""
    return (torch.randn(*shape) * scale).to(device=DEVICE, memory_format=CL)


def conv_params(c_out: int, c_in: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # He-like scale keeps the outputs O(1) whatever the fan-in.
    weight = torch.randn(c_out, c_in, k, k) * (2.0 / (c_in * k * k)) ** 0.5
    return weight.to(DEVICE), (torch.randn(c_out) * 0.1).to(DEVICE)


# --------------------------------------------------------------------------- conv_bias_act

# (Cin, Cout): ragged (48 -> 40), the 3-channel stem, and real BagNet widths.
CONV_CHANNELS = [(48, 40), (3, 64), (64, 64), (256, 64)]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("channels", CONV_CHANNELS, ids=lambda c: f"{c[0]}to{c[1]}")
def test_conv_bias_act(channels, k, stride, batch):
    torch.manual_seed(0)
    c_in, c_out = channels
    x = randn_cl(batch, c_in, 9, 10)  # 3x3/s1 -> 7x8 = 56 pixels per image, s2 -> 4x4
    weight, bias = conv_params(c_out, c_in, k)
    out = triton_ops.conv_bias_act(x, weight, bias, stride=stride)
    assert out.is_contiguous(memory_format=CL)
    assert_close_rel(out, reference.conv_bias_act(x, weight, bias, stride=stride))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("crop", [False, True], ids=["exact", "cropped"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_conv_bias_act_residual(batch, k, stride, crop, relu):
    torch.manual_seed(1)
    c_in, c_out = 48, 40
    x = randn_cl(batch, c_in, 11, 9)
    weight, bias = conv_params(c_out, c_in, k)
    h_out, w_out = (11 - k) // stride + 1, (9 - k) // stride + 1
    extra = (2, 3) if crop else (0, 0)  # BagNet crops the identity path top-left
    residual = randn_cl(batch, c_out, h_out + extra[0], w_out + extra[1])
    out = triton_ops.conv_bias_act(x, weight, bias, stride=stride, relu=relu, residual=residual)
    ref = reference.conv_bias_act(x, weight, bias, stride=stride, relu=relu, residual=residual)
    assert_close_rel(out, ref)


def test_conv_bias_act_contiguous_nchw_input():
    # The kernel reads through strides: plain NCHW input must give the same values.
    torch.manual_seed(2)
    x = torch.randn(2, 48, 8, 9, device=DEVICE)
    weight, bias = conv_params(40, 48, 3)
    assert_close_rel(triton_ops.conv_bias_act(x, weight, bias), reference.conv_bias_act(x, weight, bias))


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed_1x1"])
def test_conv_bias_act_reads_weights_through_strides(layout, monkeypatch):
    # The plan's channels-last weights are read in place (no per-call repacking: the kernel takes
    # all four weight strides); any other layout gives the same values.
    torch.manual_seed(11)
    x = randn_cl(2, 48, 7, 9)
    k = 1 if layout == "transposed_1x1" else 3
    weight, bias = conv_params(40, 96 if layout == "sliced" else 48, k)
    if layout == "channels_last":
        weight = weight.contiguous(memory_format=CL)
        copies = []
        contiguous = torch.Tensor.contiguous

        def spy(t, *args, **kwargs):
            if t.shape == weight.shape:
                copies.append(t)
            return contiguous(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    elif layout == "sliced":
        weight = weight[:, ::2]  # every other input channel: Cin stride 18
    else:
        weight = weight.transpose(0, 1).contiguous().transpose(0, 1)  # (Cout, Cin, 1, 1), Cout fastest
    out = triton_ops.conv_bias_act(x, weight, bias)
    if layout == "channels_last":
        monkeypatch.undo()
        assert not copies, "channels-last weights must not be copied"
    assert_close_rel(out, reference.conv_bias_act(x, weight, bias))


# --------------------------------------------------------------------------- pointwise_bottleneck


def bottleneck_params(channels: int, planes: int) -> list[torch.Tensor]:
    w1, b1 = conv_params(planes, channels, 1)
    w2, b2 = conv_params(planes, planes, 1)
    w3, b3 = conv_params(channels, planes, 1)
    return [w1, b1, w2, b2, w3 * 0.5, b3]


# (C, P): ragged (48 = 4·12, P padded to 16 on chip), and BagNet stage-1 widths (256 = 4·64).
@pytest.mark.parametrize("channels,planes", [(48, 12), (64, 16), (80, 20), (256, 64)])
@pytest.mark.parametrize("batch,height,width", [(1, 1, 37), (2, 5, 7)])
def test_pointwise_bottleneck(channels, planes, batch, height, width):
    torch.manual_seed(3)
    x = randn_cl(batch, channels, height, width)
    params = bottleneck_params(channels, planes)
    out = triton_ops.pointwise_bottleneck(x, *params)
    assert out.is_contiguous(memory_format=CL)
    assert_close_rel(out, reference.pointwise_bottleneck(x, *params))


@pytest.mark.parametrize("channels,planes", [(80, 20), (512, 128)], ids=["forced", "stage2-fp32"])
def test_pointwise_bottleneck_split_path(channels, planes, monkeypatch):
    # Blocks wider than FUSED_MAX_PLANES run as three conv_bias_act GEMMs (BagNet stages 3-4, and
    # stage 2 in fp32); "forced" lowers the threshold to reach that path at a small width.
    if channels == 80:
        monkeypatch.setitem(triton_ops.FUSED_MAX_PLANES, "fp32", 16)
    torch.manual_seed(8)
    x = randn_cl(2, channels, 3, 7)
    params = bottleneck_params(channels, planes)
    out = triton_ops.pointwise_bottleneck(x, *params)
    assert out.is_contiguous(memory_format=CL)
    assert_close_rel(out, reference.pointwise_bottleneck(x, *params))


def test_pointwise_bottleneck_fused_at_stage2_width(monkeypatch):
    # On GPUs bf16/fp16 fuse up to P = 128; the interpreter tests fp32, so lift fp32's limit to
    # run the fused kernel with P_PAD = 128 here.
    monkeypatch.setitem(triton_ops.FUSED_MAX_PLANES, "fp32", 128)
    torch.manual_seed(10)
    x = randn_cl(1, 512, 5, 9)
    params = bottleneck_params(512, 128)
    assert_close_rel(triton_ops.pointwise_bottleneck(x, *params), reference.pointwise_bottleneck(x, *params))


def test_pointwise_bottleneck_reads_weights_through_strides():
    # The launcher passes the conv weights uncopied: a non-contiguous W2 must give the same values.
    torch.manual_seed(9)
    x = randn_cl(1, 64, 3, 11)
    params = bottleneck_params(64, 16)
    params[2] = params[2].transpose(0, 1).contiguous().transpose(0, 1)  # (P, P, 1, 1), column-major
    assert not params[2].is_contiguous()
    assert_close_rel(triton_ops.pointwise_bottleneck(x, *params), reference.pointwise_bottleneck(x, *params))


# --------------------------------------------------------------------------- tiles


def test_every_gpu_tile_is_a_valid_dot_tile():
    # The GPU candidates never run here: check their shapes without a GPU.
    for table in (triton_ops.CONV_TILES, triton_ops.POINTWISE_TILES):
        for tiles in table.values():
            assert 1 <= len(tiles) <= 6, "a handful of candidates per op and dtype"
            for tile in tiles:
                triton_ops._check_dot_tile(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
    with pytest.raises(AssertionError, match="power of two >= 16"):
        triton_ops._check_dot_tile(BLOCK_K=8)


def test_tiles_fit_the_channel_counts():
    tiles = triton_ops._fit(triton_ops.CONV_TILES["16bit"], n=64, k=3)  # the stem: Cin = 3, Cout = 64
    assert all(t.block_n <= 64 and t.block_k == 16 for t in tiles)
    assert len(set(tiles)) == len(tiles)
    # The fused bottleneck keeps BLOCK_M · P_PAD <= 8192 (two fp32 intermediates in registers).
    tiles = triton_ops._fit(triton_ops.POINTWISE_TILES["16bit"], 512, 512, max_m=8192 // 128)
    assert tiles and all(t.block_m <= 64 for t in tiles)


def test_fp32_dots_are_exact_unless_tf32_is_asked_for(monkeypatch):
    monkeypatch.delenv("BAGNET_FAST_TF32", raising=False)
    assert triton_ops._input_precision(torch.float32) == "ieee"
    monkeypatch.setenv("BAGNET_FAST_TF32", "1")
    assert triton_ops._input_precision(torch.float32) == "tf32"


# --------------------------------------------------------------------------- head


@pytest.mark.parametrize("channels,n_classes", [(48, 10), (256, 1000)])
@pytest.mark.parametrize("batch,height,width", [(1, 1, 37), (2, 6, 7)])
def test_spatial_mean_linear(channels, n_classes, batch, height, width):
    torch.manual_seed(4)
    x = randn_cl(batch, channels, height, width).abs()  # post-ReLU features
    weight, bias = (t.to(DEVICE) for t in (torch.randn(n_classes, channels) * 0.05, torch.randn(n_classes)))
    assert_close_rel(triton_ops.spatial_mean_linear(x, weight, bias), reference.spatial_mean_linear(x, weight, bias))


@pytest.mark.parametrize(
    "classes",
    [None, [3, 7], list(range(5, 100, 5)), [999, 0, 0]],
    ids=["all", "two", "nineteen", "reordered-duplicate"],
)
@pytest.mark.parametrize("batch,height,width", [(1, 1, 37), (2, 5, 3)])
def test_patch_logits(classes, batch, height, width):
    torch.manual_seed(5)
    channels, n_classes = 48, 1000
    x = randn_cl(batch, channels, height, width).abs()
    weight, bias = (t.to(DEVICE) for t in (torch.randn(n_classes, channels) * 0.05, torch.randn(n_classes)))
    out = triton_ops.patch_logits(x, weight, bias, classes)
    assert_close_rel(out, reference.patch_logits(x, weight, bias, classes))


def test_patch_logits_real_width():
    torch.manual_seed(6)
    x = randn_cl(1, 256, 3, 5).abs()
    weight, bias = torch.randn(40, 256, device=DEVICE) * 0.05, torch.randn(40, device=DEVICE)
    assert_close_rel(triton_ops.patch_logits(x, weight, bias), reference.patch_logits(x, weight, bias))


# --------------------------------------------------------------------------- registration


def test_ops_are_registered():
    for name in ("conv_bias_act", "pointwise_bottleneck", "spatial_mean_linear", "patch_logits"):
        assert hasattr(torch.ops.bagnet_fast, f"triton_{name}"), name


@pytest.mark.parametrize("check", ["test_schema", "test_faketensor"])
def test_conv_bias_act_opcheck(check):
    if check == "test_faketensor" and DEVICE == "cpu":
        # Under FakeTensorMode the interpreter still launches the kernel (triton's
        # InterpretedFunction is not traced away like a JITFunction) and reads the fake
        # tensors' data pointers; the fake path can only be checked on a GPU.
        pytest.skip("triton_op fake-tensor tracing does not work with TRITON_INTERPRET=1")
    torch.manual_seed(7)
    x = randn_cl(1, 16, 5, 6)
    weight, bias = conv_params(16, 16, 3)
    residual = randn_cl(1, 16, 4, 5)
    torch.library.opcheck(
        torch.ops.bagnet_fast.triton_conv_bias_act.default,
        (x, weight, bias, 1, True, residual),
        test_utils=(check,),
    )


@pytest.mark.parametrize("batch, height, width", [(1, 5, 7), (3, 4, 5), (2, 13, 11)])
def test_pointwise_bottleneck_mean_never_writes_the_map(batch, height, width):
    """The last block + the head's mean: wide blocks add into the means in the last GEMM's
    epilogue; tiles that span several images (4x5 pixels per image) are summed per image."""
    torch.manual_seed(batch * 100 + height)
    channels, planes = 96, 80  # padded to 128 planes: wider than the fp32 fused kernel's 64
    x = torch.randn(batch, channels, height, width, device=DEVICE).contiguous(memory_format=CL)
    w1, w2, w3 = (torch.randn(o, i, 1, 1, device=DEVICE) / i**0.5 for o, i in
                  ((planes, channels), (planes, planes), (channels, planes)))
    b1, b2, b3 = (torch.randn(n, device=DEVICE) * 0.1 for n in (planes, planes, channels))
    expected = reference.pointwise_bottleneck(x, w1, b1, w2, b2, w3, b3).mean(dim=(2, 3))
    actual = triton_ops.pointwise_bottleneck_mean(x, w1, b1, w2, b2, w3, b3)
    assert_close_rel(actual, expected)
