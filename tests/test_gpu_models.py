"""CUDA parity of the fast BagNets, for every backend that can run on CUDA, in float32, bfloat16
and float16, and of every candidate Triton tile. Skipped, with the reason, without an NVIDIA GPU.

Run on a GPU machine in a process where the Triton interpreter is off (TRITON_INTERPRET=1 is
process-wide and fixed when triton is first imported):

    TRITON_INTERPRET=0 python -m pytest -m cuda tests/test_gpu_models.py tests/test_triton_kernels.py

Oracle: the reference forward in float64 on the GPU. Criteria (DESIGN.md, "Precision"):
- float32: rel_err(fast, oracle) <= max(1e-5, 2 × rel_err(torch fp32 reference, oracle)), TF32
  off for the torch reference (the Triton kernels' fp32 dots are exact "ieee" products);
- bfloat16/float16: rel_err(fast, oracle) <= 2 × rel_err(torch reference in that dtype, oracle),
  the PyTorch error measured here on the same weights and images;
- top-1: wherever the oracle's top-1 margin exceeds twice the fast model's max error, the fast
  model picks the same class (a closer call is legitimately decided by rounding).

This module never imports triton at collection: tests/test_triton_kernels.py sets
TRITON_INTERPRET=1 when it is collected, and a triton imported earlier would not see it.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
import torch

import bagnet_fast
from conftest import FP32_RTOL, VARIANTS, make_model, rel_err

pytestmark = pytest.mark.cuda

# BAGNET_FAST_GPU_TEST_DEVICE=cpu (with TRITON_INTERPRET=1) runs these tests' own code on the CPU,
# to check them before their first GPU run; the numbers checked there prove nothing about GPUs.
DEVICE = os.environ.get("BAGNET_FAST_GPU_TEST_DEVICE", "cuda")
HAS_CUDA = DEVICE == "cuda" and torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not (HAS_CUDA or DEVICE != "cuda"),
    reason="no CUDA device here: GPU parity runs on a GPU machine (benchmarks/gpu_check.sh)",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CUDA_BACKENDS = ("triton", "cuda", "torch")
# Ragged spatial sizes (H' × W' = 5 × 7 patches for BagNet-33) at the real channel widths.
BATCH, HEIGHT, WIDTH = 3, 65, 81


@pytest.fixture(autouse=True)
def fixed_tiles(monkeypatch):
    # One tile per op, no benchmarking: parity does not depend on the winner, and tuning every
    # shape of three dtypes would cost minutes of the GPU check (the benchmark tunes).
    monkeypatch.setenv("BAGNET_FAST_AUTOTUNE", "0")


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact fp32 references: cuDNN convolutions default to TF32 on Ampere and later."""
    if not HAS_CUDA:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def skip_unless_runnable(backend: str, dtype: torch.dtype) -> None:
    entry = bagnet_fast.backends(DEVICE, dtype)[backend]
    if not entry["available"]:
        pytest.skip(f"backend {backend!r} unavailable on {DEVICE}/{dtype}: {entry['reason']}")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and DEVICE == "cuda":
        pytest.skip("TRITON_INTERPRET=1 in this process: run the CUDA tests with TRITON_INTERPRET=0")


_oracles: dict = {}


def oracle(name: str, avg_pool: bool):
    """(model fp32 on CPU, images fp32 on the device, float64 reference logits there), cached."""
    if (name, avg_pool) not in _oracles:
        model = make_model(name, avg_pool=avg_pool)
        generator = torch.Generator().manual_seed(1)
        x = ((torch.rand(BATCH, 3, HEIGHT, WIDTH, generator=generator) - 0.45) / 0.225).to(DEVICE)
        reference = copy.deepcopy(model).to(device=DEVICE, dtype=torch.float64)
        with torch.no_grad():
            expected = reference.reference_forward(x.double())
        _oracles[(name, avg_pool)] = model, x, expected
    return _oracles[(name, avg_pool)]


