"""Every operator against its float64 oracle, through one harness (tests/op_harness.py).

Each op is one class: its cases (ragged shapes, layouts), the implementations that have it, and
its arguments; the shared tests run every case on every implementation present (C++ CPU; CUDA
on a GPU; Triton on a GPU or in the interpreter) in every dtype that implementation supports,
with the tolerance of that dtype. NaN must come out where the oracle's does; the schemas and
fake kernels pass torch.library.opcheck; bad arguments give the same message on CPU and CUDA.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional, Sequence

import pytest
import torch

from bagnet_fast import _extension
from bagnet_fast.ops import reference as ref
from op_harness import IMPLEMENTATIONS, INTERPRETING, LOW_PRECISION, assert_close, relative_error, tolerance

ops = torch.ops.bagnet_fast
CL = torch.channels_last


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


# --------------------------------------------------------------------------- the harness


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _image(g, shape, layout: str = "channels_last") -> torch.Tensor:
    """(N, C, H, W) float64 in ``layout``: channels_last, nchw, or sliced (a strided crop)."""
    n, c, h, w = shape
    if layout == "sliced":
        return _randn(g, n, c, h, w + 3)[..., 2 : 2 + w]
    x = _randn(g, n, c, h, w)
    return x.contiguous(memory_format=CL) if layout == "channels_last" else x


class OpTester:
    """The cases of one op. Subclasses set ``op``, ``implementations``, ``cases`` and write
    ``arguments``; the tests below run on every (implementation, dtype, case)."""

    op: str
    implementations: Sequence[str] = ("cpu", "cuda")
    cases: Sequence[object] = ()
    interpreter_cases: Optional[Sequence[object]] = None  # the Triton interpreter is slow
    tight_fp32: Optional[float] = None  # ops without reductions state a tighter fp32 bound
    nan_exact: Sequence[str] = ("cpu", "cuda", "triton")  # implementations whose ReLU keeps NaN

    def arguments(self, case, g) -> tuple:
        """The op's arguments for ``case`` in float64 on the CPU (converted per implementation)."""
        raise NotImplementedError

    def oracle(self, *args):
        return getattr(ref, self.op)(*args)

    def call(self, impl: str, *args):
        return IMPLEMENTATIONS[impl].function(self.op)(*args)

    def cases_for(self, impl: str):
        return self.interpreter_cases if impl == "triton" and INTERPRETING and self.interpreter_cases else self.cases

    # --- shared tests -------------------------------------------------------------------

    def _skip(self, impl: str, dtype: torch.dtype) -> None:
        reason = IMPLEMENTATIONS[impl].skip_reason(self.op, dtype)
        if reason:
            pytest.skip(reason)

    def _convert(self, args, impl: str, dtype: torch.dtype):
        device = IMPLEMENTATIONS[impl].device

        def convert(a):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                return a.to(device=device, dtype=dtype)  # keeps strides (layouts under test)
            return a.to(device) if isinstance(a, torch.Tensor) else a

        return tuple(convert(a) for a in args)

    def check(self, impl: str, dtype: torch.dtype, case, seed: int = 0) -> None:
        self._skip(impl, dtype)
        args = self.arguments(case, _generator(seed))
        expected = self.oracle(*args)
        low = self._convert(args, impl, dtype)
        actual = self.call(impl, *low)
        assert actual.dtype == dtype and actual.device.type == IMPLEMENTATIONS[impl].device
        torch_error = relative_error(self.oracle(*low), expected) if dtype in LOW_PRECISION else None
        assert_close(actual.cpu(), expected, tolerance(dtype, torch_error, self.tight_fp32))
        self.check_layout(actual, low)

    def check_layout(self, actual: torch.Tensor, args) -> None:
        """Outputs of the fused units are channels-last maps (where they are maps)."""
        if actual.dim() == 4:
            assert actual.is_contiguous(memory_format=CL)

    def test_matches_oracle(self, impl, dtype, case):
        self.check(impl, dtype, case)

    def test_nan_comes_out_where_the_oracle_has_it(self, impl):
        if impl not in self.nan_exact:
            pytest.skip(f"{impl}'s {self.op} maps NaN to 0 (oneDNN's fused ReLU); the plan never passes it a NaN")
        self._skip(impl, torch.float32)
        args = list(self.arguments(self.cases_for(impl)[0], _generator(0)))
        x = args[0].clone()
        x[0, 0, 0, 0] = float("nan")  # channel 0 enters every GEMM of the unit
        args[0] = x
        expected = self.oracle(*args)
        assert expected.isnan().any()
        actual = self.call(impl, *self._convert(args, impl, torch.float32)).cpu()
        assert torch.equal(actual.isnan(), expected.isnan())


