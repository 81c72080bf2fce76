"""``python -m bagnet_fast certify DATA_DIR --out DIR``: certified accuracy of a BagNet under the
PatchGuard family of patch defences, for one or more patch sizes.

DATA_DIR has the ImageFolder layout (DATA_DIR/<class>/<image>, classes numbered in sorted
order, as torchvision's ImageFolder and the defence papers' scripts number them). Images are
prepared as in those scripts (``--preprocessing imagenet``: Resize 256 (bilinear), CenterCrop 224,
the ImageNet mean/std; ``cifar``: Resize 192 (bicubic), the CIFAR-10 mean/std; ``--resize`` and
``--crop`` change the sizes), run through the model once, and that one evidence map serves
every ``--patch-size``.

Outputs in --out: ``certify.csv`` (one row per image: path, label, clean prediction, and per
patch size the defended prediction and the code 0 = clean prediction wrong, 1 = an attack may
succeed, 2 = certified), ``summary.json`` (clean accuracy, and per patch size the window, the
defended clean accuracy, the certified accuracy and the code breakdown), and
``certified_accuracy.png`` (certified and defended clean accuracy vs patch size).

Resumable: results are saved in parts (``parts/part-*.csv``, each written atomically) every
--save-every images and on Ctrl-C; a rerun with the same options certifies only the images not
yet done, and refuses other options unless --overwrite. Unreadable images are reported and
skipped (exit status 1). Under ``torchrun --nproc_per_node N`` every rank takes a disjoint shard
(gloo on CPU, nccl on CUDA); rank 0 merges the parts and writes the summary.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import certify as cf
from . import models as _models
from ._io import clean_stale_temporaries, matplotlib_figure, prepare_output_dir, save_png, write_atomically, write_json
from .explain import patch_logits
from .heatmap_cli import (
    _device,
    _distributed,
    _groups_by_size,
    _load_model,
    _progress_bar,
    _total,
    find_images,
    read_image,
    weights_configuration,
)
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, preprocess

__all__ = ["add_arguments", "main", "image_folder", "prepare_image", "transform", "summarize", "PRESETS"]

# The defence papers' evaluation transforms (PatchGuard's mask_bn.py / det_bn.py get_dataset):
# (resize of the shorter side, PIL filter, centre crop or None, mean, std).
PRESETS = {
    "imagenet": (256, "bilinear", 224, IMAGENET_MEAN, IMAGENET_STD),
    "cifar": (192, "bicubic", None, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}
DEFENSES = ("masking", "cbn", "clip", "detection")
_FIELDS = ("path", "label", "clean_prediction")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA_DIR", help="ImageFolder layout: DATA_DIR/<class>/<image>")
    parser.add_argument("--model", default="bagnet17", choices=sorted(_models.PATCH_SIZES))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", metavar="FILE",
                        help="a checkpoint: plain or DataParallel state_dict, or under 'state_dict', "
                             "'model_state_dict' or 'net' (any number of classes)")
    source.add_argument("--pretrained", action="store_true", help="the authors' ImageNet weights (downloads)")
    source.add_argument("--random-init", action="store_true",
                        help="untrained weights from --seed (for trying the tool; the numbers mean nothing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-init (default 0; recorded)")
    parser.add_argument("--patch-size", type=int, action="append", required=True, metavar="PX",
                        help="side of the square adversarial patch in pixels; repeat for several sizes")
    parser.add_argument("--defense", required=True, choices=DEFENSES,
                        help="masking: PatchGuard robust masking; cbn: Clipped BagNet (tanh); clip: clipping "
                             "to [0, --clip]; detection: PatchGuard++")
    parser.add_argument("--threshold", type=float, default=0.0, metavar="T",
                        help="masking: the detection threshold T in [0, 1) (default 0)")
    parser.add_argument("--clip", type=float, default=None, metavar="C",
                        help="masking: clip the evidence to [0, C] (default [0, inf)); clip: required")
    parser.add_argument("--tau", type=float, default=None, help="detection: the confidence threshold (required)")
    parser.add_argument("--sound", action="store_true",
                        help="cbn/clip: check every class, not only the runner-up (the reference's check)")
    parser.add_argument("--preprocessing", default="imagenet", choices=sorted(PRESETS),
                        help="imagenet (ImageNet, ImageNette): Resize 256, CenterCrop 224; cifar: Resize 192 bicubic")
    parser.add_argument("--resize", type=int, default=None, metavar="S",
                        help="resize the shorter side to S instead of the preset's")
    parser.add_argument("--crop", type=int, default=None, metavar="S",
                        help="centre crop S x S instead of the preset's (0: no crop)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--save-every", type=int, default=256, metavar="N",
                        help="save the results every N images (default 256)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--backend", default=None, help="inference backend (default: the fastest available)")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# --- data ------------------------------------------------------------------------------------


def image_folder(root: str, exclude: Optional[Path] = None) -> Tuple[List[str], List[Tuple[Path, int]]]:
    """(class names, [(image path, label)]) of an ImageFolder tree: one sub-folder per class,
    numbered in sorted order; the images of each class found recursively, sorted."""
    folder = Path(root)
    if not folder.is_dir():
        raise SystemExit(f"DATA_DIR {root} is not a folder")
    skip = exclude.resolve() if exclude is not None else None
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and (skip is None or p.resolve() != skip))
    if not classes:
        raise SystemExit(f"DATA_DIR {root} has no class folders: expected the ImageFolder layout "
                         f"DATA_DIR/<class>/<image> (the class of an image is its folder)")
    items = [(path, label) for label, name in enumerate(classes) for path in find_images(str(folder / name), exclude=exclude)]
    if not items:
        raise SystemExit(f"DATA_DIR {root} has class folders but no images in them")
    return classes, items


def transform(args) -> Tuple[int, str, Optional[int], Tuple[float, ...], Tuple[float, ...]]:
    """(resize, filter, crop or None, mean, std): the preset with --resize / --crop applied."""
    size, method, crop, mean, std = PRESETS[args.preprocessing]
    if args.resize is not None:
        size = args.resize
    if args.crop is not None:
        crop = args.crop or None
    return size, method, crop, mean, std


def prepare_image(pixels: torch.Tensor, size: int, method: str = "bilinear", crop: Optional[int] = None) -> torch.Tensor:
    """(H, W, 3) uint8 -> resized and cropped uint8, as torchvision's ``Resize(size)`` and
    ``CenterCrop(crop)`` do on a PIL image: the shorter side to ``size``, the longer one to
    int(size * long / short), PIL's ``method`` filter; the crop's offsets rounded."""
    from PIL import Image

    image = Image.fromarray(pixels.numpy())
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[method]
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), resample)
    if crop is not None:
        if crop > min(new_width, new_height):
            raise ValueError(f"{crop} x {crop} crop of a {new_height} x {new_width} image")
        top, left = int(round((new_height - crop) / 2.0)), int(round((new_width - crop) / 2.0))
        image = image.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


# --- configuration, parts, resume ------------------------------------------------------------


def _check_arguments(args) -> None:
    if args.batch_size < 1 or args.save_every < 1:
        raise SystemExit("--batch-size and --save-every must be >= 1")
    if (args.resize is not None and args.resize < 1) or (args.crop is not None and args.crop < 0):
        raise SystemExit("--resize must be >= 1 and --crop >= 0")
    size, _, crop, _, _ = transform(args)
    if crop is not None and crop > size:
        raise SystemExit(f"--crop {crop} is larger than the resized shorter side {size}")
    sizes = args.patch_size
    if any(p < 1 for p in sizes) or len(set(sizes)) != len(sizes):
        raise SystemExit(f"--patch-size: positive and distinct sizes, got {sizes}")
    defense = args.defense
    if defense == "masking" and not 0.0 <= args.threshold < 1.0:
        raise SystemExit(f"--threshold must be in [0, 1), got {args.threshold}")
    if defense != "masking" and args.threshold != 0.0:
        raise SystemExit("--threshold is for --defense masking")
    if defense == "clip" and args.clip is None:
        raise SystemExit("--defense clip needs --clip C (the evidence is clipped to [0, C])")
    if args.clip is not None and (defense in ("cbn", "detection") or not 0.0 < args.clip < float("inf")):
        raise SystemExit("--clip C > 0 is for --defense masking or clip")
    if (defense == "detection") != (args.tau is not None):
        raise SystemExit("--tau is required by --defense detection and only used by it")
    if args.tau is not None and not 0.0 <= args.tau <= 1.0:
        raise SystemExit(f"--tau must be in [0, 1], got {args.tau}")
    if args.sound and defense not in ("cbn", "clip"):
        raise SystemExit("--sound is for --defense cbn or clip")


def run_configuration(args) -> Dict:
    """What the results depend on: a rerun with other values must not mix its rows with these."""
    size, method, crop, mean, std = transform(args)
    config = {"model": args.model, "defense": args.defense, "patch_sizes": list(args.patch_size),
              "preprocessing": {"preset": args.preprocessing, "resize": size, "filter": method, "crop": crop,
                                "mean": list(mean), "std": list(std)}}
    config.update({"masking": {"threshold": args.threshold, "clip": args.clip},
                   "clip": {"clip": args.clip, "sound": args.sound}, "cbn": {"sound": args.sound},
                   "detection": {"tau": args.tau}}[args.defense])
    config["weights"] = weights_configuration(args)
    return config


def _columns(sizes: Sequence[int]) -> List[str]:
    return list(_FIELDS) + [f"{kind}_{p}px" for p in sizes for kind in ("defended", "code")]


def _read_parts(parts: Path, columns: List[str]) -> Dict[str, Dict[str, str]]:
    """Rows of every saved part, by image path. Parts are written atomically: each is whole."""
    rows: Dict[str, Dict[str, str]] = {}
    for part in sorted(parts.glob("part-*.csv")):
        with open(part, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != columns:
                raise SystemExit(f"{part} has columns {reader.fieldnames}, not {columns}: pass --overwrite")
            rows.update((row["path"], row) for row in reader)
    return rows


def _write_csv(path: Path, columns: List[str], rows: Sequence[Dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(str(path), lambda tmp: Path(tmp).write_text(text.getvalue()))


def _save_part(parts: Path, columns: List[str], rows: List[Dict]) -> None:
    if rows:
        name = hashlib.sha1("\n".join(row["path"] for row in rows).encode()).hexdigest()[:16]
        _write_csv(parts / f"part-{name}.csv", columns, rows)
        rows.clear()


def _check_recorded(out: Path, config: Dict, args, rank: int, world: int, device: torch.device) -> None:
    """Stop (before any work) if --out holds results made with other options, unless
    --overwrite. Rank 0 decides; the others wait for it."""
    conflict = ""
    if rank == 0 and not args.overwrite:
        try:
            recorded = json.loads((out / "parts" / "configuration.json").read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded is not None and recorded != config:
            changed = "; ".join(f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in config.items() if recorded.get(k) != v)
            conflict = (f"{out} holds results made with other options ({changed}): pass --overwrite to "
                        f"discard them, or choose another --out")
    if _total(int(bool(conflict)), world, device):  # a collective: the other ranks wait here
        raise SystemExit(conflict or 2)


def _start_parts(out: Path, config: Dict, args, rank: int, world: int, device: torch.device) -> Path:
    """parts/ with this run's configuration recorded (earlier parts discarded with --overwrite)."""
    parts = out / "parts"
    if rank == 0:
        if args.overwrite and parts.exists():
            shutil.rmtree(parts)
        parts.mkdir(exist_ok=True)
        clean_stale_temporaries(out)  # what killed runs left
        write_json(str(parts / "configuration.json"), config)
    _total(0, world, device)  # the other ranks read parts/ only once rank 0 is done with it
    return parts