def assert_within_torch_error(actual, torch_out, expected, dtype, what: str) -> None:
    err = rel_err(actual, expected)
    torch_err = rel_err(torch_out, expected)
    bound = max(FP32_RTOL, 2 * torch_err) if dtype == torch.float32 else 2 * torch_err
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e} (torch's own in {dtype}: {torch_err:.3e})"


def assert_top1_agrees(actual, expected, what: str) -> None:
    """Same class over the last dim wherever the oracle's top-1 margin exceeds twice the fast
    model's max error (a closer call is legitimately decided by rounding)."""
    logits = expected.reshape(-1, expected.shape[-1])
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (actual.double() - expected).abs().max()
    agree = actual.reshape(logits.shape).argmax(-1) == logits.argmax(-1)
    assert bool(agree[clear].all()), f"{what}: top-1 differs on {int((~agree & clear).sum())} clear decisions"


@needs_cuda
@pytest.mark.parametrize("avg_pool", [True, False], ids=["logits", "patches"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("name", VARIANTS)
def test_model_on_cuda(name, backend, dtype_name, avg_pool):
    dtype = DTYPES[dtype_name]
    skip_unless_runnable(backend, dtype)
    model, x, expected = oracle(name, avg_pool)
    fast = copy.deepcopy(model).to(device=DEVICE, dtype=dtype)
    fast.backend = backend
    x_lowp = x.to(dtype)
    with torch.inference_mode():
        actual = fast(x_lowp)
        torch_out = fast.reference_forward(x_lowp)
    assert bagnet_fast.get_plan(fast).backend.name == backend
    assert actual.dtype == dtype and actual.shape == expected.shape
    what = f"{name}/{backend}/{dtype_name}"
    assert_within_torch_error(actual, torch_out, expected, dtype, what)
    assert_top1_agrees(actual, expected, what)


@needs_cuda
@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_cuda_graph_runner(dtype_name):
    if not hasattr(bagnet_fast, "cuda_graph"):
        pytest.skip("bagnet_fast.cuda_graph is not implemented in this checkout")
    if DEVICE != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    dtype = DTYPES[dtype_name]
    model, x, _ = oracle("bagnet33", True)
    fast = copy.deepcopy(model).to(device=DEVICE, dtype=dtype)
    x = x.to(dtype)
    runner = bagnet_fast.cuda_graph(fast, x)
    with torch.inference_mode():
        eager = fast(x)
        x2 = x.flip(-1).contiguous()
        eager2 = fast(x2)
    # Exact: the oracle's 35-pixel final maps get at most two atomic adds per (image, channel)
    # from the Triton head (tiles of >= 32 pixels), and 0 + a + b does not depend on their order.
    assert rel_err(runner(x), eager) <= 1e-6
    assert rel_err(runner(x2), eager2) <= 1e-6, "the graph replay did not read the new input"


@pytest.mark.skipif(not (HAS_CUDA and torch.cuda.device_count() >= 2), reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_model_on_the_second_gpu_while_the_first_is_current(backend):
    # Triton launches on the current device: the backend must make the tensors' device current.
    skip_unless_runnable(backend, torch.bfloat16)
    model, x, expected = oracle("bagnet9", True)
    fast = copy.deepcopy(model).to(device="cuda:1", dtype=torch.bfloat16)
    fast.backend = backend
    with torch.cuda.device(0), torch.inference_mode():
        actual = fast(x.to("cuda:1", torch.bfloat16))
        torch_out = fast.reference_forward(x.to("cuda:1", torch.bfloat16))
    assert actual.device == torch.device("cuda", 1)
    assert_within_torch_error(actual, torch_out, expected.to("cuda:1"), torch.bfloat16, f"cuda:1/{backend}")


# --------------------------------------------------------------------------- every candidate tile

# (op, shape) cases: BagNet widths, ragged pixel counts. conv: (Cin, Cout, k, stride, residual
# crop); pointwise: (C, P).
CONV_CASES = [(128, 128, 3, 1, None), (256, 256, 3, 2, None), (512, 2048, 1, 1, (0, 0)), (1024, 512, 1, 1, (2, 3))]
POINTWISE_CASES = [(256, 64), (512, 128), (1024, 256)]
MAX_TILES = 5


def assert_op_close(out, out_torch, expected, dtype, what: str) -> None:
    if dtype == torch.float32:
        err = rel_err(out, expected)
        assert err <= FP32_RTOL, f"{what}: fp32 relative error {err:.3e} > {FP32_RTOL:.0e}"
    else:
        assert_within_torch_error(out, out_torch, expected, dtype, what)


def _tile_or_skip(table_name: str, index: int, dtype: torch.dtype):
    skip_unless_runnable("triton", dtype)
    from bagnet_fast.ops import triton_ops, triton_tuning

    tiles = getattr(triton_tuning, table_name)[triton_tuning.dtype_class(dtype)]
    if index >= len(tiles):
        pytest.skip(f"{table_name} has {len(tiles)} candidates for {dtype}")
    return triton_ops, tiles[index]


@needs_cuda
@pytest.mark.parametrize("index", range(MAX_TILES))
@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_every_conv_tile(dtype_name, index):
    """Each candidate compiles (tile sizes, shared memory) and computes the same: the autotuner
    would silently drop a failing one, so this is where a broken candidate shows."""
    dtype = DTYPES[dtype_name]
    triton_ops, tile = _tile_or_skip("CONV_TILES", index, dtype)
    from bagnet_fast.ops import reference

    torch.manual_seed(index)
    for c_in, c_out, k, stride, crop in CONV_CASES:
        x = torch.randn(2, c_in, 13, 11, device=DEVICE).to(memory_format=torch.channels_last)
        weight = torch.randn(c_out, c_in, k, k, device=DEVICE) * (2 / (c_in * k * k)) ** 0.5
        bias = torch.randn(c_out, device=DEVICE) * 0.1
        h, w = (13 - k) // stride + 1, (11 - k) // stride + 1
        residual = None if crop is None else torch.randn(2, c_out, h + crop[0], w + crop[1], device=DEVICE)
        expected = reference.conv_bias_act(x.double(), weight.double(), bias.double(), stride,
                                           residual=None if residual is None else residual.double())
        lowp = [t if t is None else t.to(dtype) for t in (x, weight, bias, residual)]
        with triton_ops.force_tile("conv", tile):
            out = triton_ops.conv_bias_act(lowp[0], lowp[1], lowp[2], stride, residual=lowp[3])
        out_torch = reference.conv_bias_act(lowp[0], lowp[1], lowp[2], stride, residual=lowp[3])
        assert_op_close(out, out_torch, expected, dtype, f"conv {c_in}->{c_out} k{k} s{stride} {tile}")


@needs_cuda
@pytest.mark.parametrize("index", range(MAX_TILES))
@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_every_pointwise_tile(dtype_name, index):
    dtype = DTYPES[dtype_name]
    triton_ops, tile = _tile_or_skip("POINTWISE_TILES", index, dtype)
    from bagnet_fast.ops import reference

    torch.manual_seed(index)
    for channels, planes in POINTWISE_CASES:
        x = torch.randn(2, channels, 9, 13, device=DEVICE).to(memory_format=torch.channels_last)
        params = []
        for c_out, c_in in ((planes, channels), (planes, planes), (channels, planes)):
            params += [torch.randn(c_out, c_in, 1, 1, device=DEVICE) * (1 / c_in) ** 0.5,
                       torch.randn(c_out, device=DEVICE) * 0.1]
        expected = reference.pointwise_bottleneck(x.double(), *(p.double() for p in params))
        lowp = [t.to(dtype) for t in [x, *params]]
        with triton_ops.force_tile("pointwise", tile):
            out = triton_ops.pointwise_bottleneck(*lowp)
        out_torch = reference.pointwise_bottleneck(*lowp)
        assert_op_close(out, out_torch, expected, dtype, f"pointwise C={channels} P={planes} {tile}")


@needs_cuda
def test_autotuned_forward_matches_fixed_tiles(monkeypatch):
    """With autotuning on (what users get), the winners compute what the fixed tiles compute."""
    skip_unless_runnable("triton", torch.bfloat16)
    model, x, expected = oracle("bagnet17", True)
    fast = copy.deepcopy(model).to(device=DEVICE, dtype=torch.bfloat16)
    fast.backend = "triton"
    with torch.inference_mode():
        fixed = fast(x.bfloat16())
        monkeypatch.setenv("BAGNET_FAST_AUTOTUNE", "1")
        tuned = fast(x.bfloat16())
    assert rel_err(tuned.float(), expected) <= 2 * rel_err(fixed.float(), expected) + 1e-3


# --------------------------------------------------------------------------- without a GPU


def test_kernels_compile_for_hopper():
    """The first candidate tile of each GEMM kernel compiles for sm_90 (ahead of time, no GPU):
    the interpreter accepts code the GPU compiler rejects, and this catches it in CI."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_compile_check.py"), "--quick", "--dtypes", "bf16"],
        capture_output=True, text=True, timeout=600, env=env, cwd=root,
    )
    if "ptxas" in result.stderr and "No such file" in result.stderr:
        pytest.skip("triton's bundled ptxas is missing")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(": ok") >= 3, result.stdout


# --------------------------------------------------------------------------- the GPU check script


def _gpu_check(out, *extra):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=600, env=env, cwd=root,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.py end to end on CPU with tiny shapes (BagNet-9, 2 images of 40 px;
    about 10 s): catches API and syntax errors before the script's one run on a GPU machine."""
    import json

    _gpu_check(tmp_path)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown.startswith("# ") and "## Checks" in markdown
    measured = {(r["model"], r["impl"]): r for r in data["rows"] if r.get("img_per_s")}
    assert ("bagnet9", "reference eager fp32 NCHW") in measured and ("resnet50", "eager bf16 channels-last") in measured
    # Every fast row checks itself against the torch backend and names the backend that ran.
    fast = [r for (_, impl), r in measured.items() if impl.startswith("fast ")]
    assert fast and all(r["backend_ran"] == "torch" and r["rel_err_vs_torch"] == 0.0 for r in fast), fast
    # Rows that cannot run here are recorded with the reason, not dropped.
    skipped = {r["impl"]: r["note"] for r in data["rows"] if not r.get("img_per_s")}
    assert skipped["fast bf16 [triton]"].startswith("skipped: the Triton interpreter")
    assert "goals" in data
    # The unit profile: every unit timed, with the model's prediction next to it.
    profiles = {p["impl"]: p for p in data["profiles"]}
    assert [way["name"] for way in profiles["stem implementations bf16"]["stem"]] == ["direct kernel (stem_conv_bias_relu)"]
    units = {unit["name"]: unit for unit in profiles["unit profile bf16 [torch]"]["units"]}
    assert {"end to end", "stem", "layer4.2", "head"} <= set(units)
    assert all(unit["seconds"] > 0 and unit["predicted_s"] > 0 for unit in units.values())
    assert "## bagnet9 unit profile bf16 [torch]" in markdown and "measured / predicted" in markdown
    # The checks owed by issues 11 and 13 (17's fp32 modes need CUDA: recorded as not measurable).
    checks = {c["name"]: c for c in data["checks"]}
    assert len(checks) == 4, list(checks)
    assert checks["issue 11: NaN propagation"]["passed"] is True
    assert checks["issue 11: NaN propagation"]["values"]["torch"]["nan_patches"] > 0
    assert checks["issue 13: float32 exact under global TF32 flags"]["passed"] is True
    dead = checks["issue 13: bf16 on a dead-branch checkpoint, with and without elimination"]["values"]
    # The bf16 backends other than torch where one runs here (the cpu backend on CPUs with bf16 units).
    ran = "cpu" if bagnet_fast.executors.available("cpu", "cpu", torch.bfloat16)[0] else "torch"
    assert dead[f"{ran} eliminated"]["blocks_eliminated"] == 5 and dead[f"{ran} kept"]["blocks_eliminated"] == 0
    assert checks["issue 17: Triton fp32 modes vs float64"]["passed"] is None


def test_gpu_check_phases_merge_into_one_result(tmp_path):
    """gpu_check.sh runs each phase in its own process into one folder: a later phase keeps the
    earlier rows, and --rerun-failed reruns only what has no result."""
    import json

    _gpu_check(tmp_path, "--phase", "baselines")
    _gpu_check(tmp_path, "--phase", "extra", "--only", "check nan")
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {r["phase"] for r in data["rows"]} == {"baselines"} and len(data["rows"]) == 3
    assert [c["impl"] for c in data["checks"]] == ["check nan_propagation"]
    _gpu_check(tmp_path, "--rerun-failed", "--only", "reference")  # both reference rows have results
    rerun = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["median_s"] for r in rerun["rows"]] == [r["median_s"] for r in data["rows"]]


@pytest.mark.parametrize("script", ["benchmarks/gpu_check.sh", "benchmarks/gpu_followup.sh", "scripts/setup.sh",
                                    "scripts/test.sh", "scripts/quickstart.sh"])
def test_shell_scripts_parse(script):
    """The GPU run's scripts get one try on a machine lent for minutes: a syntax error there (an
    unclosed quote, a stray fi) would cost the slot. ``bash -n`` parses without running."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(["bash", "-n", str(root / script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