def pytest_generate_tests(metafunc):
    tester = metafunc.cls
    if tester is None or not issubclass(tester, OpTester):
        return
    names = metafunc.fixturenames
    if "case" in names:
        rows, ids = [], []
        for impl in tester.implementations:
            for dtype in IMPLEMENTATIONS[impl].dtypes:
                for i, case in enumerate(tester().cases_for(impl)):
                    rows.append((impl, dtype, case))
                    ids.append(f"{impl}-{str(dtype).replace('torch.', '')}-{i}")
        metafunc.parametrize("impl, dtype, case", rows, ids=ids)
    elif "impl" in names:
        metafunc.parametrize("impl", tester.implementations)


# --------------------------------------------------------------------------- pointwise_bottleneck


def bottleneck_arguments(g, batch, channels, planes, height, width, layout="channels_last"):
    x = _image(g, (batch, channels, height, width), layout)
    return (
        x,
        _randn(g, planes, channels, 1, 1, scale=channels**-0.5), _randn(g, planes, scale=0.1),
        _randn(g, planes, planes, 1, 1, scale=planes**-0.5), _randn(g, planes, scale=0.1),
        _randn(g, channels, planes, 1, 1, scale=0.5 * planes**-0.5), _randn(g, channels, scale=0.1),
    )


class TestPointwiseBottleneck(OpTester):
    op = "pointwise_bottleneck"
    implementations = ("cpu", "cuda", "triton")
    # (N, C, P, H, W): ragged pixel counts, batch 1 and > 1, real BagNet widths; NCHW inputs too.
    cases = [(1, 256, 64, 7, 5, "channels_last"), (3, 256, 64, 11, 13, "channels_last"),
             (2, 512, 128, 3, 9, "channels_last"), (1, 2048, 512, 2, 3, "channels_last"),
             (2, 64, 16, 5, 3, "nchw")]
    # Ragged for the interpreter's 32x32x32 tile (48 = 4*12: P padded to 16 on chip).
    interpreter_cases = [(1, 48, 12, 1, 37, "channels_last"), (2, 64, 16, 5, 7, "channels_last"),
                         (2, 80, 20, 5, 7, "nchw"), (1, 256, 64, 1, 37, "channels_last")]
    nan_exact = ("cuda", "triton")

    def arguments(self, case, g):
        return bottleneck_arguments(g, *case)

    def test_in_place_form(self, impl):
        if impl == "triton":
            pytest.skip("the Triton backend has no in-place form")
        self._skip(impl, torch.float32)
        args = self._convert(self.arguments(self.cases[1], _generator(1)), impl, torch.float32)
        x = args[0].clone()
        ops.pointwise_bottleneck_(x, *args[1:])
        assert_close(x.cpu(), self.oracle(*(a.double().cpu() for a in args)), tolerance(torch.float32))
        with pytest.raises(RuntimeError, match="channels-last"):
            ops.pointwise_bottleneck_(args[0].contiguous(), *args[1:])

    def test_prepacked_weights(self):
        self._skip("cpu", torch.float32)
        args = [a.float() for a in self.arguments((2, 256, 64, 6, 7, "channels_last"), _generator(2))]
        expected = self.oracle(*(a.double() for a in args))
        # Packed without the input shape, and for the (1, C, 1, pixels) views the op convolves.
        for sizes in ((None, None, None), ([1, 256, 1, 84], [1, 64, 1, 84], [1, 64, 1, 84])):
            packed = list(args)
            for i, size in zip((1, 3, 5), sizes):
                packed[i] = torch.ops.mkldnn._reorder_convolution_weight(args[i], [0, 0], [1, 1], [1, 1], 1, size)
            assert_close(ops.pointwise_bottleneck(*packed), expected, tolerance(torch.float32))

    def test_bad_arguments(self, impl):
        if impl == "triton":
            pytest.skip("triton_ops checks shapes with torch._check (tests/test_triton_kernels.py)")
        self._skip(impl, torch.float32)
        x, w1, b1, w2, b2, w3, b3 = self._convert(bottleneck_arguments(_generator(0), 1, 64, 16, 4, 4), impl, torch.float32)
        for args, message in [
            ((x, w1[:, :10], b1, w2, b2, w3, b3), "w1 must have shape"),
            ((x, w1, b1, w2, b2[:3], w3, b3), "bias of w2 must have shape"),
            ((x[0], w1, b1, w2, b2, w3, b3), "4-D"),
            ((x, w1.double(), b1, w2, b2, w3, b3), "w1 must have the dtype of x"),
        ]:
            with pytest.raises(RuntimeError, match=message):
                ops.pointwise_bottleneck(*args)

    def test_opcheck(self, impl):
        if impl == "triton" and INTERPRETING:
            pytest.skip("triton_op fake-tensor tracing does not work with TRITON_INTERPRET=1")
        self._skip(impl, torch.float32)
        args = self._convert(bottleneck_arguments(_generator(0), 2, 64, 16, 5, 3), impl, torch.float32)
        if impl == "triton":
            torch.library.opcheck(ops.triton_pointwise_bottleneck.default, args)
            return
        torch.library.opcheck(ops.pointwise_bottleneck.default, args)
        torch.library.opcheck(ops.pointwise_bottleneck_.default, (args[0].clone(),) + args[1:])


