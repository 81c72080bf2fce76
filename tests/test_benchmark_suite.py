"""The pytest-benchmark suites in benchmarks/, run as CI and users run them (subprocesses):
every benchmark runs once at a tiny size, and the regression gate catches a deliberate slowdown.
No timed assertions: the slowdown is a sleep far above any noise."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--bagnet-size", "40", "--bagnet-batches", "1", "-p", "no:cacheprovider"]
# A benchmark of well under a millisecond: the injected 0.5 s sleep dwarfs it.
GATE_BENCHMARK = ["benchmarks/test_bench_ops.py", "-k", "test_op and spatial_mean_linear and reference"]


def _pytest(*args, env=None):
    environment = dict(os.environ, **(env or {}))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", *args], capture_output=True, text=True,
                          cwd=ROOT, env=environment, timeout=600)


def test_suites_run_once_at_tiny_sizes():
    """`--benchmark-disable`: each benchmark body runs once, untimed (the CI smoke test)."""
    result = _pytest("benchmarks", "--benchmark-disable", *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    passed = int(re.search(r"(\d+) passed", result.stdout).group(1))
    # 3 variants x (2 reference layouts + cpu and torch backends [+ installed peers]) [+ 2 ResNet-50 layouts]; 8 units
    # x 2 backends; 9 ops x 2 implementations (the op rows are skipped if the extension lacks one);
    # 3 training-step configurations.
    assert passed >= 12 + 16 + 9 + 3


def test_regression_gate_catches_a_slowdown(tmp_path):
    storage = f"file://{tmp_path}"
    baseline = _pytest(*GATE_BENCHMARK, *TINY, "--bagnet-rounds", "3", "--benchmark-save=baseline",
                       f"--benchmark-storage={storage}")
    assert baseline.returncode == 0, baseline.stdout[-3000:] + baseline.stderr[-3000:]
    saved = list(tmp_path.glob("*/0001_baseline.json"))
    assert len(saved) == 1
    run = json.loads(saved[0].read_text())
    assert run["machine_info"]["cpu_name"] and run["machine_info"]["bagnet_fast"] == "0.1.0"
    assert run["benchmarks"][0]["extra_info"]["images_per_s"] > 0

    slowed = _pytest(*GATE_BENCHMARK, *TINY, "--bagnet-rounds", "3", "--benchmark-compare=0001",
                     "--benchmark-compare-fail=median:100%", f"--benchmark-storage={storage}",
                     env={"BAGNET_BENCH_INJECT_DELAY_S": "0.5"})
    assert slowed.returncode != 0
    assert "Performance has regressed" in slowed.stdout + slowed.stderr

    # Unchanged code passes the gate. An absolute threshold (median 0.1 s slower) because a
    # percentage of a sub-millisecond benchmark is at the mercy of a loaded CI machine.
    unchanged = _pytest(*GATE_BENCHMARK, *TINY, "--bagnet-rounds", "3", "--benchmark-compare=0001",
                        "--benchmark-compare-fail=median:0.1", f"--benchmark-storage={storage}")
    assert unchanged.returncode == 0, unchanged.stdout[-3000:] + unchanged.stderr[-3000:]
