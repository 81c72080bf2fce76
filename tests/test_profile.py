"""``python -m bagnet_fast profile`` and its timers: valid CSV/JSON/PNG/trace, rows that line up
with the FLOP tables, and timers that do not change what the plan computes. No timed assertions."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

import bagnet_fast
from bagnet_fast import flops
from bagnet_fast.profile import LayerTimer, UnitTimer

from conftest import make_model
from test_cli import HAVE_TORCHVISION, PNG_SIGNATURE, _strict_json


def test_layer_timer_times_every_counted_layer():
    model = make_model("bagnet9")
    x = torch.randn(1, 3, 33, 33)
    timer = LayerTimer(model, torch.device("cpu"))
    with torch.no_grad():
        for _ in range(2):
            with timer:
                model.reference_forward(x)
        model.reference_forward(x)  # outside ``with``: no hooks left behind
    names = [c.name for c in flops.reference_layer_costs(model, x.shape)]
    assert sorted(timer.seconds) == sorted(names)
    assert all(len(times) == 2 for times in timer.seconds.values())


def test_unit_timer_names_match_plan_costs_and_keep_outputs():
    model = make_model("bagnet17")
    x = torch.randn(2, 3, 40, 40)
    plan = bagnet_fast.build_plan(model)
    timer = UnitTimer(plan, torch.device("cpu"))
    with torch.no_grad():
        expected = model(x)
        with timer:
            timed = timer.forward(x)
        untimed = timer.forward(x)
    assert torch.equal(timed, expected) and torch.equal(untimed, expected)
    assert list(timer.seconds) == [c.name for c in flops.plan_unit_costs(plan, x.shape)]


@pytest.fixture(scope="module")
def profile_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    result = subprocess.run(
        [sys.executable, "-m", "bagnet_fast", "profile", "--model", "bagnet9", "--size", "33", "--batch", "1",
         "--warmup", "0", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_profile_csv(profile_out):
    out, _ = profile_out
    with open(out / "layers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    networks = {row["network"] for row in rows}
    assert networks == {"bagnet9 reference", "bagnet9 fast [cpu]"} | ({"resnet50"} if HAVE_TORCHVISION else set())
    fast = [row for row in rows if row["network"] == "bagnet9 fast [cpu]"]
    assert [row["name"] for row in fast][0] == "stem" and fast[-1]["name"] == "head" and len(fast) == 18
    model = bagnet_fast.bagnet9()
    reference_flops = sum(int(row["flops"]) for row in rows if row["network"] == "bagnet9 reference")
    assert reference_flops == flops.total(flops.reference_layer_costs(model, (1, 3, 33, 33)))[0]
    for row in rows:
        assert float(row["seconds"]) > 0 and int(row["bytes"]) > 0
        assert row["bound"] in ("memory", "compute")
        assert row["stage"] in ("stem", "layer1", "layer2", "layer3", "layer4", "head")


def test_profile_json_answers_the_downsampling_question(profile_out):
    out, stdout = profile_out
    if not HAVE_TORCHVISION:
        pytest.skip("torchvision is not installed: no ResNet-50 to compare with")
    report = _strict_json(out / "profile.json")
    comparison = report["downsampling"]
    assert set(comparison["stages"]) == {"stem", "layer1", "layer2", "layer3", "layer4", "head"}
    # BagNets keep more positions in every stage than ResNet-50 (less downsampling).
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert comparison["stages"][stage]["positions_ratio"] > 1
    assert comparison["flops_ratio"] > 1
    assert all(line in stdout for line in comparison["findings"])
    assert report["peaks"]["matmul_flops_per_s"] > 0
    for totals in report["totals"].values():
        assert totals["seconds_end_to_end"] > 0 and totals["flops"] > 0


def test_profile_png_and_trace(profile_out):
    out, _ = profile_out
    assert (out / "roofline.png").read_bytes().startswith(PNG_SIGNATURE)
    trace = json.loads((out / "trace.json").read_text())
    labels = {event.get("name") for event in trace["traceEvents"]}
    # One range per reference layer (hooks) and per plan unit (wrapped backend).
    assert {"conv2", "layer1.0.conv1", "fc", "stem", "layer1.1", "head"} <= labels
    if HAVE_TORCHVISION:
        assert "maxpool" in labels  # ResNet-50's layers too


def test_profile_refuses_to_overwrite(profile_out):
    out, _ = profile_out
    result = subprocess.run([sys.executable, "-m", "bagnet_fast", "profile", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "--overwrite" in result.stderr