class TestPointwiseBottleneckMean(OpTester):
    """The last block + the head's mean: a wide block adds into the means in the last GEMM's
    epilogue (tiles spanning several images summed per image), a narrow one writes its map."""

    op = "pointwise_bottleneck_mean"
    implementations = ("triton",)
    # 96 channels with 80 planes (padded to 128: wider than the fp32 fused kernel's 64); 4x5
    # pixels per image puts several images in one 32-row tile.
    cases = [(1, 96, 80, 5, 7, "channels_last"), (3, 96, 80, 4, 5, "channels_last"),
             (2, 96, 80, 13, 11, "channels_last"), (2, 64, 16, 3, 5, "channels_last")]
    interpreter_cases = cases

    def arguments(self, case, g):
        return bottleneck_arguments(g, *case)

    def oracle(self, *args):
        return ref.pointwise_bottleneck_mean(*args).to(args[0].dtype)

    def call(self, impl, *args):
        return super().call(impl, *args).to(args[0].dtype)  # float32 means, as the plan uses them


# --------------------------------------------------------------------------- conv_bias_act


class TestConvBiasAct(OpTester):
    op = "conv_bias_act"
    implementations = ("triton",)
    # (N, Cin, Cout, k, stride, H, W, residual (extra rows, cols) or None, relu): ragged 48 -> 40,
    # the 3-channel stem, real widths; identity residuals cropped top-left as BagNet's are.
    cases = [
        (1, 48, 40, 3, 1, 9, 10, None, True), (2, 48, 40, 3, 2, 9, 10, None, True),
        (2, 48, 40, 1, 1, 9, 10, None, True), (1, 48, 40, 1, 2, 9, 10, None, False),
        (2, 3, 64, 3, 1, 9, 10, None, True), (1, 64, 64, 3, 2, 9, 10, None, True),
        # Reductions over the taps flattened (Cin·9 <= 64): the stem's stride 2, and 5·9 = 45
        # lanes, two of the interpreter's 32-wide steps.
        (1, 3, 40, 3, 2, 9, 10, None, True), (2, 5, 40, 3, 1, 9, 10, (1, 0), True),
        (1, 256, 64, 1, 1, 9, 10, None, True),
        (2, 48, 40, 3, 1, 11, 9, (0, 0), True), (1, 48, 40, 3, 2, 11, 9, (2, 3), False),
        (2, 48, 40, 1, 1, 11, 9, (2, 3), True), (1, 48, 40, 1, 2, 11, 9, (0, 0), True),
    ]

    def arguments(self, case, g):
        n, c_in, c_out, k, stride, h, w, extra, relu = case
        x = _image(g, (n, c_in, h, w), "nchw" if c_in == 48 and k == 1 and stride == 2 else "channels_last")
        weight = _randn(g, c_out, c_in, k, k, scale=(2.0 / (c_in * k * k)) ** 0.5)
        bias = _randn(g, c_out, scale=0.1)
        residual = None
        if extra is not None:
            ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
            residual = _image(g, (n, c_out, ho + extra[0], wo + extra[1]))
        return x, weight, bias, stride, relu, residual


