"""The command line, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bagnet_fast", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_info_lists_backends():
    result = _run("info")
    assert result.returncode == 0, result.stderr
    assert "extension: loaded" in result.stdout
    assert "cpu   cpu     yes" in result.stdout


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    result = _run("bench", "--model", "bagnet9", "--batch", "1", "--size", "33", "--warmup", "0",
                  "--repeats", "1", "--no-resnet", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "bench.json").read_text())
    names = [row["implementation"] for row in report["rows"]]
    assert names == ["reference eager NCHW", "reference eager channels-last", "bagnet_fast"]
    assert all(row["images_per_second"] > 0 for row in report["rows"])
    assert report["ratios"]["fast / reference eager NCHW"] > 0


def test_bench_rejects_bad_arguments():
    result = _run("bench", "--batch", "0")
    assert result.returncode != 0
    assert "--batch" in result.stderr
