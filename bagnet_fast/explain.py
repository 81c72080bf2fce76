"""Explanations of BagNet decisions: patch evidence, exact dense heatmaps, top patches, masking.

Every function runs the model's inference plan (any device and backend) and computes exactly
what the reference computes, float rounding aside:

- :func:`patch_logits` / :func:`patch_features`: the evidence of every q x q patch on the model's
  output grid (stride 8), with the pixel box of each patch — one forward pass.
- :func:`dense_heatmap`: the reference heatmap convention (BAGNET_SPEC.md): zero-pad the image by
  (q-1)//2 top/left and q-1-(q-1)//2 bottom/right, value at pixel (y, x) = the target logit of the
  patch centred there. The reference cuts out all H*W patches and runs each one (20.4 TFLOP for a
  224x224 BagNet-33 image). Here the network runs once per *shift*, hierarchically
  ("shift-and-stitch"): the stride-1 stem runs once; each stride-2 block runs at both phases of
  each axis of its input, so the k-th strided stage runs 4**k times on ever smaller maps. Every
  output pixel is then computed exactly once (about 1.8 TFLOP for 224x224 BagNet-33) and the
  result is the same function because valid convolutions and top-left crops commute with shifts.
- :func:`top_patches`, :func:`mask_patches`, :func:`masking_experiment`: the paper's analysis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._plan_state import dispatch_problem
from .plan import InferencePlan, check_input, check_model_input_match, get_plan
from .preprocessing import heatmap_padding

__all__ = [
    "PatchMap",
    "TopPatches",
    "patch_logits",
    "patch_features",
    "patch_boxes",
    "dense_heatmap",
    "top_patches",
    "select_patches",
    "mask_patches",
    "masking_experiment",
]

Target = Union[int, Sequence[int], torch.Tensor]


@dataclass
class PatchMap:
    """Per-patch values on the model's output grid.

    values: (N, H', W', C) — logits (C classes, or the selected ``classes``) or features.
    boxes: (H', W', 4) int64 pixel boxes (top, left, bottom, right), bottom/right exclusive:
        position (i, j) sees input rows [stride*i, stride*i + q) and the same for columns.
    """

    values: torch.Tensor
    boxes: torch.Tensor
    patch_size: int
    stride: int
    classes: Optional[torch.Tensor] = None

    def box(self, i: int, j: int) -> Tuple[int, int, int, int]:
        return tuple(int(v) for v in self.boxes[i, j])


@dataclass
class TopPatches:
    """The k most and least indicative patches of one image for ``target``.

    boxes: (k, 4) int64 (top, left, bottom, right), exclusive; scores: (k,) logits of ``target``
    for those patches; positions: (k, 2) grid positions (i, j). ``most`` sorted by decreasing
    score, ``least`` by increasing score.
    """

    target: int
    most_boxes: torch.Tensor
    most_scores: torch.Tensor
    most_positions: torch.Tensor
    least_boxes: torch.Tensor
    least_scores: torch.Tensor
    least_positions: torch.Tensor

    def to_dict(self) -> Dict[str, object]:
        def rows(boxes, scores):
            return [{"box": [int(v) for v in b], "score": float(s)} for b, s in zip(boxes, scores)]

        return {
            "target": self.target,
            "most_indicative": rows(self.most_boxes, self.most_scores),
            "least_indicative": rows(self.least_boxes, self.least_scores),
        }


# --- model and input checks ------------------------------------------------------------------


def _inference_model(model: nn.Module) -> nn.Module:
    """The BagNet-architecture module inside ``model`` (DataParallel unwrapped), in eval mode."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    missing = [name for name in ("conv1", "conv2", "bn1", "layer1", "layer4", "fc") if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"expected a BagNet (bagnet_fast.bagnet9/17/33 or a module with the same structure), "
            f"got {type(model).__name__} without {', '.join(missing)}"
        )
    if model.training:
        raise ValueError(
            "explanations use the model's inference function (BatchNorm running statistics): "
            "call model.eval() first"
        )
    return model


