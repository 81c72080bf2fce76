"""The cpu backend's allocator setting (bagnet_fast/executors/cpu_memory.py): applied once when a
cpu-backend plan is built, opted out of with BAGNET_FAST_CPU_MALLOC=system, a bad value refused.
Each case runs in a fresh process: the setting is process-wide and applied once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bagnet_fast.ops import has_op

SCRIPT = """
import torch, bagnet_fast
from bagnet_fast.executors import cpu_memory
print(cpu_memory.state())
model = bagnet_fast.bagnet9(num_classes=3).eval()
with torch.no_grad():
    model(torch.randn(1, 3, 20, 20))
print(bagnet_fast.get_plan(model).backend.name)
print(cpu_memory.state())
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not has_op("pointwise_bottleneck", "CPU"),
                                reason="glibc's mallopt and the cpu backend (C++ extension) are needed")


def _run(setting):
    env = dict(os.environ)
    env.pop("BAGNET_FAST_CPU_MALLOC", None)
    if setting is not None:
        env["BAGNET_FAST_CPU_MALLOC"] = setting
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)


def test_applied_when_the_cpu_backend_first_runs():
    result = _run(None)
    assert result.returncode == 0, result.stderr
    before, backend, after = result.stdout.strip().splitlines()[-3:]
    assert before.startswith("not applied yet") and backend == "cpu"
    assert "freed large blocks kept for reuse" in after


def test_system_opts_out_and_bad_values_are_refused():
    result = _run("system")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "the system allocator's defaults (BAGNET_FAST_CPU_MALLOC=system)"
    result = _run("sometimes")
    assert result.returncode != 0 and "BAGNET_FAST_CPU_MALLOC='sometimes'" in result.stderr


def test_public_call_applies_it_once_before_any_plan():
    code = ("import bagnet_fast; a = bagnet_fast.keep_freed_cpu_memory(); b = bagnet_fast.keep_freed_cpu_memory(); "
            "print(a == b and 'kept for reuse' in a)")
    env = {k: v for k, v in os.environ.items() if k != "BAGNET_FAST_CPU_MALLOC"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
