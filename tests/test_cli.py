"""The command line, run as a user would (a subprocess)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import bagnet_fast

HAVE_TORCHVISION = importlib.util.find_spec("torchvision") is not None
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bagnet_fast", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def _strict_json(path):
    """json.loads that rejects NaN/Infinity (not JSON; other tools choke on them)."""
    def reject(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def test_info_lists_backends():
    result = _run("info")
    assert result.returncode == 0, result.stderr
    assert "extension: loaded" in result.stdout
    assert "cpu   cpu     yes" in result.stdout
    ok, why = bagnet_fast.executors.available("cpu", "cpu", torch.bfloat16)
    assert f"cpu bfloat16 on the cpu backend: {'yes' if ok else 'no, ' + why}" in result.stdout


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    result = _run("bench", "--model", "bagnet9", "--batch", "1", "--size", "33", "--warmup", "0",
                  "--repeats", "1", "--all-backends", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = _strict_json(out / "bench.json")
    names = [row["implementation"] for row in report["rows"]]
    assert names[:4] == ["reference eager NCHW", "reference eager channels-last", "bagnet_fast",
                         "bagnet_fast [torch backend]"]
    resnet_rows = ["torchvision resnet50 eager NCHW", "torchvision resnet50 eager channels-last"]
    assert names[4:] == (resnet_rows if HAVE_TORCHVISION else [])
    assert report["rows"][2]["backend"] == "cpu"
    for row in report["rows"]:
        assert row["images_per_second"] > 0 and row["tflops_per_s"] > 0 and row["gbytes_per_s"] > 0
        assert 0 < row["percent_of_matmul_peak"] <= 100 and row["percent_of_copy_bandwidth"] > 0
        if not row["implementation"].startswith("torchvision"):  # logits of size ~1; each row checked itself
            assert row["max_abs_diff_vs_reference"] <= 1e-3
    assert report["peaks"]["matmul_flops_per_s"] > 0 and report["peaks"]["copy_bytes_per_s"] > 0
    # Counted FLOPs: the plan's (merged stem, cropped downsamples) are fewer than the reference's.
    assert report["rows"][2]["flops_per_image"] < report["rows"][0]["flops_per_image"]
    ratios = report["ratios"]
    assert ratios["fast / reference eager NCHW"] > 0
    if HAVE_TORCHVISION:
        assert ratios["bagnet9 reference NCHW / resnet50 NCHW (paper, bagnet33: 155/570 = 0.27)"] > 0
        assert 0 < ratios["FLOP ratio resnet50 / bagnet9 reference"] < 1
    assert (out / "bench.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "wrote" in result.stdout


def test_bench_refuses_to_overwrite(tmp_path):
    (tmp_path / "bench.json").write_text("{}")
    result = _run("bench", "--out", str(tmp_path))
    assert result.returncode != 0
    assert "--overwrite" in result.stderr
    assert (tmp_path / "bench.json").read_text() == "{}"


def test_bench_rejects_bad_arguments():
    result = _run("bench", "--batch", "0")
    assert result.returncode != 0
    assert "--batch" in result.stderr
    result = _run("bench", "--model", "bagnet33", "--size", "32")
    assert result.returncode != 0
    assert "--size must be >= 33" in result.stderr


def test_png_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    from bagnet_fast import bench

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    result = {"rows": [{"implementation": "bagnet_fast", "images_per_second": 1.0}], "model": "bagnet9",
              "batch": 1, "size": 33, "dtype": "float32", "device_name": "cpu"}
    assert bench.plot_bench(result, str(tmp_path / "bench.png")) is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing_behind(tmp_path):
    from bagnet_fast._io import write_atomically

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(str(tmp_path / "bench.json"), fail)
    assert list(tmp_path.iterdir()) == []


def test_bench_and_profile_check_out_and_device_before_any_work(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for command in ("bench", "profile"):
        result = _run(command, "--model", "bagnet9", "--size", "9", "--out", str(a_file))
        assert result.returncode != 0 and f"--out {a_file} is a file, not a folder" in result.stderr
        assert "Traceback" not in result.stderr and "img/s" not in result.stdout
        result = _run(command, "--model", "bagnet9", "--size", "9", "--device", "cuda:0", "--out", str(tmp_path / "o"))
        if not __import__("torch").cuda.is_available():
            assert result.returncode != 0 and "no CUDA device is available" in result.stderr
            assert "Traceback" not in result.stderr


def test_device_limits_of_a_slow_dtype_are_bounded():
    """float16 GEMMs on a CPU without fp16 units took 70 s per 2048^2 matmul: the peak measurement
    grows its sizes only while calls stay fast, so it returns in seconds."""
    code = ("import torch; from bagnet_fast.timing import measure_peaks; "
            "p = measure_peaks(torch.device('cpu'), torch.float16, budget=0.2); "
            "assert p['matmul_flops_per_s'] > 0 and p['copy_bytes_per_s'] > 0, p; print(p['matmul_source'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
