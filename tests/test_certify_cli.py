"""``python -m bagnet_fast certify``, run as a user would: an ImageFolder tree with a corrupt file,
a PatchGuard-style checkpoint (DataParallel prefix under 'net', 10 classes), several patch sizes,
every defence, resuming, changed options, bad arguments, and two ranks under torchrun."""

from __future__ import annotations

import csv
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model

from bagnet_fast import certify as cf
from bagnet_fast import preprocess
from bagnet_fast.__main__ import main as cli_main
from bagnet_fast.certify_cli import PRESETS, prepare_image
from bagnet_fast.explain import patch_logits

Image = pytest.importorskip("PIL.Image")

# (class folder, file, height, width): landscape, portrait, square, small (upscaled to 256).
IMAGES = [("ant", "a.png", 240, 300), ("ant", "b.jpg", 300, 250), ("bee", "c.png", 256, 256),
          ("bee", "sub/d.png", 120, 150), ("cat", "e.png", 260, 231)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("certify")
    data = root / "data"
    rng = np.random.default_rng(0)
    for folder, name, height, width in IMAGES:
        (data / folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(data / folder / name)
    (data / "cat" / "broken.jpg").write_bytes(b"not an image")
    model = make_model("bagnet9", num_classes=10)
    # PatchGuard's CIFAR checkpoints: DataParallel-wrapped, under 'net'.
    torch.save({"net": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, root / "bagnet9.pth")
    return root


def _run(*args, launcher=None):
    command = launcher or [sys.executable, "-m", "bagnet_fast"]
    return subprocess.run([*command, "certify", *map(str, args)], capture_output=True, text=True, timeout=600)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# Small prepared images keep the forward passes quick (the presets' resize and crop are tested
# against torchvision's transforms, and the 224 geometry by the bad-arguments test).
SMALL = ["--resize", "64", "--crop", "56"]


@functools.lru_cache(maxsize=None)
def _evidence(data: Path, resize: int, crop: int):
    """The evidence maps and labels of the IMAGES under ``data``, prepared as the CLI does."""
    model = make_model("bagnet9", num_classes=10)
    images, labels = [], []
    for folder, name, _, _ in sorted(IMAGES, key=lambda item: (item[0], item[1])):
        pixels = torch.from_numpy(np.array(Image.open(data / folder / name).convert("RGB")))
        images.append(prepare_image(pixels, resize, "bilinear", crop))
        labels.append(["ant", "bee", "cat"].index(folder))
    with torch.inference_mode():
        return patch_logits(model, preprocess(torch.stack(images), layout="NHWC")).values, labels


def _expected(workspace, defense, sizes, resize=64, crop=56, **options):
    """What the CLI should report, from the API: (clean predictions, labels, {size: (defended,
    codes)})."""
    logits, labels = _evidence(workspace / "data", resize, crop)
    results = {}
    for size in sizes:
        function = {"masking": cf.masking, "detection": cf.detection, "cbn": cf.clipping}[defense]
        result = function(logits, labels, cf.window_size(size, 9), **options)
        results[size] = (result.prediction.tolist(), result.certified.tolist())
    return cf.undefended_prediction(logits).tolist(), labels, results


def test_folder_run_matches_the_api(workspace):
    out = workspace / "out"
    result = _run(workspace / "data", "--model", "bagnet9", "--weights", workspace / "bagnet9.pth",
                  "--patch-size", "16", "--patch-size", "40", "--defense", "masking", "--threshold", "0.1",
                  *SMALL, "--out", out)
    assert result.returncode == 1, result.stderr  # the broken file
    assert "cannot read image" in result.stderr and "broken.jpg" in result.stderr
    assert "5 image(s) certified, 0 already done, 1 failed" in result.stdout
    assert "3 class folders, 10 model classes" in result.stderr
    rows = _rows(out / "certify.csv")
    assert [r["path"] for r in rows] == ["ant/a.png", "ant/b.jpg", "bee/c.png", "bee/sub/d.png", "cat/e.png"]
    clean, labels, expected = _expected(workspace, "masking", (16, 40), threshold=0.1)
    assert [int(r["label"]) for r in rows] == labels == [0, 0, 1, 1, 2]
    assert [int(r["clean_prediction"]) for r in rows] == clean
    for size, (defended, codes) in expected.items():
        assert [int(r[f"defended_{size}px"]) for r in rows] == defended
        assert [int(r[f"code_{size}px"]) for r in rows] == codes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 5 and summary["missing"] == 1 and summary["classes"] == 3
    assert summary["clean_accuracy"] == pytest.approx(np.mean(np.array(clean) == labels))
    for size, (defended, codes) in expected.items():
        entry = summary["patch_sizes"][str(size)]
        assert entry["certified_accuracy"] == pytest.approx(np.mean(np.array(codes) == 2))
        assert entry["defended_clean_accuracy"] == pytest.approx(np.mean(np.array(defended) == labels))
        assert sum(entry["codes"].values()) == 5
    assert summary["configuration"]["threshold"] == 0.1 and summary["configuration"]["patch_sizes"] == [16, 40]
    pytest.importorskip("matplotlib")
    assert Image.open(out / "certified_accuracy.png").format == "PNG"
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def _in_process(capsys, *args):
    """The CLI in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    try:
        status = cli_main(["certify", *map(str, args)])
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _copy_images(workspace, data, images):
    for folder, name, _, _ in images:
        (data / folder / name).parent.mkdir(parents=True, exist_ok=True)
        (data / folder / name).write_bytes((workspace / "data" / folder / name).read_bytes())


@pytest.mark.parametrize("defense, options, flags", [
    ("detection", dict(tau=0.3), ["--tau", "0.3"]),
    ("cbn", dict(sound=True), ["--sound"]),
])
def test_other_defences(workspace, tmp_path, capsys, defense, options, flags):
    data, out = tmp_path / "data", tmp_path / "out"
    _copy_images(workspace, data, IMAGES)
    status, stdout, stderr = _in_process(capsys, data, "--model", "bagnet9", "--weights", workspace / "bagnet9.pth",
                                         "--patch-size", "24", "--defense", defense, *flags, "--no-plot", *SMALL,
                                         "--no-progress", "--out", out)
    assert status == 0 and "5 image(s) certified" in stdout, stderr
    rows = _rows(out / "certify.csv")
    _, _, expected = _expected(workspace, defense, (24,), **options)
    defended, codes = expected[24]
    assert [int(r["defended_24px"]) for r in rows] == defended
    assert [int(r["code_24px"]) for r in rows] == codes
    assert not (out / "certified_accuracy.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["defense"] == defense
    if defense == "detection":
        assert "alert_rate" in summary["patch_sizes"]["24"]


def test_resume_and_changed_options(workspace, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    _copy_images(workspace, data, IMAGES[:3])
    common = ["--model", "bagnet9", "--weights", workspace / "bagnet9.pth", "--patch-size", "32", "--defense",
              "masking", "--no-plot", "--no-progress", "--batch-size", "1", "--save-every", "1", *SMALL, "--out", out]
    status, stdout, stderr = _in_process(capsys, data, *common)
    assert status == 0 and "3 image(s) certified, 0 already done" in stdout, stderr
    assert len(list((out / "parts").glob("part-*.csv"))) == 3  # saved after every image
    _copy_images(workspace, data, IMAGES[4:])
    status, stdout, stderr = _in_process(capsys, data, *common)
    assert status == 0 and "1 image(s) certified, 3 already done" in stdout, stderr
    assert len(_rows(out / "certify.csv")) == 4
    assert json.loads((out / "summary.json").read_text())["images"] == 4
    status, _, stderr = _in_process(capsys, data, *common, "--threshold", "0.2")
    assert status != 0 and "other options" in str(status) + stderr and "threshold" in str(status) + stderr
    status, stdout, stderr = _in_process(capsys, data, *common, "--threshold", "0.2", "--overwrite")
    assert status == 0 and "4 image(s) certified, 0 already done" in stdout, stderr


def test_bad_arguments(workspace, tmp_path, capsys):
    data, weights = workspace / "data", workspace / "bagnet9.pth"
    base = ["certify", str(data), "--model", "bagnet9", "--weights", str(weights), "--out", str(tmp_path / "x")]
    cases = [
        (["--patch-size", "32", "--defense", "clip"], "needs --clip"),
        (["--patch-size", "32", "--defense", "detection"], "--tau is required"),
        (["--patch-size", "32", "--defense", "masking", "--sound"], "--sound is for"),
        (["--patch-size", "32", "--defense", "cbn", "--clip", "2"], "--clip C > 0 is for"),
        (["--patch-size", "32", "--defense", "masking", "--threshold", "1"], r"--threshold must be in \[0, 1\)"),
        (["--patch-size", "32", "--patch-size", "32", "--defense", "masking"], "distinct"),
        (["--patch-size", "300", "--defense", "masking"], "larger than the 27 x 27 map of a 224 x 224 image"),
        (["--patch-size", "48", "--defense", "masking", *SMALL], "larger than the 6 x 6 map of a 56 x 56 image"),
        (["--patch-size", "32", "--defense", "masking", "--resize", "50", "--crop", "56"], "larger than the resized"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            cli_main(base + extra)
    with pytest.raises(SystemExit, match="patch size 9"):
        cli_main(["certify", str(data), "--model", "bagnet17", "--weights", str(weights), "--patch-size", "32",
                  "--defense", "masking", "--out", str(tmp_path / "x")])
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes((data / "ant" / "a.png").read_bytes())
    with pytest.raises(SystemExit, match="no class folders"):
        cli_main(["certify", str(flat), "--model", "bagnet9", "--weights", str(weights), "--patch-size", "32",
                  "--defense", "masking", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):  # argparse: no weights source chosen
        cli_main(["certify", str(data), "--model", "bagnet9", "--patch-size", "32", "--defense", "masking",
                  "--out", str(tmp_path / "x")])
    assert "--weights" in capsys.readouterr().err


@pytest.mark.parametrize("height, width", [(240, 300), (300, 250), (120, 150), (256, 256), (225, 224), (401, 257)])
def test_preprocessing_matches_torchvision(height, width):
    transforms = pytest.importorskip("torchvision.transforms")
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ours = prepare_image(torch.from_numpy(pixels), 256, "bilinear", 224).numpy()
    theirs = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])(Image.fromarray(pixels))
    np.testing.assert_array_equal(ours, np.array(theirs))
    # Normalised: the fused preprocess against ToTensor + Normalize.
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(PRESETS["imagenet"][3], PRESETS["imagenet"][4])])
    torch.testing.assert_close(preprocess(torch.from_numpy(ours).unsqueeze(0), layout="NHWC")[0], reference(theirs),
                               rtol=0, atol=2e-6)
    cifar = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    expected = transforms.Resize(192, interpolation=transforms.InterpolationMode.BICUBIC)(Image.fromarray(cifar))
    np.testing.assert_array_equal(prepare_image(torch.from_numpy(cifar), *PRESETS["cifar"][:3]).numpy(), np.array(expected))


def test_torchrun_two_ranks_share_the_folder(workspace, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _copy_images(workspace, data, IMAGES)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "bagnet_fast"]
    result = _run(data, "--model", "bagnet9", "--weights", workspace / "bagnet9.pth", "--patch-size", "32",
                  "--defense", "masking", "--no-plot", *SMALL, "--out", out, launcher=launcher)
    assert result.returncode == 0, result.stderr
    assert "5 image(s) certified, 0 already done, 0 failed" in result.stdout  # totals over both ranks
    rows = _rows(out / "certify.csv")
    _, _, expected = _expected(workspace, "masking", (32,))
    assert [int(r["code_32px"]) for r in rows] == expected[32][1]