def _plan_for(model: nn.Module, images: torch.Tensor, min_size: Optional[int] = None) -> InferencePlan:
    model = _inference_model(model)
    problem = dispatch_problem(model)
    if problem is not None and problem[0] == "mode":
        raise ValueError(f"explanations use the model's inference function, but {problem[1]}: call model.eval()")
    plan = get_plan(model)
    check_input(images, plan.patch_size if min_size is None else min_size)
    check_model_input_match(model, images)
    return plan


def patch_boxes(rows: int, cols: int, patch_size: int, stride: int, device=None) -> torch.Tensor:
    """(rows, cols, 4) int64 boxes (top, left, bottom, right) of the patches on an output grid."""
    top = torch.arange(rows, device=device) * stride
    left = torch.arange(cols, device=device) * stride
    top, left = torch.meshgrid(top, left, indexing="ij")
    return torch.stack([top, left, top + patch_size, left + patch_size], dim=-1)


def _class_index(classes, num_classes: int, device) -> Optional[torch.Tensor]:
    if classes is None:
        return None
    index = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if index.numel() == 0:
        raise ValueError("classes is empty")
    bad = index[(index < 0) | (index >= num_classes)]
    if bad.numel():
        raise ValueError(f"class indices must be in [0, {num_classes}), got {bad.tolist()}")
    return index.to(device)


# --- patch evidence --------------------------------------------------------------------------


@torch.no_grad()
def patch_logits(model: nn.Module, images: torch.Tensor, classes: Optional[Sequence[int]] = None) -> PatchMap:
    """Logits of every q x q patch: values (N, H', W', K), or (..., len(classes)) for ``classes``.

    The mean of ``values`` over H' and W' is the model's avg_pool logits (the head is linear).
    """
    plan = _plan_for(model, images)
    index = _class_index(classes, plan.fc_weight.shape[0], plan.device)
    values = plan.run(images, avg_pool=False) if index is None else plan.patch_logits(images, index)
    return _patch_map(plan, values, index)


@torch.no_grad()
def patch_features(model: nn.Module, images: torch.Tensor) -> PatchMap:
    """The 2048-d feature vector of every q x q patch: values (N, H', W', 2048)."""
    plan = _plan_for(model, images)
    values = plan.features(images).permute(0, 2, 3, 1)
    return _patch_map(plan, values, None)


def _patch_map(plan: InferencePlan, values: torch.Tensor, index: Optional[torch.Tensor]) -> PatchMap:
    boxes = patch_boxes(values.shape[1], values.shape[2], plan.patch_size, plan.stride, device=values.device)
    return PatchMap(values, boxes, plan.patch_size, plan.stride, index)


# --- dense heatmaps --------------------------------------------------------------------------


def _targets(target: Target, count: int, num_classes: int, device) -> torch.Tensor:
    """(count, T) class indices from an int, one class per image (count,), or (count, T)."""
    if isinstance(target, bool):
        raise TypeError("target must be a class index or one per image, not a bool")
    if isinstance(target, int):
        targets = torch.full((count, 1), target, dtype=torch.long)
    else:
        targets = torch.as_tensor(target)
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise TypeError(f"targets must be integer class indices, got {targets.dtype}")
        targets = targets.long().cpu()
        if targets.dim() == 0 or targets.numel() == 1 and targets.dim() == 1 and count != 1:
            targets = targets.reshape(1, 1).expand(count, 1).clone()
        elif targets.dim() == 1:
            targets = targets.reshape(-1, 1)
        if targets.dim() != 2 or targets.shape[0] != count or targets.shape[1] == 0:
            raise ValueError(
                f"expected an int, one target per image ({count},) or ({count}, T) targets, got shape {tuple(targets.shape)}"
            )
    bad = targets[(targets < 0) | (targets >= num_classes)]
    if bad.numel():
        raise ValueError(f"target classes must be in [0, {num_classes}), got {bad.tolist()}")
    return targets.to(device)