# --- the work --------------------------------------------------------------------------------



def _certify_group(model, group, args, root: Path) -> List[Dict]:
    """CSV rows for a batch of same-size prepared images: one forward pass, every patch size."""
    _, _, _, mean, std = transform(args)
    images_uint8 = torch.stack([image for _, image, _ in group])
    device = model.fc.weight.device
    images = preprocess(images_uint8.to(device), mean=mean, std=std, dtype=model.fc.weight.dtype, layout="NHWC")
    evidence = patch_logits(model, images)
    logits = evidence.values.float()
    labels = torch.tensor([label for _, _, label in group], device=logits.device)
    rows = [{"path": path.relative_to(root).as_posix(), "label": label} for path, _, label in group]
    for row, clean in zip(rows, cf.undefended_prediction(logits).tolist()):
        row["clean_prediction"] = clean
    for size in args.patch_size:
        window = cf.window_size(size, evidence.patch_size, evidence.stride)
        result = _defend(logits, labels, window, args)
        for row, defended, code in zip(rows, result.prediction.tolist(), result.certified.tolist()):
            row[f"defended_{size}px"], row[f"code_{size}px"] = defended, code
    return rows


def _defend(logits, labels, window, args) -> cf.CertifyResult:
    if args.defense == "masking":
        return cf.masking(logits, labels, window, clip=args.clip, threshold=args.threshold)
    if args.defense == "detection":
        return cf.detection(logits, labels, window, args.tau)
    return cf.clipping(logits, labels, window, clip=args.clip if args.defense == "clip" else None, sound=args.sound)


