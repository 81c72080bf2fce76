"""``python -m bagnet_fast heatmap IMAGE_OR_DIR --out DIR``: explain images with a BagNet.

For every image: the top predicted classes, for each explained class a heatmap (.npy map, PNG
overlay in the paper's style) and the most/least indicative patches, in a JSON summary. A folder
is processed in batches with a progress bar; the run is resumable (an image whose summary and
outputs exist is skipped unless --overwrite); every file is written atomically (temporary file +
rename), so an interrupted run never leaves a truncated output. Unreadable images are reported
and skipped; the exit status is 1 if any image failed.

Data-parallel: under ``torchrun --nproc_per_node N`` every rank takes a disjoint shard of the
files (gloo on CPU, nccl on CUDA) and the ranks agree on the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import models as _models
from ._io import clean_stale_temporaries, prepare_output_dir, write_atomically, write_json
from .accelerate import bagnet_from_state_dict
from .executors import backend_names
from .explain import dense_heatmap, patch_logits, select_patches
from .plan import get_plan
from .timing import resolve_device
from .weights import file_sha256, load_checkpoint

__all__ = ["add_arguments", "main", "find_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", metavar="IMAGE_OR_DIR", help="an image file or a folder of images")
    parser.add_argument("--model", default="bagnet33", choices=sorted(_models.PATCH_SIZES))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", metavar="FILE", help="a checkpoint (state_dict) of the model")
    source.add_argument("--pretrained", action="store_true", help="the authors' ImageNet weights (downloads)")
    source.add_argument("--random-init", action="store_true",
                        help="untrained weights from --seed (for trying the tool; the explanations mean nothing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-init (default 0; recorded)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--class", dest="target_class", type=int, metavar="N", help="explain class N")
    target.add_argument("--top", type=int, default=1, metavar="K", help="explain the K top predicted classes (default 1)")
    # The summary lists this many top classes (and at least the --top K explained ones).
    parser.add_argument("--dense", action="store_true",
                        help="exact per-pixel heatmaps (shift-and-stitch) instead of the per-patch map")
    parser.add_argument("--patches", type=int, default=5, metavar="P", help="most/least indicative patches to report")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--backend", default=None, choices=backend_names(),
                        help="inference backend (default: the fastest available)")
    parser.add_argument("--overwrite", action="store_true", help="recompute images whose outputs exist")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG overlays")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def find_images(path: str, exclude: Optional[Path] = None) -> List[Path]:
    """The image files at ``path`` (a file, or a folder searched recursively), sorted; nothing
    under ``exclude`` (the output folder, when it lies inside the input folder: its overlays are
    PNGs too, and every rerun would explain them)."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"no such image or folder: {path}")
    skip = exclude.resolve() if exclude is not None else None

    def wanted(p: Path) -> bool:
        if not (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            return False
        return skip is None or not p.resolve().is_relative_to(skip)

    return sorted(p for p in root.rglob("*") if wanted(p))


def _output_stem(image: Path, root: Path, out: Path) -> Path:
    """out/<path relative to root, file name kept whole>: a.jpg and a.png do not collide."""
    relative = image.name if root.is_file() else image.relative_to(root)
    return out / relative


def read_image(path: Path) -> Tuple[torch.Tensor, List[str]]:
    """(H, W, 3) uint8 RGB and what was done to get it (recorded in the summary): the EXIF
    orientation applied, 16-bit and float pixels scaled to 8 bits. Raises ValueError naming the
    file if it cannot be decoded or its pixel values cannot be read as an image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    notes: List[str] = []
    try:
        with Image.open(path) as image:
            image.load()
            orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
            if orientation not in (None, 1):
                image = ImageOps.exif_transpose(image)
                notes.append(f"EXIF orientation {orientation} applied")
            pixels = _to_uint8(image, notes)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    except _UnreadablePixels as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    return torch.from_numpy(pixels), notes


class _UnreadablePixels(ValueError):
    pass


def _to_uint8(image, notes: List[str]) -> np.ndarray:
    """8-bit RGB pixels of a PIL image. PIL's own convert("RGB") clips 16-bit values (mode I;16,
    I) to 255 and truncates floats (mode F), which turns such images white or black."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise _UnreadablePixels(f"{mode} pixels in [{values.min():g}, {values.max():g}] are not 16-bit values")
        notes.append(f"{mode} (16-bit grayscale) scaled by 255/65535")
        return _gray_to_rgb(np.rint(values * (255.0 / 65535.0)))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        if not np.isfinite(values).all() or low < 0 or high > 255:
            raise _UnreadablePixels(f"float pixels in [{low:g}, {high:g}] (or not finite): convert the image "
                                    f"to 8 bits with the scaling you mean")
        scale = 255.0 if high <= 1.0 else 1.0
        notes.append("float (mode F) pixels in [0, 1] scaled by 255" if scale == 255.0
                     else "float (mode F) pixels in [0, 255] rounded")
        return _gray_to_rgb(np.rint(values * scale))
    if mode != "RGB":
        notes.append(f"{mode} converted to RGB")
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8, copy=True)