# --------------------------------------------------------------------------- bias_residual_act


class TestBiasResidualAct(OpTester):
    """The cuda backend's epilogue after a vendor GEMM; its CPU twin is the test path."""

    op = "bias_residual_act"
    # (N, C, H, W, crop (rows, cols) or None, relu, residual as a crop view): channel counts with
    # and without the CUDA kernel's 16-byte vectors.
    cases = [(2, 24, 5, 7, (0, 0), True, False), (2, 24, 5, 7, (1, 2), False, False),
             (3, 64, 5, 7, (5, 3), True, True), (3, 2048, 2, 3, (1, 1), True, True),
             (2, 3, 5, 7, None, True, False), (1, 12, 4, 4, None, False, False)]
    tight_fp32 = 1e-6  # elementwise: one rounding

    def arguments(self, case, g):
        n, c, h, w, crop, relu, as_view = case
        y = _image(g, (n, c, h, w))
        bias = _randn(g, c)
        residual = None
        if crop is not None:
            full = _image(g, (n, c, h + crop[0], w + crop[1]))
            residual = full[:, :, :h, :w] if as_view else full
        return y, bias, residual, relu

    def test_bad_arguments(self, impl):
        self._skip(impl, torch.float32)
        device = IMPLEMENTATIONS[impl].device
        y = torch.randn(1, 4, 3, 3, device=device)
        zeros = torch.zeros(4, device=device)
        for args, message in [
            ((y, zeros, torch.randn(1, 4, 2, 3, device=device), True), "cannot be cropped"),
            ((y, torch.zeros(5, device=device), None, True), "bias must have shape"),
            ((y, zeros.double(), None, True), "bias must have the dtype of y"),
            ((y, zeros, torch.randn(1, 4, 3, 3, device=device).half(), True), "residual must have the dtype of y"),
            ((y, zeros, torch.randn(4, 3, 3, device=device), True), "residual must be 4-D"),
        ]:
            with pytest.raises(RuntimeError, match=message):
                ops.bias_residual_act(*args)

    def test_cuda_rounds_once_from_fp32(self):
        """The CUDA kernel computes (y + bias) + residual in fp32 and rounds once: bit-identical
        to PyTorch doing the same in fp32 from the same inputs."""
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            self._skip("cuda", dtype)
            for case in self.cases:
                y, bias, residual, relu = self._convert(self.arguments(case, _generator(4)), "cuda", dtype)
                expected = y.float() + bias.float().view(1, -1, 1, 1)
                if residual is not None:
                    expected = expected + residual.float()[:, :, : y.shape[2], : y.shape[3]]
                expected = expected.relu() if relu else expected
                assert torch.equal(ops.bias_residual_act(y, bias, residual, relu), expected.to(dtype))

    def test_opcheck(self, impl):
        self._skip(impl, torch.float32)
        y, bias, residual, relu = self._convert(self.arguments(self.cases[2], _generator(5)), impl, torch.float32)
        torch.library.opcheck(ops.bias_residual_act.default, (y, bias, residual, relu))
        torch.library.opcheck(ops.bias_residual_act.default, (y, bias, None, False))


# --------------------------------------------------------------------------- stem_conv_bias_relu