def _check_geometry(model, args) -> None:
    """Every window must fit in the map of a square image of the prepared size (the crop, or
    the resized shorter side): say so before any work."""
    size, _, crop, _, _ = transform(args)
    side = crop or size
    with torch.inference_mode():
        probe = patch_logits(model, torch.zeros(1, 3, side, side, device=model.fc.weight.device, dtype=model.fc.weight.dtype))
    cells = probe.values.shape[1]
    for p in args.patch_size:
        w = cf.window_size(p, probe.patch_size, probe.stride)
        if w > cells:
            raise SystemExit(f"--patch-size {p}: a {w} x {w}-cell window (q = {probe.patch_size}, stride "
                             f"{probe.stride}) is larger than the {cells} x {cells} map of a {side} x {side} image")


def main(args) -> int:
    _check_arguments(args)
    rank, world = _distributed()
    device = _device(args, rank)
    out = prepare_output_dir(args.out)
    classes, items = image_folder(args.data, exclude=out)
    root = Path(args.data)
    config = run_configuration(args)
    _check_recorded(out, config, args, rank, world, device)  # before loading the model: fail fast
    model = _load_model(args, device)
    num_classes = model.fc.weight.shape[0]
    if len(classes) > num_classes:
        raise SystemExit(f"DATA_DIR has {len(classes)} class folders but the model {num_classes} classes")
    if len(classes) != num_classes and rank == 0:
        print(f"note: {len(classes)} class folders, {num_classes} model classes: folder k (sorted) is class k",
              file=sys.stderr)
    _check_geometry(model, args)
    parts = _start_parts(out, config, args, rank, world, device)
    columns = _columns(args.patch_size)
    done = _read_parts(parts, columns)
    shard = items[rank::world]
    todo = [(path, label) for path, label in shard if path.relative_to(root).as_posix() not in done]
    failures: List[str] = []
    pending: List[Dict] = []
    bar = _progress_bar(len(todo), args.no_progress or rank != 0 and world > 1, "certify")
    started, certified = time.perf_counter(), 0
    try:
        with torch.inference_mode():
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start : start + args.batch_size]
                prepared = []
                for path, label in batch:
                    try:
                        pixels, _ = read_image(path)
                        prepared.append((path, prepare_image(pixels, *transform(args)[:3]), label))
                    except ValueError as error:
                        failures.append(str(error))
                        print(f"error: {error}", file=sys.stderr)
                for group in _groups_by_size(prepared):
                    try:
                        pending += _certify_group(model, group, args, root)
                        certified += len(group)
                    except (ValueError, RuntimeError) as error:
                        for path, _, _ in group:
                            failures.append(f"{path}: {error}")
                            print(f"error: {path}: {error}", file=sys.stderr)
                if len(pending) >= args.save_every:
                    _save_part(parts, columns, pending)
                bar.update(len(batch))
    except KeyboardInterrupt:
        _save_part(parts, columns, pending)
        bar.close()
        print(f"\ncertify: interrupted; {certified} image(s) certified in this run were saved. "
              f"Rerun the same command to resume.", file=sys.stderr)
        return 130
    _save_part(parts, columns, pending)
    bar.close()
    seconds = time.perf_counter() - started
    failed, attempted, already = (_total(value, world, device) for value in (len(failures), len(todo), len(shard) - len(todo)))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank's parts are saved before rank 0 merges them
    if rank == 0:
        _write_outputs(out, parts, columns, items, root, classes, config, args,
                       {"images": attempted - failed, "seconds": seconds, "ranks": world})
        print(f"certify: {attempted - failed} image(s) certified, {already} already done, {failed} failed; "
              f"outputs in {out}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 1 if failed else 0


# --- outputs ---------------------------------------------------------------------------------


def _write_outputs(out: Path, parts: Path, columns, items, root: Path, classes, config, args, this_run) -> None:
    """certify.csv (rows in dataset order), summary.json and the plot, from every saved part."""
    saved = _read_parts(parts, columns)
    rows = [saved[key] for key in (path.relative_to(root).as_posix() for path, _ in items) if key in saved]
    _write_csv(out / "certify.csv", columns, rows)
    summary = summarize(rows, args.patch_size, args.defense)
    summary.update(configuration=config, classes=len(classes), images_in_data=len(items),
                   missing=len(items) - len(rows), this_run=this_run, command=sys.argv)
    write_json(str(out / "summary.json"), summary)
    if not args.no_plot and rows:
        _plot(summary, out / "certified_accuracy.png", args)


def summarize(rows: Sequence[Dict], sizes: Sequence[int], defense: str) -> Dict:
    """Accuracies and the code breakdown per patch size from certify.csv rows. Certified
    accuracy = count(code 2) / N (every image counts; none is dropped for a missing code)."""
    n = len(rows)
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    fraction = (lambda k: float(k) / n) if n else (lambda k: 0.0)
    clean = np.array([int(r["clean_prediction"]) for r in rows], dtype=np.int64)
    summary = {"defense": defense, "images": n, "clean_accuracy": fraction(np.sum(clean == labels)), "patch_sizes": {}}
    for size in sizes:
        defended = np.array([int(r[f"defended_{size}px"]) for r in rows], dtype=np.int64)
        codes = np.array([int(r[f"code_{size}px"]) for r in rows], dtype=np.int64)
        counts = {str(c): int(np.sum(codes == c)) for c in (cf.CLEAN_WRONG, cf.VULNERABLE, cf.CERTIFIED)}
        entry = {"defended_clean_accuracy": fraction(np.sum(defended == labels)),
                 "certified_accuracy": fraction(counts[str(cf.CERTIFIED)]), "codes": counts,
                 "code_fractions": {k: fraction(v) for k, v in counts.items()}}
        if defense == "detection":
            entry["alert_rate"] = fraction(np.sum(defended == cf.ALERT))
        summary["patch_sizes"][str(size)] = entry
    return summary


def _plot(summary: Dict, path: Path, args) -> None:
    figure = matplotlib_figure((5.0, 3.5))
    if figure is None:
        return
    sizes = [int(p) for p in summary["patch_sizes"]]
    order = np.argsort(sizes)
    ax = figure.add_subplot()
    for key, label, marker in (("certified_accuracy", "certified", "o"), ("defended_clean_accuracy", "clean (defended)", "s")):
        values = [100 * summary["patch_sizes"][str(sizes[i])][key] for i in order]
        ax.plot([sizes[i] for i in order], values, marker=marker, label=label)
    ax.axhline(100 * summary["clean_accuracy"], color="grey", linestyle="--", linewidth=1, label="clean (undefended)")
    ax.set_xlabel("patch size (pixels)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{args.model}, {args.defense}, {summary['images']} images", fontsize=9)
    ax.legend(fontsize=8)
    save_png(figure, str(path))