def _gray_to_rgb(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[:, :, None], 3, axis=2)


def _normalise(images: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> the authors' preprocessing: RGB/255, ImageNet mean/std, (N, 3, H, W)."""
    from .preprocessing import preprocess  # the fused op: one read, one write

    return preprocess(images.to(device), dtype=dtype, layout="NHWC")


# --- atomic outputs --------------------------------------------------------------------------


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(str(path), data)


def _write_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, array)

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(str(path), write)


def _summary(summary_path: Path) -> Optional[dict]:
    """An image's summary if it is complete (written last, and every output it lists exists)."""
    try:
        summary = json.loads(summary_path.read_text())
        outputs = [e[key] for e in summary["explained"] for key in ("map", "png") if e.get(key)]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return summary if all((summary_path.parent / name).exists() for name in outputs) else None


def run_configuration(args) -> dict:
    """What an image's outputs depend on, recorded in its summary: a rerun with other options
    must not count the old outputs as done."""
    return {"model": args.model, "dense": bool(args.dense), "class": args.target_class,
            "top": None if args.target_class is not None else args.top, "patches": args.patches,
            "plot": not args.no_plot, "weights": weights_configuration(args)}


def weights_configuration(args):
    """The record of where the weights came from: the file and its sha256, "pretrained", or the
    --random-init seed (shared by the CLIs that resume)."""
    if args.weights:
        return {"file": os.path.abspath(args.weights), "sha256": _sha256(args.weights)}
    if args.pretrained:
        return "pretrained"
    return {"random_init_seed": args.seed}


def _sha256(path: str) -> Optional[str]:
    try:
        return file_sha256(path)
    except OSError:
        return None  # reported when the checkpoint is loaded


def _differences(old: Optional[dict], new: dict) -> List[str]:
    if old is None:
        return ["no recorded configuration (written by an older bagnet_fast)"]
    return [f"{key}: {old.get(key)!r} -> {new[key]!r}" for key in new if old.get(key) != new[key]]


# --- the work --------------------------------------------------------------------------------


def _load_model(args, device: torch.device) -> torch.nn.Module:
    if args.weights:
        # The checkpoint says the architecture (and the number of classes); --model must agree.
        try:
            model = bagnet_from_state_dict(load_checkpoint(args.weights))
        except (OSError, ValueError, RuntimeError) as error:
            raise SystemExit(f"cannot load --weights {args.weights}: {error}")
        if model.patch_size != _models.PATCH_SIZES[args.model]:
            raise SystemExit(f"--weights {args.weights} holds a BagNet with patch size {model.patch_size}, "
                             f"not {args.model} (patch size {_models.PATCH_SIZES[args.model]}): pass the right --model")
    else:
        torch.manual_seed(args.seed)  # --random-init: the same model in every rank and rerun
        model = getattr(_models, args.model)(pretrained=args.pretrained)
    model = model.to(device).eval()
    if args.backend:
        model.backend = args.backend
    return model


