"""pytest-benchmark suites of bagnet_fast: options, timing helper, machine info.

Run from the repository root (see benchmarks/README.md):
    pytest benchmarks                  # CPU: 64x64, batches 1 and 4, float32
                                       # CUDA (when present): 224x224, batches 1 and 64, bf16 and fp32
    pytest benchmarks --bagnet-full    # CPU at full size: 224x224, batches 1 and 8
    pytest benchmarks --benchmark-disable   # each benchmark runs once: a smoke test

Timing: warm-up calls run outside the measurement (plan build, oneDNN primitives, Triton
compilation, cuDNN autotuning); each timed call synchronises the device inside the timed function,
so a round measures the GPU's work, not the launch; rounds are fixed (``--bagnet-rounds``), not
calibrated, because one call already takes milliseconds to seconds.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import pytest
import torch

import bagnet_fast
from bagnet_fast import timing as _timing
from bagnet_fast.executors import backends

DTYPES = _timing.DTYPES

# Seconds slept inside every timed call: only for testing the regression gate
# (tests/test_benchmark_suite.py), which must see a deliberate slowdown being caught.
INJECT_DELAY_ENV = "BAGNET_BENCH_INJECT_DELAY_S"


@dataclass(frozen=True)
class Settings:
    device: str
    size: int
    batches: Tuple[int, ...]
    dtypes: Tuple[str, ...]
    rounds: int
    warmup: int
    compile: bool

    def peers(self, dtype: str) -> Tuple[str, ...]:
        """The CPU peers (bagnet_fast.peers) that can run here and compute in ``dtype``: float32
        (ONNX Runtime, OpenVINO fp32) or bfloat16 (OpenVINO bf16 where the CPU has bf16 units)."""
        if self.device != "cpu" or dtype not in ("float32", "bfloat16"):
            return ()
        from bagnet_fast import peers

        return tuple(peers.PEER_IDS[name] for name, (_, precision) in peers.PEERS.items()
                     if precision == dtype and peers.why_not(name) is None)

    def fast_backends(self, dtype: str) -> Tuple[str, ...]:
        """The backends that can run here for real (the Triton interpreter is a test tool)."""
        report = backends(self.device, DTYPES[dtype])
        return tuple(name for name, entry in report.items()
                     if entry["available"] and not (name == "triton" and self.device == "cpu"))


def pytest_addoption(parser):
    group = parser.getgroup("bagnet_fast benchmarks")
    group.addoption("--bagnet-full", action="store_true",
                    help="full sizes: 224x224 images, batches 1 and 8 (CPU) or 1 and 64 (CUDA)")
    group.addoption("--bagnet-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--bagnet-size", type=int, default=None,
                    help="image size (default: 64 on CPU, 224 on CUDA or with --bagnet-full)")
    group.addoption("--bagnet-batches", default=None, help="comma-separated batch sizes")
    group.addoption("--bagnet-dtypes", default=None,
                    help="comma-separated dtypes (default: float32 on CPU, bfloat16,float32 on CUDA)")
    group.addoption("--bagnet-rounds", type=int, default=None,
                    help="timed rounds per benchmark (default 5 CPU, 20 CUDA)")
    group.addoption("--bagnet-compile", action="store_true",
                    help="add torch.compile of the reference (its first call compiles: minutes per shape)")


def _settings(config) -> Settings:
    device = config.getoption("--bagnet-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    full = config.getoption("--bagnet-full")
    on_gpu = device == "cuda"
    size = config.getoption("--bagnet-size") or (224 if full or on_gpu else 64)
    batches = config.getoption("--bagnet-batches")
    default_batches = (1, 64) if on_gpu else (1, 8) if full else (1, 4)
    batches = tuple(int(b) for b in batches.split(",")) if batches else default_batches
    dtypes = config.getoption("--bagnet-dtypes")
    dtypes = tuple(dtypes.split(",")) if dtypes else (("bfloat16", "float32") if on_gpu else ("float32",))
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise pytest.UsageError(f"--bagnet-dtypes: unknown {unknown}; choose from {sorted(DTYPES)}")
    rounds = config.getoption("--bagnet-rounds") or (20 if on_gpu else 5)
    return Settings(device, size, batches, dtypes, rounds, warmup=3 if on_gpu else 1,
                    compile=config.getoption("--bagnet-compile"))


def pytest_configure(config):
    config._bagnet_settings = _settings(config)


@pytest.fixture(scope="session")
def settings(request) -> Settings:
    return request.config._bagnet_settings


def pytest_benchmark_update_machine_info(config, machine_info):
    """The default machine info names the CPU architecture and Python, not the processor or the
    GPU: add them, and the versions that decide the numbers."""
    machine_info["cpu_name"] = _timing.cpu_name()
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["torch_cuda"] = torch.version.cuda
    machine_info["triton"] = _version("triton")
    machine_info["bagnet_fast"] = bagnet_fast.__version__
    machine_info["bagnet_fast_extension"] = bagnet_fast._extension.loaded()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        machine_info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
            "driver": _nvidia_driver(),
            "cudnn": torch.backends.cudnn.version(),
        }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["bagnet_settings"] = asdict(config._bagnet_settings)


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> Optional[str]:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


@pytest.fixture
def run_timed(benchmark, settings):
    """``run_timed(fn, args, images=, flops=, bytes=, group=, setup=, autograd=)``: time ``fn(*args)``
    (or ``fn(*setup())``, setup untimed: fresh inputs for in-place ops) and record img/s, TFLOP/s
    and GB/s from the counted FLOPs and bytes in extra_info. Under torch.inference_mode unless
    ``autograd`` (training steps)."""
    device = torch.device(settings.device)
    delay = float(os.environ.get(INJECT_DELAY_ENV, "0"))

    def run(fn: Callable, args: Sequence = (), *, images: int, flops: int, bytes: int, group: str,
            setup: Optional[Callable[[], Sequence]] = None, extra: Optional[Dict] = None,
            autograd: bool = False):
        def timed(*call_args):
            out = fn(*call_args)
            _timing.sync(device)  # inside the timed function: the device's work is part of the round
            if delay:
                time.sleep(delay)
            return out

        make_args = setup or (lambda: args)
        benchmark.group = group
        with contextlib.nullcontext() if autograd else torch.inference_mode():
            if not benchmark.disabled:
                for _ in range(settings.warmup):
                    fn(*make_args())
                _timing.sync(device)
            pedantic_setup = (lambda: (tuple(make_args()), {})) if setup else None
            benchmark.pedantic(timed, args=() if setup else tuple(args), setup=pedantic_setup,
                               rounds=settings.rounds, iterations=1, warmup_rounds=0)
        benchmark.extra_info.update(extra or {})
        benchmark.extra_info.update(device=settings.device, images=images, flops=flops, bytes=bytes)
        if benchmark.stats:  # absent with --benchmark-disable
            median = benchmark.stats.stats.median
            benchmark.extra_info.update(
                images_per_s=images / median,
                tflops_per_s=flops / median / 1e12,
                gbytes_per_s=bytes / median / 1e9,
            )

    return run


def pytest_generate_tests(metafunc):
    """Parametrise from the settings: dtype x batch, and the implementations that can run."""
    settings = metafunc.config._bagnet_settings
    if "batch" in metafunc.fixturenames:
        metafunc.parametrize("batch", settings.batches, ids=lambda b: f"b{b}")
    if "dtype_and_implementation" in metafunc.fixturenames:
        cases = []
        for dtype in settings.dtypes:
            implementations = ["reference-nchw", "reference-channels-last"]
            implementations += [f"fast-{name}" for name in settings.fast_backends(dtype)]
            implementations += ["reference-compile"] if settings.compile else []
            implementations += [f"peer-{name}" for name in settings.peers(dtype)]
            cases += [(dtype, impl) for impl in implementations]
        metafunc.parametrize("dtype_and_implementation", cases, ids=[f"{d}-{i}" for d, i in cases])
    if "dtype_and_backend" in metafunc.fixturenames:
        cases = [(dtype, name) for dtype in settings.dtypes for name in settings.fast_backends(dtype)]
        metafunc.parametrize("dtype_and_backend", cases, ids=[f"{d}-{b}" for d, b in cases])
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", settings.dtypes)


@pytest.fixture(scope="session")
def make_model(settings):
    """A cached eval-mode model per (name, dtype, layout): building BagNet-33 takes about a second
    here. Channels-last models are separate copies: ``.to(memory_format=...)`` rewrites the
    weights, and an NCHW input with channels-last weights runs channels-last."""
    cache: Dict[tuple, torch.nn.Module] = {}

    def make(name: str, dtype: str, channels_last: bool = False) -> torch.nn.Module:
        key = (name, dtype, channels_last)
        if key not in cache:
            torch.manual_seed(0)
            if name == "resnet50":
                torchvision = pytest.importorskip("torchvision")
                model = torchvision.models.resnet50()
            else:
                model = getattr(bagnet_fast, name)()
            model = model.to(device=settings.device, dtype=DTYPES[dtype]).eval()
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            cache[key] = model
        return cache[key]

    return make


@pytest.fixture
def images(settings):
    """``images(batch, dtype)``: random normalised-looking images on the benchmark device."""

    def make(batch: int, dtype: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, settings.size, settings.size, generator=generator)
        return x.to(device=settings.device, dtype=DTYPES[dtype])

    return make
