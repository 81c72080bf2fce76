"""The hook that ends a test process after a CUDA kernel fault (tests/_cuda_fault.py), run in a
child pytest with torch.cuda.is_available() faked: a fault ends the process after reporting the
faulting test; any other failure does not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _cuda_fault import EXIT_CODE

TESTS = """
def test_1_fails():
    raise RuntimeError({message!r})

def test_2_after():
    pass
"""


def run_child(tmp_path: Path, message: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\nfrom _cuda_fault import pytest_runtest_logreport\n"
    )
    (tmp_path / "test_child.py").write_text(TESTS.format(message=message))
    tests_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


@pytest.mark.parametrize("message", ["CUDA error: an illegal memory access was encountered",
                                     "CUDA error: device-side assert triggered"])
def test_a_cuda_fault_ends_the_process_after_reporting_it(tmp_path, message):
    child = run_child(tmp_path, message)
    assert child.returncode == EXIT_CODE, child.stdout + child.stderr
    assert "test_1_fails FAILED" in child.stdout
    assert "test_2_after" not in child.stdout
    assert "CUDA fault in test_child.py::test_1_fails" in child.stderr


def test_other_failures_let_the_run_go_on(tmp_path):
    child = run_child(tmp_path, "shape mismatch")
    assert child.returncode == 1, child.stdout + child.stderr
    assert "test_1_fails FAILED" in child.stdout and "test_2_after PASSED" in child.stdout