def _explain_group(model, images: torch.Tensor, args) -> List[Dict]:
    """Results for a batch of same-size images: predictions, maps, top patches."""
    logits = model(images).float()
    probabilities = torch.softmax(logits, dim=1)
    # The summary lists the top 5 classes, or the K explained ones when --top K asks for more.
    explained = 1 if args.target_class is not None else min(args.top, logits.shape[1])
    ranked = logits.topk(min(max(5, explained), logits.shape[1]), dim=1).indices
    if args.target_class is not None:
        targets = torch.full((len(images), 1), args.target_class, dtype=torch.long, device=logits.device)
    else:
        targets = ranked[:, :explained]
    plan = get_plan(model)
    coarse = patch_logits(model, images)  # the patch map, and the patches to report
    results = []
    for n in range(len(images)):
        results.append({
            "top_classes": [
                {"class": int(c), "logit": float(logits[n, c]), "probability": float(probabilities[n, c])}
                for c in ranked[n]
            ],
            "maps": [],
        })
    if args.dense:  # (N, T, H, W): all classes from one shift-and-stitch evaluation
        maps = dense_heatmap(model, images, targets)
    else:  # (N, T, H', W')
        index = targets.view(-1, 1, 1, targets.shape[1]).expand(*coarse.values.shape[:3], -1)
        maps = coarse.values.gather(-1, index).permute(0, 3, 1, 2)
    for n in range(len(images)):
        for column in range(targets.shape[1]):
            target = int(targets[n, column])
            patches = select_patches(coarse.values[n, ..., target], coarse.boxes, args.patches, target, non_overlapping=True)
            results[n]["maps"].append((target, maps[n, column].float().cpu(), patches))
    for result in results:
        result["patch_size"] = plan.patch_size
        result["stride"] = plan.stride
    return results


def _save(result: Dict, image_uint8: torch.Tensor, stem: Path, args) -> None:
    explained = []
    for target, evidence, patches in result["maps"]:
        map_path = Path(f"{stem}.class{target}.npy")
        _write_npy(map_path, evidence.numpy())
        entry = {"class": target, "kind": "dense" if args.dense else "patch", "map": map_path.name,
                 "map_shape": list(evidence.shape), **patches.to_dict()}
        if not args.no_plot:
            png_path = Path(f"{stem}.class{target}.png")
            _plot(evidence, image_uint8, patches, result, target, png_path, args)
            entry["png"] = png_path.name
        explained.append(entry)
    height, width = image_uint8.shape[:2]
    summary = {
        "image": str(result["path"]), "size": [height, width], "model": args.model,
        "weights": args.weights or ("pretrained" if args.pretrained else f"random-init (seed {args.seed})"),
        "configuration": result["configuration"], "conversions": result["conversions"],
        "patch_size": result["patch_size"], "stride": result["stride"],
        "map_convention": (
            "dense: value at pixel (y, x) = logit of the patch centred there (zero padding)"
            if args.dense else
            "patch: value at (i, j) = logit of the patch with pixel box rows [stride*i, stride*i + q), same for columns"
        ),
        "top_classes": result["top_classes"], "explained": explained,
    }
    _write_json(Path(f"{stem}.json"), summary)  # last: marks the image as done


