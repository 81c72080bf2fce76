"""The peers of the CPU benchmarks (bagnet_fast.peers): ONNX Runtime and OpenVINO on the exported
reference graph compute the reference's logits, say why when they cannot run, and appear in
``bench --peers`` with their error, precision and setup time."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import bagnet_fast
from bagnet_fast import peers
from conftest import randomize_batchnorm, rel_err
from test_cli import _run, _strict_json

HAVE = {name: importlib.util.find_spec(name) is not None for name in ("onnxruntime", "openvino", "onnx")}
needs_export = pytest.mark.skipif(not HAVE["onnx"], reason="onnx is not installed (pip install bagnet_fast[peers])")
# fp32 peers run the same convolutions with BatchNorm folded and other summation orders: measured
# rel_err 1e-7..1e-6 on this model; 1e-5 is the fp32 parity bound of the whole package.
FP32_PEER_RTOL = 1e-5
# bf16 peers (OpenVINO on CPUs with bf16 units): bf16 activations and weights, fp32 accumulation;
# 8 significant bits over ~20 layers (tests/test_precision.py measures ~3e-2 for our bf16 path).
BF16_PEER_RTOL = 6e-2


def tiny_bagnet():
    """A BagNet-17 with one block per stage: every kind of unit, exported and compiled in seconds."""
    torch.manual_seed(0)
    model = bagnet_fast.BagNet(layers=(1, 1, 1, 1), strides=(2, 2, 2, 1), kernel3=(1, 1, 1, 0), num_classes=10)
    return randomize_batchnorm(model, 0).eval()


@needs_export
def test_installed_peers_compute_the_reference(tmp_path):
    model = tiny_bagnet()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = model.reference_forward(x)
    rows = peers.peer_implementations(model, tuple(x.shape), threads=1, folder=str(tmp_path))
    assert [row["name"] for row in rows] == list(peers.PEERS)
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # one export serves every peer
    ran = 0
    for row in rows:
        if row["fn"] is None:  # not installed, or no bf16 units: it says so
            assert row["note"].startswith("not run: ") and len(row["note"]) > 12, row
            continue
        ran += 1
        tolerance = FP32_PEER_RTOL if row["precision"] == "float32" else BF16_PEER_RTOL
        assert rel_err(row["fn"](x), expected) <= tolerance, row["name"]
        assert row["setup_seconds"] > 0 and "s," in row["note"]
    bf16_runs = HAVE["openvino"] and peers.openvino_bf16_supported() is None
    assert ran == HAVE["onnxruntime"] + HAVE["openvino"] + bf16_runs


def test_missing_peers_say_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("onnxruntime", "openvino") else real(name, *a))
    for name in peers.PEERS:
        assert "pip install" in peers.why_not(name)
    rows = peers.peer_implementations(tiny_bagnet(), (1, 3, 17, 17))
    assert all(row["fn"] is None and "not installed" in row["note"] for row in rows)
    with pytest.raises(RuntimeError, match="not installed"):
        peers.peer_runner("onnxruntime (reference graph)", tiny_bagnet(), (1, 3, 17, 17))


@pytest.mark.skipif(not (HAVE["onnx"] and HAVE["onnxruntime"]), reason="onnx/onnxruntime are not installed")
def test_bench_peers_rows(tmp_path):
    out = tmp_path / "bench"
    result = _run("bench", "--model", "bagnet9", "--batch", "1", "--size", "33", "--warmup", "1",
                  "--repeats", "1", "--peers", "--no-resnet", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = _strict_json(out / "bench.json")
    rows = {row["implementation"]: row for row in report["rows"]}
    peer = rows["onnxruntime (reference graph)"]
    assert peer["precision"] == "float32" and peer["setup_seconds"] > 0
    # Every row checks itself against the reference on the bench's input (logits of size ~1).
    for row in report["rows"]:  # --no-resnet: every row is a BagNet-9
        assert row["max_abs_diff_vs_reference"] <= 1e-3, row["implementation"]
        assert 0 < row["percent_of_matmul_peak"] <= 100, row["implementation"]
    assert report["ratios"]["fast / onnxruntime"] > 0
    # The peers run before the first plan sets the process's allocator (bench.py: it slowed
    # OpenVINO 1.3x, and bench read fast / OpenVINO 1.45x instead of the 1.07x measured after).
    order = [row["implementation"] for row in report["rows"]]
    assert order.index("onnxruntime (reference graph)") < order.index("bagnet_fast")
    if HAVE["openvino"]:
        assert "fast / openvino fp32" in report["ratios"]
    # A float32 bench compares float32 rows only: OpenVINO bf16 belongs to the bfloat16 bench.
    assert "openvino bf16 (reference graph)" not in rows


@pytest.mark.skipif(not (HAVE["onnx"] and HAVE["openvino"]), reason="onnx/openvino are not installed")
def test_bench_bf16_peers_rows(tmp_path):
    """``bench --dtype bfloat16 --peers``: bagnet_fast in bf16 beside OpenVINO bf16 (the float32
    graph under its bf16 hint), each checked against the reference modules in bf16; where the
    CPU has no bf16 units both say why (the fast row falls back to the torch backend)."""
    out = tmp_path / "bench"
    result = _run("bench", "--model", "bagnet9", "--batch", "1", "--size", "33", "--warmup", "1", "--dtype",
                  "bfloat16", "--repeats", "1", "--peers", "--no-resnet", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = _strict_json(out / "bench.json")
    rows = {row["implementation"]: row for row in report["rows"]}
    assert "onnxruntime (reference graph)" not in rows and "openvino fp32 (reference graph)" not in rows
    ok, why = bagnet_fast.executors.available("cpu", "cpu", torch.bfloat16)
    assert rows["bagnet_fast"]["backend"] == ("cpu" if ok else "torch")
    bf16 = peers.why_not("openvino bf16 (reference graph)")
    if bf16:
        assert bf16 in result.stdout and "openvino bf16 (reference graph)" not in rows
        return
    peer = rows["openvino bf16 (reference graph)"]
    assert peer["precision"] == "bfloat16" and peer["setup_seconds"] > 0
    for name in ("bagnet_fast", "openvino bf16 (reference graph)"):
        # bf16 against the reference modules in bf16 (both rounded, differently): within the bf16
        # peer bound; measured 6.6e-3 relative here for both (and for the reference in channels-last).
        assert 0 < rows[name]["max_rel_diff_vs_reference"] <= BF16_PEER_RTOL, (name, rows[name])
    assert report["ratios"]["fast / openvino bf16"] > 0
