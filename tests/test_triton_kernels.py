"""What is Triton-specific: the launchers' paths (fused or split bottleneck, weights read through
strides), the tiles and their fitting, the ops' registration and the device guard; run by the
Triton CPU interpreter (no GPU needed). The ops against their oracle: tests/test_ops.py.

float32 only: the interpreter has no bf16 dot (it multiplies raw bits) and ignores
input_precision. Shapes are small but ragged (the interpreter's 32×32×32 tile never divides the
pixel or channel counts) and use real BagNet widths where affordable; the whole file runs in
about a minute on two cores. With TRITON_INTERPRET=0 on a GPU machine the same tests run on CUDA
(benchmarks/gpu_check.sh does); tests/test_gpu_models.py adds bf16/fp16 and every GPU tile.
"""

from __future__ import annotations

import contextlib
import os

# Must be set before triton is first imported, or kernels would need a GPU to launch.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from bagnet_fast.ops import reference  # noqa: E402
from bagnet_fast.ops import triton_ops, triton_tuning  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bagnet_fast.kernels.tiles import grouped_tile  # noqa: E402 - registered by triton_ops

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is not 1 and there is no GPU to run Triton kernels", allow_module_level=True)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cpu":
    from bagnet_fast.executors import available  # noqa: E402

    usable, why_not = available("triton", torch.device("cpu"), torch.float32)
    if not usable:
        pytest.skip(why_not, allow_module_level=True)
CL = torch.channels_last

from op_harness import assert_close, tolerance  # noqa: E402

def assert_close_rel(out: torch.Tensor, expected: torch.Tensor) -> None:
    """The harness's comparison at the float32 tolerance (tests/op_harness.py)."""
    assert out.dtype == expected.dtype, f"dtype {out.dtype} != reference {expected.dtype}"
    assert_close(out, expected, tolerance(torch.float32))


def randn_cl(*shape: int, scale: float = 1.0) -> torch.Tensor:
    """A (N, C, H, W) float32 tensor in channels-last memory."""
    return (torch.randn(*shape) * scale).to(device=DEVICE, memory_format=CL)