class TestStemConvBiasRelu(OpTester):
    op = "stem_conv_bias_relu"
    # (N, H, W, Cout, layout): 3x3 images give a 1x1 output; the others are ragged. Cout = 64 is
    # BagNet's, 8 the smallest the CUDA kernel takes.
    cases = [(1, 3, 3, 64, "channels_last"), (2, 9, 11, 64, "nchw"), (3, 17, 5, 8, "sliced"),
             (2, 37, 29, 64, "channels_last")]
    tight_fp32 = 1e-6  # 27 products per output

    def arguments(self, case, g):
        n, h, w, c_out, layout = case
        x = _image(g, (n, 3, h, w), layout)
        weight = _randn(g, c_out, 3, 3, 3, scale=27**-0.5).contiguous(memory_format=CL)
        return x, weight, _randn(g, c_out, scale=0.1)

    def check(self, impl, dtype, case, seed=0):
        if dtype == torch.float64:
            pytest.skip("stem_conv_bias_relu computes in fp32 for float32/float16/bfloat16 storage")
        super().check(impl, dtype, case, seed)

    def test_bad_arguments(self, impl):
        self._skip(impl, torch.float32)
        x, w, b = self._convert(self.arguments((1, 5, 5, 64, "channels_last"), _generator(0)), impl, torch.float32)
        for args, message in [
            ((x[:, :2], w, b), "x must be \\(N, 3, H, W\\)"),
            ((x[..., :2, :], w, b), "at least 3x3 pixels"),
            ((x, w[:, :, :1, :1], b), "weight must be \\(Cout, 3, 3, 3\\)"),
            ((x, w[:60], b[:60]), "multiple of 8"),
            ((x, w, b[:8]), "bias must have shape"),
            ((x, w.double(), b), "dtype and device of x"),
            ((x.double(), w.double(), b.double()), "supports float32, float16 and bfloat16"),
        ]:
            with pytest.raises(RuntimeError, match=message):
                ops.stem_conv_bias_relu(*args)

    def test_opcheck(self, impl):
        self._skip(impl, torch.float32)
        args = self._convert(self.arguments((2, 6, 7, 16, "channels_last"), _generator(0)), impl, torch.float32)
        torch.library.opcheck(ops.stem_conv_bias_relu.default, args)


# --------------------------------------------------------------------------- head


class TestSpatialMeanLinear(OpTester):
    op = "spatial_mean_linear"
    implementations = ("cpu", "cuda", "triton")
    # (N, C, H, W, K): a 1x1 map, ragged maps, BagNet's 2048 channels and 1000 classes.
    cases = [(1, 2048, 1, 1, 11), (3, 2048, 4, 5, 11), (2, 64, 7, 3, 11), (2, 256, 6, 7, 1000)]
    interpreter_cases = [(1, 48, 1, 37, 10), (2, 48, 6, 7, 10), (1, 256, 1, 37, 1000), (2, 256, 6, 7, 1000)]

    def arguments(self, case, g):
        n, c, h, w, k = case
        return _image(g, (n, c, h, w)).abs(), _randn(g, k, c, scale=0.05), _randn(g, k)

    def test_bad_arguments(self, impl):
        if impl == "triton":
            pytest.skip("triton_ops checks shapes with torch._check")
        self._skip(impl, torch.float32)
        x, weight, bias = self._convert(self.arguments(self.cases[2], _generator(0)), impl, torch.float32)
        with pytest.raises(RuntimeError, match="weight must have shape"):
            ops.spatial_mean_linear(x, weight[:, :-1], bias)

    def test_opcheck(self, impl):
        if impl == "triton" and INTERPRETING:
            pytest.skip("triton_op fake-tensor tracing does not work with TRITON_INTERPRET=1")
        self._skip(impl, torch.float32)
        args = self._convert(self.arguments(self.cases[2], _generator(0)), impl, torch.float32)
        op = ops.triton_spatial_mean_linear if impl == "triton" else ops.spatial_mean_linear
        torch.library.opcheck(op.default, args)


class TestPatchLogits(OpTester):
    op = "patch_logits"
    implementations = ("triton",)
    # (N, C, H, W, K, classes): all, two, nineteen, reordered with a duplicate; a real width.
    cases = [(1, 48, 1, 37, 1000, None), (2, 48, 5, 3, 1000, [3, 7]), (1, 48, 1, 37, 1000, list(range(5, 100, 5))),
             (2, 48, 5, 3, 1000, [999, 0, 0]), (1, 256, 3, 5, 40, None)]

    def arguments(self, case, g):
        n, c, h, w, k, classes = case
        return _image(g, (n, c, h, w)).abs(), _randn(g, k, c, scale=0.05), _randn(g, k), classes

    def check_layout(self, actual, args):
        n, _, h, w = args[0].shape
        assert actual.shape[:3] == (n, h, w) and actual.is_contiguous()
