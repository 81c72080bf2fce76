"""``python -m bagnet_fast heatmap``, run as a user would: a folder of generated images with a
corrupt file, resuming, overwriting, bad arguments, and two data-parallel ranks under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_model

from bagnet_fast.explain import dense_heatmap, patch_logits
from bagnet_fast import preprocess

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

SIZES = {"a.png": (40, 50), "b.jpg": (40, 50), "sub/c.png": (37, 33)}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("heatmap")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (height, width) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images / name)
    (images / "broken.jpg").write_bytes(b"this is not a JPEG")
    model = make_model("bagnet9", num_classes=10)
    torch.save(model.state_dict(), root / "bagnet9.pth")
    return root


def _run(*args, launcher=None):
    command = launcher or [sys.executable, "-m", "bagnet_fast"]
    return subprocess.run([*command, "heatmap", *map(str, args)], capture_output=True, text=True, timeout=600)


def test_folder_with_a_corrupt_file(workspace):
    out = workspace / "out-dense"
    result = _run(workspace / "images", "--model", "bagnet9", "--weights", workspace / "bagnet9.pth",
                  "--top", "2", "--dense", "--out", out)
    assert result.returncode == 1, result.stderr  # one image failed
    assert "cannot read image" in result.stderr and "broken.jpg" in result.stderr
    assert "3 image(s) explained, 0 already done, 1 failed" in result.stdout
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temporary file left behind
    model = make_model("bagnet9", num_classes=10)
    for name, (height, width) in SIZES.items():
        summary = json.loads((out / f"{name}.json").read_text())
        assert summary["size"] == [height, width] and summary["patch_size"] == 9
        assert len(summary["top_classes"]) == 5 and len(summary["explained"]) == 2
        pixels = torch.from_numpy(np.array(Image.open(workspace / "images" / name).convert("RGB")))
        image = preprocess(pixels.unsqueeze(0), layout="NHWC")
        for entry, top in zip(summary["explained"], summary["top_classes"]):
            assert entry["class"] == top["class"] and entry["kind"] == "dense"
            evidence = np.load(out / name.rsplit("/", 1)[0] / entry["map"] if "/" in name else out / entry["map"])
            assert evidence.shape == (height, width)
            expected = dense_heatmap(model, image, entry["class"])[0].numpy()
            np.testing.assert_allclose(evidence, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
            # Up to --patches 5, non-overlapping (9x9 patches 8 pixels apart: every other position).
            assert 1 <= len(entry["most_indicative"]) <= 5 and 1 <= len(entry["least_indicative"]) <= 5
            png = Image.open((out / name).parent / entry["png"])
            assert png.format == "PNG"


def test_resume_and_overwrite(workspace):
    out = workspace / "out-patch"
    first = _run(workspace / "images" / "sub", "--model", "bagnet9", "--weights", workspace / "bagnet9.pth",
                 "--class", "3", "--no-plot", "--out", out)
    assert first.returncode == 0, first.stderr
    summary = json.loads((out / "c.png.json").read_text())
    (entry,) = summary["explained"]
    assert entry["class"] == 3 and entry["kind"] == "patch" and "png" not in entry
    evidence = np.load(out / entry["map"])
    pixels = torch.from_numpy(np.array(Image.open(workspace / "images" / "sub" / "c.png")))
    expected = patch_logits(make_model("bagnet9", num_classes=10), preprocess(pixels.unsqueeze(0), layout="NHWC"))
    np.testing.assert_allclose(evidence, expected.values[0, ..., 3].numpy(), rtol=0, atol=1e-5 * 50)
    stamp = (out / "c.png.json").stat().st_mtime_ns
    again = _run(workspace / "images" / "sub", "--model", "bagnet9", "--weights", workspace / "bagnet9.pth",
                 "--class", "3", "--no-plot", "--out", out)
    assert again.returncode == 0 and "0 image(s) explained, 1 already done" in again.stdout
    assert (out / "c.png.json").stat().st_mtime_ns == stamp
    (out / entry["map"]).unlink()  # an output missing: the image is done again
    redo = _run(workspace / "images" / "sub", "--model", "bagnet9", "--weights", workspace / "bagnet9.pth",
                "--class", "3", "--no-plot", "--out", out)
    assert "1 image(s) explained" in redo.stdout and (out / entry["map"]).exists()
    forced = _run(workspace / "images" / "sub", "--model", "bagnet9", "--weights", workspace / "bagnet9.pth",
                  "--class", "3", "--no-plot", "--overwrite", "--out", out)
    assert forced.returncode == 0 and "1 image(s) explained, 0 already done" in forced.stdout


def test_bad_arguments(workspace):
    images, weights = workspace / "images" / "sub", workspace / "bagnet9.pth"
    result = _run(images, "--model", "bagnet9", "--weights", weights, "--class", "10", "--out", workspace / "x")
    assert result.returncode != 0 and "--class must be in [0, 10)" in result.stderr
    result = _run(images, "--model", "bagnet33", "--weights", weights, "--out", workspace / "x")
    assert result.returncode != 0 and "patch size 9" in result.stderr
    result = _run(images, "--model", "bagnet9", "--weights", workspace / "missing.pth", "--out", workspace / "x")
    assert result.returncode != 0 and "not found" in result.stderr
    result = _run(workspace / "nowhere", "--model", "bagnet9", "--weights", weights, "--out", workspace / "x")
    assert result.returncode != 0 and "no such image or folder" in result.stderr
    result = _run(images, "--model", "bagnet9", "--out", workspace / "x")  # no weights chosen
    assert result.returncode != 0 and "--weights" in result.stderr


def test_torchrun_two_ranks_share_the_folder(workspace):
    images = workspace / "images-ok"
    images.mkdir()
    for name in ("a.png", "b.jpg"):
        (images / name).write_bytes((workspace / "images" / name).read_bytes())
    (images / "c.png").write_bytes((workspace / "images" / "sub" / "c.png").read_bytes())
    out = workspace / "out-ranks"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "bagnet_fast"]
    result = _run(images, "--model", "bagnet9", "--weights", workspace / "bagnet9.pth", "--no-plot",
                  "--out", out, launcher=launcher)
    assert result.returncode == 0, result.stderr
    assert "3 image(s) explained, 0 already done, 0 failed" in result.stdout  # totals over both ranks
    assert sorted(p.name for p in out.glob("*.json")) == ["a.png.json", "b.jpg.json", "c.png.json"]


def test_output_folder_inside_the_input_folder_is_not_explained(workspace, tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    (images / "a.png").write_bytes((workspace / "images" / "a.png").read_bytes())
    for _ in range(2):
        result = _run(images, "--model", "bagnet9", "--random-init", "--out", images / "maps")
        assert result.returncode == 0, result.stderr
    assert sorted(p.relative_to(images).as_posix() for p in images.rglob("*.json")) == ["maps/a.png.json"]
    assert not (images / "maps" / "maps").exists()


def test_resume_refuses_outputs_made_with_other_options(workspace, tmp_path):
    images, out = workspace / "images" / "sub", tmp_path / "out"
    weights = workspace / "bagnet9.pth"
    first = _run(images, "--model", "bagnet9", "--weights", weights, "--no-plot", "--out", out)
    assert first.returncode == 0, first.stderr
    summary = json.loads((out / "c.png.json").read_text())
    assert summary["configuration"]["dense"] is False and len(summary["configuration"]["weights"]["sha256"]) == 64
    changed = _run(images, "--model", "bagnet9", "--weights", weights, "--no-plot", "--dense", "--out", out)
    assert changed.returncode != 0
    assert "other options" in changed.stderr and "dense: False -> True" in changed.stderr
    assert "Traceback" not in changed.stderr
    other_class = _run(images, "--model", "bagnet9", "--weights", weights, "--no-plot", "--class", "2", "--out", out)
    assert other_class.returncode != 0 and "class: None -> 2" in other_class.stderr
    forced = _run(images, "--model", "bagnet9", "--weights", weights, "--no-plot", "--dense", "--overwrite",
                  "--out", out)
    assert forced.returncode == 0 and "1 image(s) explained" in forced.stdout
    assert json.loads((out / "c.png.json").read_text())["configuration"]["dense"] is True


def test_sixteen_bit_float_and_rotated_images(tmp_path):
    from bagnet_fast.heatmap_cli import read_image

    rng = np.random.default_rng(1)
    gray16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    pixels, notes = read_image(tmp_path / "gray16.png")
    expected = np.rint(gray16 / 257.0).astype(np.uint8)
    assert pixels.shape == (20, 30, 3) and np.array_equal(pixels[..., 1].numpy(), expected)
    assert "16-bit" in notes[0]

    unit = rng.random((20, 30), dtype=np.float32)
    Image.fromarray(unit, mode="F").save(tmp_path / "float.tif")
    pixels, notes = read_image(tmp_path / "float.tif")
    assert np.array_equal(pixels[..., 0].numpy(), np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    assert "[0, 1] scaled by 255" in notes[0]
    Image.fromarray(unit * 1000, mode="F").save(tmp_path / "huge.tif")
    with pytest.raises(ValueError, match="float pixels in"):
        read_image(tmp_path / "huge.tif")

    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    pixels, notes = read_image(tmp_path / "rotated.jpg")
    assert pixels.shape == (30, 20, 3) and notes == ["EXIF orientation 6 applied"]


def test_top_k_beyond_five(workspace, tmp_path):
    out = tmp_path / "out"
    result = _run(workspace / "images" / "sub", "--model", "bagnet9", "--weights", workspace / "bagnet9.pth",
                  "--top", "7", "--no-plot", "--out", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "c.png.json").read_text())
    assert len(summary["explained"]) == 7 and len(summary["top_classes"]) == 7
    assert [e["class"] for e in summary["explained"]] == [c["class"] for c in summary["top_classes"]]


def test_errors_come_at_start_up_in_one_line(workspace, tmp_path):
    images, weights = workspace / "images" / "sub", workspace / "bagnet9.pth"
    common = ["--model", "bagnet9", "--weights", weights]
    bad_backend = _run(images, *common, "--backend", "tpu", "--out", tmp_path / "o")
    assert bad_backend.returncode == 2 and "invalid choice: 'tpu'" in bad_backend.stderr
    if not torch.cuda.is_available():
        no_gpu = _run(images, *common, "--device", "cuda", "--out", tmp_path / "o")
        assert no_gpu.returncode != 0 and "no CUDA device is available" in no_gpu.stderr
        assert "Traceback" not in no_gpu.stderr
    a_file = tmp_path / "file"
    a_file.write_text("")
    result = _run(images, *common, "--out", a_file)
    assert result.returncode != 0 and "is a file, not a folder" in result.stderr and "Traceback" not in result.stderr


def test_random_init_is_seeded_and_stale_temporaries_are_removed(workspace, tmp_path):
    import socket

    images = workspace / "images" / "sub"
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    out_a.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out_a / f"c.png.json.tmp.{socket.gethostname()}.{int(dead.stdout)}"
    live = out_a / f"c.png.json.tmp.{socket.gethostname()}.{os.getpid()}"
    stale.write_text("half")
    live.write_text("half")
    for out in (out_a, out_b):
        result = _run(images, "--model", "bagnet9", "--random-init", "--seed", "3", "--no-plot", "--out", out)
        assert result.returncode == 0, result.stderr
    assert not stale.exists() and live.exists()  # a live process's temporary is not ours to delete
    summary = json.loads((out_a / "c.png.json").read_text())
    assert summary["configuration"]["weights"] == {"random_init_seed": 3}
    for name in [e["map"] for e in summary["explained"]]:
        assert np.array_equal(np.load(out_a / name), np.load(out_b / name))


def test_interrupt_says_how_to_resume(workspace, tmp_path, monkeypatch, capsys):
    from bagnet_fast import __main__ as cli
    from bagnet_fast import heatmap_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(heatmap_cli, "_process_group", interrupted)
    status = cli.main(["heatmap", str(workspace / "images" / "sub"), "--model", "bagnet9", "--random-init",
                       "--no-plot", "--no-progress", "--out", str(tmp_path / "out")])
    assert status == 130
    assert "interrupted; 0 image(s) explained in this run" in capsys.readouterr().err