def conv_params(c_out: int, c_in: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # He-like scale keeps the outputs O(1) whatever the fan-in.
    weight = torch.randn(c_out, c_in, k, k) * (2.0 / (c_in * k * k)) ** 0.5
    return weight.to(DEVICE), (torch.randn(c_out) * 0.1).to(DEVICE)


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


# --------------------------------------------------------------------------- launch order


@triton.jit
def _launch_order(out_ptr, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """out[pid] = the (pixel tile, channel tile) of program pid."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), n_rows, n_cols, BLOCK_M, BLOCK_N, GROUP_M)
    tl.store(out_ptr + 2 * tl.program_id(0), pid_m)
    tl.store(out_ptr + 2 * tl.program_id(0) + 1, pid_n)


def test_grouped_launch_order_covers_every_tile_once():
    """tiles.grouped_tile maps the 1-D grid onto (pixel tile, channel tile) one to one, with a
    ragged last group and with a group longer than the row-tile count."""
    for n_rows, n_cols, group in ((170, 80, 2), (170, 80, 8), (16, 16, 2)):  # 11 x 5, 11 x 5, 1 x 1 tiles
        tiles_m, tiles_n = -(-n_rows // 16), -(-n_cols // 16)
        out = torch.full((tiles_m * tiles_n, 2), -1, dtype=torch.int32, device=DEVICE)
        _launch_order[(tiles_m * tiles_n,)](out, n_rows, n_cols, BLOCK_M=16, BLOCK_N=16, GROUP_M=group)
        pairs = [tuple(p) for p in out.cpu().tolist()]
        assert sorted(pairs) == [(m, n) for m in range(tiles_m) for n in range(tiles_n)], (n_rows, n_cols, group)
        if group < tiles_m:  # grouped: the first programs stay within the first group's row tiles
            assert {m for m, _ in pairs[: group * tiles_n]} == set(range(group))


# --------------------------------------------------------------------------- conv3 + downsample


def downsample_case(seed: int):
    """A first block's conv3 (P = 40 -> 80) and its downsample (48 -> 80) over the stride-2,
    cropped block input: ragged for the interpreter's 32-wide tiles."""
    torch.manual_seed(seed)
    t = randn_cl(2, 40, 5, 7)
    x = randn_cl(2, 48, 11, 15)
    xs = x[:, :, 0:9:2, 0:13:2]  # (2, 48, 5, 7): what backends.base.downsample_input gives
    w3, b3 = conv_params(80, 40, 1)
    wd, bd = conv_params(80, 48, 1)
    return t, w3, b3, xs, wd, bd


def test_conv_downsample_bias_act_is_conv3_plus_downsample():
    t, w3, b3, xs, wd, bd = downsample_case(12)
    out = triton_ops.conv_downsample_bias_act(t, w3, b3 + bd, xs, wd)
    residual = reference.conv_bias_act(xs, wd, bd, relu=False)
    assert out.is_contiguous(memory_format=CL)
    assert_close_rel(out, reference.conv_bias_act(t, w3, b3, residual=residual))


def test_conv_downsample_bias_act_keeps_nan():
    t, w3, b3, xs, wd, bd = downsample_case(13)
    xs = xs.clone()
    xs[1, 0, 2, 3] = float("nan")
    out = triton_ops.conv_downsample_bias_act(t, w3, b3 + bd, xs, wd)
    expected = reference.conv_bias_act(t, w3, b3, residual=reference.conv_bias_act(xs, wd, bd, relu=False))
    assert expected.isnan().any() and torch.equal(out.isnan(), expected.isnan())


def test_conv_downsample_bias_act_checks_shapes():
    t, w3, b3, xs, wd, bd = downsample_case(14)
    with pytest.raises(RuntimeError, match="must have the pixels of x"):
        triton_ops.conv_downsample_bias_act(t, w3, b3, xs[:, :, :4], wd)
    with pytest.raises(RuntimeError, match="bad downsample weight shape"):
        triton_ops.conv_downsample_bias_act(t, w3, b3, xs, wd[:, :40])


# --------------------------------------------------------------------------- pointwise_bottleneck


def bottleneck_params(channels: int, planes: int) -> list[torch.Tensor]:
    w1, b1 = conv_params(planes, channels, 1)
    w2, b2 = conv_params(planes, planes, 1)
    w3, b3 = conv_params(channels, planes, 1)
    return [w1, b1, w2, b2, w3 * 0.5, b3]


@pytest.mark.parametrize("channels,planes", [(80, 20), (512, 128)], ids=["forced", "stage2-fp32"])
def test_pointwise_bottleneck_split_path(channels, planes, monkeypatch):
    # Blocks wider than FUSED_MAX_PLANES run as three conv_bias_act GEMMs (BagNet stages 3-4, and
    # stage 2 in fp32); "forced" lowers the threshold to reach that path at a small width.
    if channels == 80:
        monkeypatch.setitem(triton_tuning.FUSED_MAX_PLANES, "fp32", 16)
    torch.manual_seed(8)
    x = randn_cl(2, channels, 3, 7)
    params = bottleneck_params(channels, planes)
    out = triton_ops.pointwise_bottleneck(x, *params)
    assert out.is_contiguous(memory_format=CL)
    assert_close_rel(out, reference.pointwise_bottleneck(x, *params))


def test_pointwise_bottleneck_fused_at_stage2_width(monkeypatch):
    # On GPUs bf16/fp16 fuse up to P = 128; the interpreter tests fp32, so lift fp32's limit to
    # run the fused kernel with P_PAD = 128 here.
    monkeypatch.setitem(triton_tuning.FUSED_MAX_PLANES, "fp32", 128)
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
    for table in (triton_tuning.CONV_TILES, triton_tuning.POINTWISE_TILES):
        for tiles in table.values():
            assert 1 <= len(tiles) <= 6, "a handful of candidates per op and dtype"
            for tile in tiles:
                triton_tuning.check_dot_tile(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
    with pytest.raises(AssertionError, match="power of two >= 16"):
        triton_tuning.check_dot_tile(BLOCK_K=8)


def test_tiles_fit_the_channel_counts():
    tiles = triton_tuning.fit(triton_tuning.CONV_TILES["16bit"], n=64, k=3)  # the stem: Cin = 3, Cout = 64
    assert all(t.block_n <= 64 and t.block_k == 16 for t in tiles)
    assert len(set(tiles)) == len(tiles)
    # The fused bottleneck keeps BLOCK_M · P_PAD <= 8192 (two fp32 intermediates in registers).
    tiles = triton_tuning.fit(triton_tuning.POINTWISE_TILES["16bit"], 512, 512, max_m=8192 // 128)
    assert tiles and all(t.block_m <= 64 for t in tiles)


def test_fp32_dots_are_exact_unless_another_mode_is_asked_for(monkeypatch):
    monkeypatch.delenv("BAGNET_FAST_TF32", raising=False)
    monkeypatch.delenv("BAGNET_FAST_FP32", raising=False)
    assert triton_tuning.input_precision(torch.float32) == "ieee"
    assert triton_tuning.dtype_class(torch.float32) == "fp32"
    monkeypatch.setenv("BAGNET_FAST_FP32", "tf32x3")
    assert triton_tuning.input_precision(torch.float32) == "tf32x3"
    assert triton_tuning.dtype_class(torch.float32) == "fp32_mma"  # tensor-core tiles
    assert triton_tuning.input_precision(torch.bfloat16) == "tf32"  # ignored for 16-bit inputs
    monkeypatch.setenv("BAGNET_FAST_TF32", "1")
    assert triton_tuning.input_precision(torch.float32) == "tf32"
    monkeypatch.delenv("BAGNET_FAST_TF32")
    monkeypatch.setenv("BAGNET_FAST_FP32", "tf32x2")
    with pytest.raises(ValueError, match="BAGNET_FAST_FP32='tf32x2': expected one of ieee, tf32x3"):
        triton_tuning.input_precision(torch.float32)


def test_the_fp32_mode_reaches_every_gemm_and_its_tuning_key(monkeypatch):
    """The interpreter ignores input_precision, so what can be checked here is that the mode is
    what every GEMM launch compiles with and tunes for (its numerics: the GPU check)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_compile_count

    plan = gpu_compile_count.meta_plan("bagnet17", torch.float32)
    monkeypatch.setenv("BAGNET_FAST_FP32", "tf32x3")
    launches = gpu_compile_count.forward_launches(plan, 2)
    gemms = [launch for launch in launches if launch.kernel != "_spatial_mean_kernel"]
    assert gemms and all(dict(launch.constexprs)["INPUT_PRECISION"] == "tf32x3" for launch in gemms)
    assert all("tf32x3" in launch.tuning_key for launch in gemms if launch.tuning_key)
    # Fitting changes BLOCK_N/BLOCK_K only: the rows, warps and stages name the table used.
    used = {(t.block_m, t.num_warps, t.num_stages) for launch in gemms for t in launch.tiles}
    table = {(t.block_m, t.num_warps, t.num_stages)
             for tiles in (triton_tuning.CONV_TILES, triton_tuning.POINTWISE_TILES) for t in tiles["fp32_mma"]}
    assert used <= table, used - table


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


def test_ops_make_the_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device: every op enters its input's device itself, so
    a direct call on cuda:1 while cuda:0 is current works (run with two GPUs in
    test_gpu_models.py)."""

    class OnSecondGpu:
        is_cuda = True
        device = torch.device("cuda", 1)

    entered = []
    guard = contextlib.nullcontext()
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or guard)
    assert triton_ops._on_device_of(OnSecondGpu()) is guard and entered == [torch.device("cuda", 1)]
    with triton_ops._on_device_of(torch.zeros(1)):  # nothing to do for CPU tensors
        pass
    assert entered == [torch.device("cuda", 1)]
    calls = []
    guarded = triton_ops._guarded(lambda x, y: calls.append((x, y)) or "done")
    assert guarded(OnSecondGpu(), 2) == "done" and len(entered) == 2 and len(calls) == 1
