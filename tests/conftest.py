"""Shared fixtures: models with non-trivial BatchNorm statistics (so that folding is tested),
and the error measure every parity test uses."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, the Triton tests run in the interpreter, which must be chosen before anything
# imports triton (torch.utils.flop_counter does, when test_flops.py is collected): set it here,
# once, so that the result does not depend on the order in which test files are collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bagnet_fast  # noqa: E402
from _cuda_fault import pytest_runtest_logreport  # noqa: E402, F401 - a hook: ends a process whose CUDA context faulted

VARIANTS = ("bagnet9", "bagnet17", "bagnet33")

# float32 parity with the reference forward (DESIGN.md): the exact rewrites alone change the
# logits by ~5e-7 relative; 1e-5 leaves room for summation order and nothing else.
FP32_RTOL = 1e-5


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
                module.running_mean.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model


def make_model(name: str = "bagnet33", seed: int = 0, **kwargs) -> bagnet_fast.BagNet:
    torch.manual_seed(seed)
    model = getattr(bagnet_fast, name)(**kwargs)
    return randomize_batchnorm(model, seed).eval()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: one number per comparison, robust to tiny logits."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="session")
def models():
    """One model per variant, shared by the tests that only read it."""
    return {name: make_model(name) for name in VARIANTS}

