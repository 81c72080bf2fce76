"""``python -m bagnet_fast precision IMAGES_OR_DIR --model M (--weights W | --random-init) --out DIR``:
what each precision mode the device can run costs on your weights and images, against float64.

For every mode (reference fp32; fast fp32 with and without dead-branch elimination; TF32 on GPUs;
fast bf16/fp16 with and without elimination; the reference in bf16/fp16 and under autocast): the
max and mean relative logit error, top-1/top-5 agreement with float64, accuracy with
``--labels``, and the error after each block (the unit where it jumps). Writes precision.json,
precision.txt (the table) and precision.png (error per unit, one line per mode); never
overwrites without --overwrite. Images: the authors' preprocessing after Resize 256 and
CenterCrop 224 (``--resize``/``--crop`` change it). ``--labels FILE``: lines "NAME LABEL" (the
image's path relative to IMAGES_OR_DIR, or its file name).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, List

import torch

from . import models as _models
from ._io import check_new_outputs, prepare_output_dir, write_atomically, write_json
from .certify_cli import prepare_image
from .heatmap_cli import _load_model, find_images, read_image
from .precision import format_report, plot_report, precision_report
from .preprocessing import preprocess
from .timing import resolve_device

__all__ = ["add_arguments", "main", "read_labels"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", metavar="IMAGES_OR_DIR", help="an image file or a folder of images")
    parser.add_argument("--model", default="bagnet33", choices=sorted(_models.PATCH_SIZES))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", metavar="FILE", help="a checkpoint (state_dict) of the model")
    source.add_argument("--pretrained", action="store_true", help="the authors' ImageNet weights (downloads)")
    source.add_argument("--random-init", action="store_true", help="untrained weights from --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", metavar="FILE", help='lines "NAME LABEL": accuracy per mode')
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default=None, help=argparse.SUPPRESS)  # _load_model reads it
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def read_labels(path: str) -> Dict[str, int]:
    labels = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.replace(",", " ").split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise SystemExit(f"--labels {path}, line {number}: expected 'NAME LABEL', got {line!r}")
        labels[fields[0]] = int(fields[1])
    return labels


def main(args) -> int:
    if args.batch_size < 1 or (args.max_images is not None and args.max_images < 1):
        raise SystemExit("--batch-size and --max-images must be >= 1")
    device = resolve_device(args.device)
    out = prepare_output_dir(args.out)
    paths = {kind: str(out / f"precision.{kind}") for kind in ("json", "txt", "png")}
    check_new_outputs(paths.values(), args.overwrite)
    try:
        files = find_images(args.inputs, exclude=out)
    except FileNotFoundError as error:
        raise SystemExit(str(error))
    files = files[: args.max_images]
    if not files:
        raise SystemExit(f"no images in {args.inputs}")
    labels = read_labels(args.labels) if args.labels else None
    root = Path(args.inputs)
    pixels, targets = [], []
    for path in files:
        try:
            image, _ = read_image(path)
        except ValueError as error:
            raise SystemExit(str(error))
        pixels.append(prepare_image(image, args.resize, "bilinear", args.crop or None))
        if labels is not None:
            names = [str(path.relative_to(root)) if root.is_dir() else path.name, path.name]
            found = next((labels[n] for n in names if n in labels), None)
            if found is None:
                raise SystemExit(f"--labels {args.labels} has no label for {names[0]}")
            targets.append(found)
    images = preprocess(torch.stack(pixels).to(device), layout="NHWC")
    model = _load_model(args, device)
    report = precision_report(model, images, torch.tensor(targets) if labels is not None else None,
                              batch_size=args.batch_size, progress=not args.no_progress)
    report.update(model=args.model, weights=args.weights or ("pretrained" if args.pretrained else f"random-init (seed {args.seed})"),
                  images_from=os.path.abspath(args.inputs))
    table = format_report(report)
    print(table)
    write_json(paths["json"], report)
    write_atomically(paths["txt"], lambda tmp: Path(tmp).write_text(table + "\n"))
    written: List[str] = [paths["json"], paths["txt"]]
    if plot_report(report, paths["png"]):
        written.append(paths["png"])
    print("wrote " + ", ".join(written))
    return 0