def _plot(evidence, image_uint8, patches, result, target, path: Path, args) -> None:
    from .plotting import plot_heatmap, save_heatmap_png

    rgb = image_uint8.numpy().astype(np.float32) / 255.0
    extent = None
    if not args.dense:  # patch map: centre of patch (i, j) at stride*i + (q-1)/2
        q, stride = result["patch_size"], result["stride"]
        rows, cols = evidence.shape
        first = (q - 1) / 2
        extent = (first - stride / 2, first + (cols - 0.5) * stride, first + (rows - 0.5) * stride, first - stride / 2)
    figure = plot_heatmap(
        evidence, rgb, extent=extent,
        boxes_most=patches.most_boxes.tolist(), boxes_least=patches.least_boxes.tolist(),
        title=f"class {target}: {'dense' if args.dense else 'patch'} evidence",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_heatmap_png(figure, str(path))


def _distributed() -> Tuple[int, int]:
    """(rank, world size); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _device(args, rank: int) -> torch.device:
    if args.device:
        return resolve_device(args.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device("cpu")


def _groups_by_size(items: Sequence[Tuple[Path, torch.Tensor, List[str]]]):
    groups: Dict[Tuple[int, int], List] = {}
    for item in items:
        groups.setdefault(tuple(item[1].shape[:2]), []).append(item)
    return groups.values()


def _check_arguments(args) -> None:
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    if args.top < 1:
        raise SystemExit("--top must be >= 1")
    if args.patches < 1:
        raise SystemExit("--patches must be >= 1")
    if args.device:
        resolve_device(args.device)


def _to_do(shard: List[Path], root: Path, out: Path, config: dict, args) -> List[Path]:
    """The images of this rank that need work. Outputs made with other options are not "done":
    the run stops, saying which options differ, unless --overwrite recomputes them."""
    todo, conflicts = [], {}
    for path in shard:
        summary = None if args.overwrite else _summary(Path(f"{_output_stem(path, root, out)}.json"))
        if summary is None:
            todo.append(path)
        elif summary.get("configuration") != config:
            conflicts.setdefault("; ".join(_differences(summary.get("configuration"), config)), []).append(path)
    if conflicts:
        lines = [f"  {len(paths)} image(s), e.g. {paths[0]}: {why}" for why, paths in conflicts.items()]
        raise SystemExit(f"{out} holds outputs made with other options:\n" + "\n".join(lines) +
                         "\npass --overwrite to recompute them, or choose another --out")
    return todo


def main(args) -> int:
    _check_arguments(args)
    rank, world = _distributed()
    device = _device(args, rank)
    root = Path(args.inputs)
    out = prepare_output_dir(args.out)
    try:
        files = find_images(args.inputs, exclude=out)
    except FileNotFoundError as error:
        raise SystemExit(str(error))
    if rank == 0:
        clean_stale_temporaries(out)  # what killed runs left
    model = _load_model(args, device)
    classes = model.fc.weight.shape[0]
    if args.target_class is not None and not 0 <= args.target_class < classes:
        raise SystemExit(f"--class must be in [0, {classes}) for this model, got {args.target_class}")
    config = run_configuration(args)
    shard = files[rank::world]
    todo = _to_do(shard, root, out, config, args)
    skipped = len(shard) - len(todo)
    failures: List[str] = []
    done = 0
    bar = _progress_bar(len(todo), args.no_progress or rank != 0 and world > 1)
    try:
        with torch.inference_mode():
            for start in range(0, len(todo), args.batch_size):
                batch_files = todo[start : start + args.batch_size]
                readable = []
                for path in batch_files:
                    try:
                        readable.append((path, *read_image(path)))
                    except ValueError as error:
                        failures.append(str(error))
                        print(f"error: {error}", file=sys.stderr)
                for group in _groups_by_size(readable):
                    failed = _process_group(model, group, root, out, device, config, args)
                    failures += failed
                    done += len(group) - len(failed)
                bar.update(len(batch_files))
    except KeyboardInterrupt:
        bar.close()
        print(f"\nheatmap: interrupted; {done} image(s) explained in this run{' by this rank' if world > 1 else ''}, "
              f"{skipped} done before. Rerun the same command to resume.", file=sys.stderr)
        return 130
    bar.close()
    # Every rank takes part in the same reductions, in the same order.
    failed, attempted, already = (_total(value, world, device) for value in (len(failures), len(todo), skipped))
    if rank == 0:
        print(f"heatmap: {attempted - failed} image(s) explained, {already} already done, "
              f"{failed} failed; outputs in {out}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 1 if failed else 0


def _process_group(model, group, root: Path, out: Path, device, config: dict, args) -> List[str]:
    paths = [path for path, _, _ in group]
    images_uint8 = torch.stack([image for _, image, _ in group])
    try:
        images = _normalise(images_uint8, model.fc.weight.dtype, device)
        results = _explain_group(model, images, args)
    except (ValueError, RuntimeError) as error:
        for path in paths:
            print(f"error: {path}: {error}", file=sys.stderr)
        return [f"{path}: {error}" for path in paths]
    for (path, image, notes), result in zip(group, results):
        result.update(path=path, configuration=config, conversions=notes)
        _save(result, image, _output_stem(path, root, out), args)
    return []


def _total(value: int, world: int, device: torch.device) -> int:
    """The sum of ``value`` over all ranks (the value itself without torchrun)."""
    if world <= 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.long, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return int(tensor.item())


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, disabled: bool, desc: str = "heatmap"):
    if disabled or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img")