@torch.no_grad()
def dense_heatmap(
    model: nn.Module,
    images: torch.Tensor,
    target: Target,
    *,
    max_pixels: int = 1 << 16,
    progress: bool = False,
) -> torch.Tensor:
    """Per-pixel evidence, float32: (N, H, W) for ``target`` an int or one class per image (N,);
    (N, T, H, W) for (N, T) targets (several classes per image from one evaluation).

    Equal to running the model on the zero-padded patch centred on every pixel (the reference
    heatmap), computed by shift-and-stitch (see the module docstring). Images of any size.
    ``max_pixels`` bounds the memory: images x padded tile pixels processed at once (about
    22 KB per pixel in float32, measured on CPU: 1.4 GB for one 224x224 image; tiles are cut from the padded image with a q - 1 pixel overlap,
    so the result does not depend on it).
    """
    plan = _plan_for(model, images, min_size=1)
    count, _, height, width = images.shape
    several = not isinstance(target, int) and torch.as_tensor(target).dim() == 2
    targets = _targets(target, count, plan.fc_weight.shape[0], images.device)
    classes, columns = torch.unique(targets, return_inverse=True)  # columns: (N, T)
    q = plan.patch_size
    top, bottom, left, right = heatmap_padding(q)
    padded = F.pad(images, (left, right, top, bottom))
    heatmap = torch.empty(count, targets.shape[1], height, width, dtype=torch.float32, device=images.device)
    if count == 0:
        return heatmap if several else heatmap[:, 0]
    chunks = list(_chunks(count, height, width, q, plan.stride, max_pixels))
    for batch, rows, cols in _progress(chunks, progress, "dense heatmap"):
        tile = padded[batch, :, rows.start : rows.stop + q - 1, cols.start : cols.stop + q - 1]
        logits, offsets, step = _phase_logits(plan, tile, classes)
        logits = logits.unflatten(0, (len(offsets), -1))  # (shifts, images, h, w, classes)
        chosen = columns[batch]  # (n, T)
        index = chosen.view(1, chosen.shape[0], 1, 1, -1).expand(*logits.shape[:4], -1)
        values = logits.gather(-1, index).permute(0, 1, 4, 2, 3).float()  # (shifts, n, T, h, w)
        for shift, (dy, dx) in enumerate(offsets):
            if dy >= len(rows) or dx >= len(cols):
                continue  # no output pixel of this shift inside the tile
            out_rows, out_cols = -(-(len(rows) - dy) // step), -(-(len(cols) - dx) // step)
            heatmap[batch, :, rows.start + dy : rows.stop : step, cols.start + dx : cols.stop : step] = (
                values[shift, :, :, :out_rows, :out_cols]
            )
    return heatmap if several else heatmap[:, 0]


def _chunks(count: int, height: int, width: int, q: int, stride: int, max_pixels: int):
    """(image slice, output row range, output column range) pieces of at most ``max_pixels``
    padded input pixels. Tiles are multiples of the output stride (at least one stride)."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    padded_pixels = (height + q - 1) * (width + q - 1)
    images_per_chunk = max(1, min(count, max_pixels // padded_pixels))
    tile_rows, tile_cols = height, width
    if padded_pixels > max_pixels:  # one image is too big: square-ish tiles
        side = max(stride, (int(math.sqrt(max_pixels)) - (q - 1)) // stride * stride)
        tile_rows, tile_cols = min(height, side), min(width, side)
    for start in range(0, count, images_per_chunk):
        batch = slice(start, min(count, start + images_per_chunk))
        for top in range(0, height, tile_rows):
            for left in range(0, width, tile_cols):
                yield batch, range(top, min(height, top + tile_rows)), range(left, min(width, left + tile_cols))


def _phase_logits(plan: InferencePlan, tile: torch.Tensor, classes) -> Tuple[torch.Tensor, List[Tuple[int, int]], int]:
    """Patch logits of every shift of ``tile``, stacked in the batch dimension (space-to-batch).

    Returns (logits (S*n, h, w, K), offsets, step): rows [s*n, (s+1)*n) hold shift s, whose
    position (i, j) is the patch with top-left pixel (dy + step*i, dx + step*j) of the tile,
    (dy, dx) = offsets[s]. Before each stride-s unit, the map is replaced by its s*s phases
    x[:, :, a:, b:], zero-padded at the bottom/right to a common size: the padding only reaches
    output positions past each phase's valid ones (valid convolutions, top-left crops), which the
    caller drops. One call per unit instead of one per shift.
    """
    if plan.stem.stride != 1:
        raise NotImplementedError("dense heatmaps need a stride-1 stem (all BagNets have one)")
    offsets, step = [(0, 0)], 1

    def stack_phases(unit, run, x):
        nonlocal offsets, step
        if unit is not plan.head and unit.stride > 1:
            x = _stack_phases(x, unit.stride)
            offsets = [(dy + a * step, dx + b * step) for a in range(unit.stride) for b in range(unit.stride)
                       for dy, dx in offsets]
            step *= unit.stride
        return run(x)

    # Not cropped to plan.input_extent: the shifted phases' patches reach the tile's last pixel.
    logits = plan.patch_logits(tile, classes, hook=stack_phases, crop=False)
    return logits, offsets, step


def _stack_phases(x: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, C, H, W) -> (stride**2 * B, C, H, W): phase (a, b) = x[:, :, a:, b:] zero-padded."""
    batch, channels, height, width = x.shape
    phases = torch.empty((stride * stride * batch, channels, height, width), dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last)
    for a in range(stride):
        for b in range(stride):
            phase = phases[(a * stride + b) * batch : (a * stride + b + 1) * batch]
            phase[:, :, : height - a, : width - b] = x[:, :, a:, b:]
            phase[:, :, height - a :] = 0  # the padding: written once, not zero-filled then copied
            phase[:, :, :, width - b :] = 0
    return phases


def _progress(items: List, enabled: bool, description: str):
    if not enabled or len(items) < 2:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; without it, no bar
        return items
    return tqdm(items, desc=description, unit="tile")


# --- top patches and masking -----------------------------------------------------------------


@torch.no_grad()
def top_patches(
    model: nn.Module,
    image: torch.Tensor,
    k: int,
    target: Optional[int] = None,
    *,
    non_overlapping: bool = False,
) -> TopPatches:
    """The ``k`` most and least indicative q x q patches of one image for ``target`` (default:
    the predicted class). With ``non_overlapping``, patches are picked greedily and none overlaps
    an already picked one of the same list (fewer than k if the image has no room)."""
    if isinstance(image, torch.Tensor) and image.dim() == 3:
        image = image.unsqueeze(0)
    if image.shape[0] != 1:
        raise ValueError(f"top_patches explains one image, got a batch of {image.shape[0]}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    evidence = patch_logits(model, image)
    logits = evidence.values[0]  # (H', W', K)
    if target is None:
        target = int(logits.mean(dim=(0, 1)).argmax())
    _targets(target, 1, logits.shape[-1], "cpu")
    return select_patches(logits[..., target], evidence.boxes, k, int(target), non_overlapping=non_overlapping)


def select_patches(
    scores: torch.Tensor, boxes: torch.Tensor, k: int, target: int = -1, *, non_overlapping: bool = False
) -> TopPatches:
    """The ``k`` highest and lowest of a patch map ``scores`` (H', W') with ``boxes`` (H', W', 4)
    (see :class:`PatchMap`); ``target`` is recorded in the result."""
    if scores.dim() != 2 or boxes.shape != scores.shape + (4,):
        raise ValueError(f"expected scores (H', W') and boxes (H', W', 4), got {tuple(scores.shape)} and {tuple(boxes.shape)}")
    cols = scores.shape[1]
    flat_scores, flat_boxes = scores.float().flatten(), boxes.reshape(-1, 4)
    most = _pick(flat_scores, flat_boxes, k, non_overlapping, descending=True)
    least = _pick(flat_scores, flat_boxes, k, non_overlapping, descending=False)

    def positions(index):
        return torch.stack([index // cols, index % cols], dim=-1).cpu()

    return TopPatches(
        target,
        flat_boxes[most].cpu(), flat_scores[most].cpu(), positions(most),
        flat_boxes[least].cpu(), flat_scores[least].cpu(), positions(least),
    )


def _pick(scores: torch.Tensor, boxes: torch.Tensor, k: int, non_overlapping: bool, descending: bool) -> torch.Tensor:
    order = torch.argsort(scores, descending=descending, stable=True)
    if not non_overlapping:
        return order[:k]
    chosen: List[int] = []
    for index in order.tolist():
        if all(not _overlap(boxes[index], boxes[other]) for other in chosen):
            chosen.append(index)
            if len(chosen) == k:
                break
    return torch.tensor(chosen, dtype=torch.long, device=scores.device)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def mask_patches(
    images: torch.Tensor,
    boxes: Union[torch.Tensor, Sequence],
    fill: Union[str, float] = "zero",
) -> torch.Tensor:
    """A copy of ``images`` (N, C, H, W) with ``boxes`` (one (k, 4) set per image, (top, left,
    bottom, right), exclusive) filled: "zero" (the ImageNet mean colour for normalised images),
    "mean" (each image's own mean colour), or a number."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got {getattr(images, 'shape', type(images).__name__)}")
    if len(boxes) != images.shape[0]:
        raise ValueError(f"expected one set of boxes per image ({images.shape[0]}), got {len(boxes)}")
    if isinstance(fill, str) and fill not in ("zero", "mean"):
        raise ValueError(f"fill must be 'zero', 'mean' or a number, got {fill!r}")
    masked = images.clone()
    for n, image_boxes in enumerate(boxes):
        image_boxes = torch.as_tensor(image_boxes).reshape(-1, 4)
        if fill == "mean":
            value = images[n].mean(dim=(1, 2)).view(-1, 1, 1)
        else:
            value = 0.0 if fill == "zero" else float(fill)
        for top, left, bottom, right in image_boxes.tolist():
            masked[n, :, max(top, 0) : bottom, max(left, 0) : right] = value
    return masked


@torch.no_grad()
def masking_experiment(
    bagnet: nn.Module,
    models: Union[Mapping[str, nn.Module], Sequence[nn.Module]],
    images: Union[torch.Tensor, Iterable],
    labels: Optional[torch.Tensor] = None,
    k: int = 10,
    *,
    fill: Union[str, float] = "zero",
    non_overlapping: bool = False,
    progress: bool = False,
) -> Dict[str, Dict[str, float]]:
    """The paper's masking experiment: mask each image's ``k`` most indicative BagNet patches for
    its true class, then report for every model (and the BagNet itself) the top-1 accuracy
    before/after and the mean drop of the true-class logit.

    ``images``/``labels``: tensors (N, 3, H, W)/(N,), or ``images`` an iterable of (images,
    labels) batches (a DataLoader) with ``labels=None``. ``models``: {name: module} or a list;
    they must accept the BagNet's input (same device and dtype) and be in eval mode.
    """
    if not isinstance(models, Mapping):
        models = {f"model{i}": m for i, m in enumerate(models)}
    models = {"bagnet": bagnet, **models}
    for name, model in models.items():
        if model.training:
            raise ValueError(f"model {name!r} is in training mode: call .eval() first")
    batches = [(images, labels)] if isinstance(images, torch.Tensor) else images
    if isinstance(images, torch.Tensor) and labels is None:
        raise ValueError("labels are required when images is a tensor")
    totals = {name: {"correct": 0.0, "correct_masked": 0.0, "logit_drop": 0.0} for name in models}
    seen = 0
    for batch_images, batch_labels in _progress(list(batches) if progress else batches, progress, "masking"):
        batch_labels = torch.as_tensor(batch_labels).to(batch_images.device).long()
        evidence = patch_logits(bagnet, batch_images)  # one pass for the whole batch
        boxes = [
            select_patches(evidence.values[n, ..., int(label)], evidence.boxes, k, int(label),
                           non_overlapping=non_overlapping).most_boxes
            for n, label in enumerate(batch_labels)
        ]
        masked = mask_patches(batch_images, boxes, fill)
        for name, model in models.items():
            before, after = model(batch_images).float(), model(masked).float()
            rows = torch.arange(len(batch_labels), device=before.device)
            totals[name]["correct"] += (before.argmax(1) == batch_labels).sum().item()
            totals[name]["correct_masked"] += (after.argmax(1) == batch_labels).sum().item()
            totals[name]["logit_drop"] += (before[rows, batch_labels] - after[rows, batch_labels]).sum().item()
        seen += len(batch_labels)
    if seen == 0:
        raise ValueError("no images given")
    return {
        name: {
            "accuracy": t["correct"] / seen,
            "accuracy_masked": t["correct_masked"] / seen,
            "mean_logit_drop": t["logit_drop"] / seen,
            "images": seen,
            "k": k,
        }
        for name, t in totals.items()
    }
