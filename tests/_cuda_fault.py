"""A pytest hook for the CUDA test runs (benchmarks/gpu_check.sh): a CUDA kernel fault leaves the
process's CUDA context unusable, so every later CUDA test in that process would fail with the
same sticky error and hide which test caused it. Imported by conftest.py; tested by
test_cuda_fault_hook.py."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch

CUDA_FAULT = re.compile(
    r"illegal memory access|misaligned address|unspecified launch failure|device-side assert|illegal instruction"
)
EXIT_CODE = 3


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    """After a test that faulted on the GPU is reported, end this process: under pytest-xdist a
    fresh worker takes the remaining tests and the faulting test is named; without xdist the run
    stops there rather than fail every later test."""
    if report.failed and torch.cuda.is_available() and CUDA_FAULT.search(str(report.longrepr)):
        sys.stderr.write(f"\nCUDA fault in {report.nodeid}: the CUDA context is lost; ending this process\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
