"""The precision report: every mode the device runs, against float64, per unit; and its CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import bagnet_fast
from bagnet_fast.precision import Mode, available_modes, precision_report
from test_dead_branches import dead_pattern_model


def test_modes_of_a_cpu():
    modes, skipped = available_modes(torch.device("cpu"))
    names = [m.name for m in modes]
    assert names[:3] == ["reference fp32", "fast fp32", "fast fp32, dead branches kept"]
    assert {"fast bf16", "fast bf16, dead branches kept", "reference bf16 autocast", "reference bf16"} <= set(names)
    assert "tf32" in skipped and "fp16" in skipped and not any("fp16" in n or "tf32" in n for n in names)


def test_report_on_the_dead_pattern_checkpoint():
    model = dead_pattern_model("bagnet9", near_dead=1.0)  # only the five pattern blocks are dead
    images = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 2, 3])
    modes = [Mode("fast fp32", "fast", torch.float32), Mode("fast bf16", "fast", torch.bfloat16),
             Mode("fast bf16, dead branches kept", "fast", torch.bfloat16, eliminate=False),
             Mode("reference bf16 autocast", "reference", torch.bfloat16, autocast=True)]
    report = precision_report(model, images, labels, modes=modes, batch_size=2)
    rows = {m["mode"]: m for m in report["modes"]}
    assert report["images"] == 3 and 0 <= report["float64_accuracy"] <= 1
    assert rows["fast fp32"]["max_relative_error"] < 1e-4 < rows["fast bf16"]["max_relative_error"]
    for row in rows.values():
        assert row["mean_relative_error"] <= row["max_relative_error"]
        assert 0 <= row["top1_agreement"] <= 1 and row["top5_agreement"] >= row["top1_agreement"]
        assert set(row["unit_errors"]) >= {"layer1.0", "layer4.2"}, row["mode"]
        assert 0 <= row["accuracy"] <= 1 and row["largest_jump"] in row["unit_errors"]
    # Eliminated blocks have no output of their own in the fast plan.
    assert "layer1.1" not in rows["fast bf16"]["unit_errors"]
    assert "layer1.1" in rows["fast bf16, dead branches kept"]["unit_errors"]
    assert rows["fast fp32"]["top1_agreement"] == 1.0


def test_precision_cli(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)).save(folder / name)
    (tmp_path / "labels.txt").write_text("a.png 3\nb.png 5\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bagnet_fast", "precision", str(folder), "--model", "bagnet9", "--random-init",
               "--resize", "48", "--crop", "40", "--labels", str(tmp_path / "labels.txt"), "--no-progress",
               "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "precision.json").read_text())
    assert report["images"] == 2 and {m["mode"] for m in report["modes"]} >= {"fast fp32", "fast bf16"}
    assert "fast bf16" in (out / "precision.txt").read_text()
    assert (out / "precision.png").read_bytes().startswith(b"\x89PNG")
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "--overwrite" in again.stderr  # never overwrites
