"""Certified defences against adversarial patches on BagNet evidence maps, batched and exact.

A square patch of p pixels placed anywhere in the image changes the logits of at most a
w x w block of BagNet output cells, w = ceil((p + q - 1) / stride) (:func:`window_size`).
The PatchGuard family of defences (Xiang et al., USENIX Security 2021; PatchGuard++, 2021;
Clipped BagNet, Zhang et al. 2020) bounds what any such block can do to the aggregated
evidence. This module computes, for a batch of per-patch logit maps ``(N, H', W', C)`` as
``patch_logits(model, images).values`` returns them, the defended prediction and the result of
the provable analysis of each image:

- :func:`masking` — PatchGuard robust masking (its Algorithm 1 prediction, Algorithm 2
  certification), optionally with clipping to [0, clip] and a detection threshold T;
- :func:`clipping` — the clipping defences: Clipped BagNet's tanh(0.05 x - 1) or [0, clip];
- :func:`detection` — PatchGuard++ (alert = -1);
- :func:`masked_feature_logits` — PatchGuard's training-time aggregation (``aggregation='adv'``).

Codes: 0 = the clean prediction is wrong, 1 = some patch placement may change it, 2 = certified.
The semantics, tie rules and the choices where the reference code is ambiguous are those of
the authors' ``utils/defense_utils.py`` (inspire-group/PatchGuard), written afresh; docs/certify.md
lists them.

Numerics (one policy for every function): the logits are converted to float64 and every sum
a decision depends on is accumulated in float64 (the reference mixes float32 and float64).
Each such quantity is a direct sum of map cells, never a difference of large partial sums:
"the evidence outside window a" is summed over the cells outside a (top, bottom, left and right
strips) rather than computed as total - window, so a region without evidence sums to exactly 0
and ties that hold exactly (duplicated classes, maps whose evidence lies inside one window) are
decided by the tie rules, not by rounding. Decisions between values closer than ~1e-13
(relative) may differ from an implementation that sums in another order; the reference keeps
class totals in float32, so against it the caveat is float32's ~1e-7.

Speed: a cheap first pass over the whole map (float32, with a proven bound on its error)
screens the classes; the float64 evaluation then runs only on the classes that can matter. A
wrong class can only beat the true class at some window if its total evidence can (masking,
the sound clipping check); only the classes near the top can be the prediction or runner-up.
The true class's lower bound is computed for all windows at once from a table of box sums.
Images are processed in chunks to bound memory.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "CLEAN_WRONG",
    "VULNERABLE",
    "CERTIFIED",
    "ALERT",
    "CertifyResult",
    "window_size",
    "masking",
    "clipping",
    "detection",
    "undefended_prediction",
    "masked_feature_logits",
]

CLEAN_WRONG, VULNERABLE, CERTIFIED = 0, 1, 2
ALERT = -1  # PatchGuard++'s defended prediction when it detects a patch

Window = Union[int, Sequence[int]]

# Images per chunk: a chunk's maps hold about this many elements. On a CPU a chunk should stay in
# the caches while amortising the per-op overhead: masking 26x26x1000 maps took 2.3 / 1.9 / 1.6 /
# 1.4 / 2.6 ms per map (CPU time, one thread, 2-core EPYC test machine) in chunks of 2 / 4 / 6 / 12
# / 24 maps; detection, which makes float64 copies of whole maps, 9.9 / 15 / 19 / 31 ms per map
# in chunks of 1 / 2 / 6 / 12, so it takes an eighth. GPUs want large chunks to fill the device.
_CHUNK_ELEMENTS = {"cpu": 2**23}
_CHUNK_ELEMENTS_DEFAULT = 2**26


@dataclass(frozen=True)
class CertifyResult:
    """The outcome of a defence on a batch of N evidence maps.

    prediction: (N,) int64, the defended prediction (detection: -1 = alert).
    certified: (N,) int64 codes 0 (clean prediction wrong), 1 (an attack may succeed),
        2 (certified), or None when no labels were given.
    labels: (N,) int64 or None. defense: its name. window: (wy, wx) in map cells.
    """

    prediction: torch.Tensor
    certified: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    defense: str
    window: Tuple[int, int]

    def summary(self) -> Dict[str, object]:
        """Counts and fractions: defended clean accuracy, certified accuracy, code breakdown.

        Certified accuracy is count(code == 2) / N (the reference scripts print 0 whenever one
        of the three codes does not occur in the data set).
        """
        if self.labels is None:
            raise ValueError("summary() needs labels: pass labels to the defence")
        n = int(self.labels.numel())
        correct = int((self.prediction == self.labels).sum())
        codes = {str(code): int((self.certified == code).sum()) for code in (CLEAN_WRONG, VULNERABLE, CERTIFIED)}
        fraction = (lambda k: k / n) if n else (lambda k: 0.0)
        result = {
            "defense": self.defense, "window": list(self.window), "images": n,
            "defended_clean_accuracy": fraction(correct),
            "certified_accuracy": fraction(codes[str(CERTIFIED)]),
            "codes": codes, "code_fractions": {k: fraction(v) for k, v in codes.items()},
        }
        if self.defense == "detection":
            result["alert_rate"] = fraction(int((self.prediction == ALERT).sum()))
        return result


# --- geometry --------------------------------------------------------------------------------


def window_size(patch_px, q: int, stride: int = 8):
    """Map cells a patch of ``patch_px`` pixels can touch: ceil((patch_px + q - 1) / stride).

    ``patch_px`` is an int (square patch) or (rows, cols); the result has the same form. q is the
    BagNet's receptive field (9, 17, 33), stride its output stride (8 for the shipped models).
    """
    q, stride = _positive_int(q, "q"), _positive_int(stride, "stride")
    if isinstance(patch_px, (tuple, list)):
        if len(patch_px) != 2:
            raise ValueError(f"patch_px must be an int or (rows, cols), got {patch_px!r}")
        return tuple(window_size(p, q, stride) for p in patch_px)
    patch_px = _positive_int(patch_px, "patch_px")
    return -(-(patch_px + q - 1) // stride)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def _window(window: Window, height: int, width: int) -> Tuple[int, int]:
    """(wy, wx) from an int or a pair, checked against the (height, width) map."""
    if isinstance(window, (tuple, list, torch.Size)):
        if len(window) != 2:
            raise ValueError(f"window must be an int or (rows, cols), got {tuple(window)!r}")
        wy, wx = (_positive_int(w, "window") for w in window)
    else:
        wy = wx = _positive_int(window, "window")
    if wy > height or wx > width:
        raise ValueError(
            f"window ({wy}, {wx}) is larger than the ({height}, {width}) evidence map: a patch that "
            f"covers more than the whole map cannot be certified against (use a smaller patch or a "
            f"larger image)"
        )
    return wy, wx


# --- input checks ----------------------------------------------------------------------------


def _check_logits(logits) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor (N, H', W', C), got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() != 4:
        raise ValueError(
            f"logits must be (N, H', W', C) per-patch logits, channels-last as "
            f"patch_logits(...).values returns them; got shape {tuple(logits.shape)}"
        )
    if logits.shape[3] < 2:
        raise ValueError(f"logits must have at least 2 classes, got shape {tuple(logits.shape)}")
    return logits


def _check_labels(labels, count: int, classes: int, device: torch.device) -> Optional[torch.Tensor]:
    if labels is None:
        return None
    if isinstance(labels, torch.Tensor):
        if labels.device != device:
            raise ValueError(f"labels are on {labels.device} but logits on {device}: put them on one device")
        tensor = labels
    else:
        tensor = torch.as_tensor(labels)
        if tensor.numel() == 0:
            tensor = tensor.long()  # an empty list reads as float32
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {tensor.dtype}")
    if tuple(tensor.shape) != (count,):
        raise ValueError(f"labels must have shape ({count},), one per map, got {tuple(tensor.shape)}")
    tensor = tensor.to(device=device, dtype=torch.long)
    bad = (tensor < 0) | (tensor >= classes)
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {classes}), got {tensor[bad][:8].tolist()}")
    return tensor


def _check_finite(sums: torch.Tensor, start: int, what: str) -> None:
    """Non-finite logits make some per-class sum non-finite: checking the sums is a pass over
    N x C values instead of the whole map."""
    bad = ~torch.isfinite(sums).all(dim=1)
    if bool(bad.any()):
        first = start + int(bad.nonzero()[0])
        raise ValueError(f"logits of image {first} contain NaN or infinite values{what}")


def _chunks(logits: torch.Tensor, chunk_size: Optional[int], scale: float = 1.0):
    count = logits.shape[0]
    if chunk_size is None:
        budget = _CHUNK_ELEMENTS.get(logits.device.type, _CHUNK_ELEMENTS_DEFAULT) * scale
        per_image = math.prod(logits.shape[1:])
        chunk_size = max(1, int(budget) // max(1, per_image))
    else:
        chunk_size = _positive_int(chunk_size, "chunk_size")
    for start in range(0, count, chunk_size):
        yield start, min(count, start + chunk_size)


# --- tie rules -------------------------------------------------------------------------------


def _last_argmax(values: torch.Tensor) -> torch.Tensor:
    """Index of the maximum along the last dim, the highest index among equal maxima:
    ``np.argsort(v, kind='stable')[-1]`` of the reference."""
    index = torch.arange(values.shape[-1], device=values.device)
    best = values.amax(dim=-1, keepdim=True)
    return torch.where(values == best, index, -1).amax(dim=-1)


def _first_argmax(values: torch.Tensor) -> torch.Tensor:
    """Index of the maximum along the last dim, the lowest index among equal maxima: ``np.argmax``."""
    size = values.shape[-1]
    index = torch.arange(size, device=values.device)
    best = values.amax(dim=-1, keepdim=True)
    return torch.where(values == best, index, size).amin(dim=-1)


# --- window sums -----------------------------------------------------------------------------


def _window_sums(maps: torch.Tensor, wy: int, wx: int, inside: bool = True, outside: bool = True):
    """Sums over every in-map window of the (B, H, W, K) float64 ``maps``, and outside it.

    Returns (inside, outside), each (B, Ay, Ax, K) or None, Ay = H - wy + 1, Ax = W - wx + 1.
    Both are direct sums of cells (sequential adds and cumulative sums from the map's edge):
    no prefix-sum differences, so an all-zero region sums to exactly 0. The outside of window
    (ay, ax) is split into the rows above it, the rows below it, and the parts of its own rows
    left and right of it.
    """
    batch, height, width, classes = maps.shape
    rows_, cols_ = height - wy + 1, width - wx + 1
    vertical = maps[:, 0:rows_].clone()  # (B, Ay, W, K): sums of wy consecutive rows
    for k in range(1, wy):
        vertical += maps[:, k : k + rows_]
    window = None
    if inside:
        window = vertical[:, :, 0:cols_].clone()
        for k in range(1, wx):
            window += vertical[:, :, k : k + cols_]
    rest = None
    if outside:
        row_totals = maps.sum(dim=2)  # (B, H, K)
        above = _running_sums(row_totals, 1)[:, :rows_]  # rows [0, ay)
        below = _running_sums(row_totals, 1, from_end=True)[:, wy : wy + rows_]  # rows [ay + wy, H)
        left = _running_sums(vertical, 2)[:, :, :cols_]  # columns [0, ax) of the window's rows
        right = _running_sums(vertical, 2, from_end=True)[:, :, wx : wx + cols_]  # [ax + wx, W)
        rest = (above + below).unsqueeze(2) + left.add_(right)
    return window, rest


def _running_sums(values: torch.Tensor, dim: int, from_end: bool = False) -> torch.Tensor:
    """Sequential sums along ``dim`` with one more slot: out[k] = sum of values[:k] (or, from the
    end, of values[k:]); out[0] (out[n]) = 0. Large tensors are summed slice by slice:
    torch.cumsum along a middle dimension of (6, 21, 26, 1000) float64 took 19 ms and its flip
    18 ms, the loop over 26 slices about 3 ms (2-core EPYC). Same order either way."""
    size = values.shape[dim]
    if values.numel() < 2**16:
        zero = torch.zeros_like(values.narrow(dim, 0, 1))
        if from_end:
            return torch.cat([values.flip(dim).cumsum(dim).flip(dim), zero], dim=dim)
        return torch.cat([zero, values.cumsum(dim)], dim=dim)
    shape = list(values.shape)
    shape[dim] = size + 1
    out = values.new_empty(shape)
    order = range(size - 1, -1, -1) if from_end else range(size)
    out.select(dim, size if from_end else 0).zero_()
    for k in order:
        previous, current = (k + 1, k) if from_end else (k, k + 1)
        torch.add(out.select(dim, previous), values.select(dim, k), out=out.select(dim, current))
    return out


def _rounding_margin(cells: int) -> float:
    """Relative margin that covers the rounding of any float64 sum of ``cells`` non-negative
    terms (error <= (cells - 1) * 2**-53 of the sum, whatever the order) with room to spare."""
    return 2.0**-30 + 4.0 * cells * 2.0**-53


@functools.lru_cache(maxsize=64)
def _overlap_indices(height: int, width: int, wy: int, wx: int, device: str):
    """For every window a and every window b overlapping it (offset (dy, dx), |dy| < wy,
    |dx| < wx), where to find the sum of the cells of b outside a in the table of
    :func:`_box_table`: b minus a is a |dy| x wx strip (rows of b that a lacks) plus a
    (wy - |dy|) x |dx| strip (shared rows, columns of b that a lacks). Offsets whose b leaves
    the map point at the table's -inf sentinel.

    Returns (first, second), each (A * K,) flat row indices of the two strips, A = Ay * Ax
    windows (row-major), K = (2wy - 1)(2wx - 1) offsets padded with sentinels to a power of 2
    (for :func:`_max_over_offsets`).
    """
    rows_, cols_ = height - wy + 1, width - wx + 1
    ay, ax = torch.meshgrid(torch.arange(rows_), torch.arange(cols_), indexing="ij")
    ay, ax = ay.reshape(-1, 1), ax.reshape(-1, 1)
    dy, dx = torch.meshgrid(torch.arange(1 - wy, wy), torch.arange(1 - wx, wx), indexing="ij")
    dy, dx = dy.reshape(1, -1), dx.reshape(1, -1)
    by, bx = ay + dy, ax + dx
    valid = (by >= 0) & (by < rows_) & (bx >= 0) & (bx < cols_)

    def row(h, w, top, left):
        # Empty strips (h or w = 0) read a zero entry; clamping keeps their position in range.
        top, left = top.clamp(0, height - 1), left.clamp(0, width - 1)
        return ((h * (wx + 1) + w) * height + top) * width + left

    first = row(dy.abs().expand_as(by), torch.full_like(by, wx), torch.where(dy >= 0, ay + wy, ay + dy), bx)
    second = row((wy - dy.abs()).expand_as(by), dx.abs().expand_as(bx), ay + dy.clamp(min=0),
                 torch.where(dx >= 0, ax + wx, ax + dx))
    sentinel = (wy + 1) * (wx + 1) * height * width
    first = torch.where(valid, first, sentinel)
    padding = (1 << (first.shape[1] - 1).bit_length()) - first.shape[1]
    first = F.pad(first, (0, padding), value=sentinel)
    second = F.pad(second, (0, padding), value=0)  # row 0: the empty 0 x 0 box
    return first.reshape(-1).to(device), second.reshape(-1).to(device)


def _max_over_offsets(values: torch.Tensor) -> torch.Tensor:
    """(A, K, B) -> (A, B) max over K (a power of 2) by halving: with the images innermost,
    amax over K ran at 1.8 ns per element, the halving tree at 0.8 (2-core EPYC)."""
    while values.shape[1] > 1:
        half = values.shape[1] // 2
        values = torch.maximum(values[:, :half], values[:, half:])
    return values[:, 0]


def _box_table(maps: torch.Tensor, wy: int, wx: int) -> torch.Tensor:
    """(H, W, B) -> ((wy+1)(wx+1) H W + 1, B) table: row (h, w, i, j) is the direct sum of
    ``maps[i:i+h, j:j+w]`` (zero beyond the map), h <= wy, w <= wx; the last row is -inf.
    Images are the last dimension so that gathering a row reads B contiguous values."""
    height, width, batch = maps.shape
    padded = F.pad(maps, (0, 0, 0, wx, 0, wy))  # (H + wy, W + wx, B)
    columns = padded.new_zeros(wy + 1, height, width + wx, batch)  # sums of h rows
    for h in range(1, wy + 1):
        torch.add(columns[h - 1], padded[h - 1 : h - 1 + height], out=columns[h])
    table = padded.new_empty((wy + 1) * (wx + 1) * height * width + 1, batch)
    boxes = table[:-1].view(wy + 1, wx + 1, height, width, batch)
    boxes[:, 0] = 0.0
    for w in range(1, wx + 1):  # every height at once
        torch.add(boxes[:, w - 1], columns[:, :, w - 1 : w - 1 + width], out=boxes[:, w])
    table[-1] = float("-inf")
    return table


def _masked_true_class_bound(true_maps: torch.Tensor, wy: int, wx: int, threshold: float) -> torch.Tensor:
    """PatchGuard's lower bound of the true class's masked evidence for every attacker window.

    true_maps: (B, H, W) float64, clipped (non-negative) evidence of the true class.
    Returns (B, A): for window a, with m = the map with a zeroed, M / O = the largest window sum
    of m over all windows / over the windows overlapping a, and R = the sum of m:
    R - M if M / R > T, else R - O (the ``else`` branch of the reference since commit 8c4a05a).
    R = 0 takes the else branch (the reference's 0/0 is NaN, and NaN > T is false).
    """
    batch, height, width = true_maps.shape
    rows_, cols_ = height - wy + 1, width - wx + 1
    maps = true_maps.permute(1, 2, 0).contiguous()  # (H, W, B)
    table = _box_table(maps, wy, wx)
    full = (wy * (wx + 1) + wx) * height * width  # rows (wy, wx, i, j): the window sums
    sums = table[full : full + height * width].view(height, width, batch)[:rows_, :cols_]
    first, second = _overlap_indices(height, width, wy, wx, str(true_maps.device))
    # (A, K, B): sum of m over every window overlapping a (a itself: 0; off-map: -inf).
    overlapping = table.index_select(0, first).add_(table.index_select(0, second))
    overlap_max = _max_over_offsets(overlapping.view(rows_ * cols_, -1, batch))  # O (>= 0)
    # Windows that do not overlap a keep their sums: they lie wholly above, below, left or right
    # of a, so their largest sum is a running max over rows / columns of window positions.
    row_max, col_max = sums.amax(dim=1), sums.amax(dim=0)  # (Ay, B), (Ax, B)
    pad_rows = row_max.new_full((wy, batch), float("-inf"))
    pad_cols = col_max.new_full((wx, batch), float("-inf"))
    above = torch.cat([pad_rows, row_max.cummax(dim=0).values])[:rows_]
    below = torch.cat([row_max.flip(0).cummax(dim=0).values.flip(0), pad_rows])[wy : wy + rows_]
    left = torch.cat([pad_cols, col_max.cummax(dim=0).values])[:cols_]
    right = torch.cat([col_max.flip(0).cummax(dim=0).values.flip(0), pad_cols])[wx : wx + cols_]
    apart = torch.maximum(torch.maximum(above, below).unsqueeze(1), torch.maximum(left, right).unsqueeze(0))
    largest = torch.maximum(overlap_max, apart.reshape(-1, batch))  # M, (A, B)
    _, rest = _window_sums(maps.unsqueeze(0), wy, wx, inside=False)  # images as the K dim
    rest = rest.reshape(-1, batch)  # R
    return (rest - torch.where(largest / rest > threshold, largest, overlap_max)).t()


# --- screening ------------------------------------------------------------------------------


def _screen_dtype(logits: torch.Tensor) -> Tuple[torch.dtype, float]:
    """(dtype, unit roundoff) of the cheap first pass: float32 (float64 logits stay float64)."""
    return (torch.float64, 2.0**-53) if logits.dtype == torch.float64 else (torch.float32, 2.0**-24)


def _exact(chunk: torch.Tensor, image: torch.Tensor, cls: torch.Tensor, evidence) -> torch.Tensor:
    """(P, H, W) float64 evidence of class cls[p] of image image[p] (a gathered copy)."""
    return evidence(chunk[image, :, :, cls].to(torch.float64))


def _screen_buffer(chunk: torch.Tensor, dtype: torch.dtype, scratch: list) -> torch.Tensor:
    """An output buffer shaped like the chunk, reused across chunks (``scratch`` holds it): on a
    CPU a fresh 16 MiB tensor per chunk costs a page fault per 4 KiB page (clamping 6 maps into
    a new tensor took 3-8 ms, into a reused one about 1.2 ms)."""
    if not scratch or scratch[0].numel() < chunk.numel() or scratch[0].dtype != dtype:
        scratch[:] = [torch.empty(chunk.numel(), dtype=dtype, device=chunk.device)]
    return scratch[0][: chunk.numel()].view(chunk.shape)


def _class_totals(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) contiguous -> (B, C) sums over the map (as one reduced dimension: faster)."""
    batch, height, width, classes = maps.shape
    return maps.view(batch, height * width, classes).sum(dim=1)


def _scatter(values: torch.Tensor, image: torch.Tensor, cls: torch.Tensor, shape) -> torch.Tensor:
    """A (B, C) tensor of -inf with ``values`` at the (image, cls) pairs."""
    table = values.new_full(shape, float("-inf"))
    table[image, cls] = values
    return table


# --- robust masking --------------------------------------------------------------------------


def masking(
    logits: torch.Tensor,
    labels,
    window: Window,
    clip: Optional[float] = None,
    threshold: float = 0.0,
    *,
    chunk_size: Optional[int] = None,
) -> CertifyResult:
    """PatchGuard robust masking: defended prediction (Algorithm 1) and provable analysis
    (Algorithm 2).

    Args:
        logits: (N, H', W', C) per-patch logits, any float dtype, any device.
        labels: (N,) true classes (tensor on the logits' device, array or list), or None for
            predictions only (``certified`` is then None).
        window: w or (wy, wx) map cells (:func:`window_size`); in-map placements only.
        clip: evidence is clipped to [0, clip]; None = [0, inf) (the reference's ``clipping=-1``).
        threshold: the detection threshold T in [0, 1): a class's largest window is masked when
            it holds more than T of the class's total evidence.
        chunk_size: images per chunk (default: sized to the device, see the module docstring).

    Prediction: per class, subtract the largest window when total > 0 and largest / total > T;
    the highest index wins among equal masked evidence (the reference's stable argsort).
    Certification: 0 if the unmasked clipped evidence's prediction (same tie rule) is not the
    label; else 1 if for some window a, a wrong class's evidence outside a divided by (1 - T)
    beats (or equals, at a higher class index) the true class's lower bound; else 2.
    """
    logits, labels, (wy, wx) = _check_input(logits, labels, window)
    _check_clip(clip, "None")
    if not (isinstance(threshold, numbers.Real) and 0.0 <= threshold < 1.0):
        raise ValueError(f"threshold T must be in [0, 1), got {threshold!r}")
    upper = math.inf if clip is None else float(clip)

    def work(chunk, truth, start, scratch):
        return _masking_chunk(chunk, truth, wy, wx, upper, float(threshold), start, scratch)

    return _run_chunks(logits, labels, chunk_size, work, "masking", (wy, wx))


def _masked_totals(maps: torch.Tensor, wy: int, wx: int, threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P, H, W) clipped maps -> (totals, Algorithm 1's evidence), each (P,): the evidence
    outside the first largest window where that window is masked, the total elsewhere."""
    totals = maps.sum(dim=(1, 2))
    inside, outside = _window_sums(maps.unsqueeze(-1), wy, wx)
    inside, outside = inside.flatten(1), outside.flatten(1)
    largest, where = inside.max(dim=1)
    masked = (totals > 0) & (largest / totals > threshold)
    return totals, torch.where(masked, outside.gather(1, where.unsqueeze(1)).squeeze(1), totals)


def _masking_chunk(chunk, labels, wy, wx, upper, threshold, start, scratch):
    batch, height, width, classes = chunk.shape
    device = chunk.device
    evidence = lambda maps: maps.clamp_(0.0, upper)  # noqa: E731 - in place on a gathered copy
    # Screening: float32 totals of every class, within a relative `margin` of the float64 ones
    # (clipped evidence is non-negative, so every float sum is within (cells + 1) roundoffs).
    dtype, unit = _screen_dtype(chunk)
    clipped = torch.clamp(chunk.to(dtype), 0.0, upper, out=_screen_buffer(chunk, dtype, scratch))
    approx = _class_totals(clipped).double()
    _check_finite(approx, start, "" if math.isfinite(upper) else " (an unclipped +inf cannot be certified)")
    margin = 4.0 * (height * width + 2) * unit + 2.0**-30
    ceiling = approx * (1.0 + margin)  # >= every class's float64 total and masked evidence
    # Prediction: masking only lowers a class's evidence, so a class whose total stays below
    # the masked evidence of the top class cannot win; the same margin finds every class that
    # can hold the largest unmasked total (the certification's clean prediction).
    images = torch.arange(batch, device=device)
    _, floor = _masked_totals(_exact(chunk, images, approx.argmax(dim=1), evidence), wy, wx, threshold)
    floor = torch.minimum(floor, approx.amax(dim=1) * (1.0 - margin))
    image, cls = (ceiling >= floor.unsqueeze(1)).nonzero(as_tuple=True)
    totals, masked = _masked_totals(_exact(chunk, image, cls, evidence), wy, wx, threshold)
    prediction = _last_argmax(_scatter(masked, image, cls, (batch, classes)))
    if labels is None:
        return prediction, None
    codes = torch.full((batch,), CLEAN_WRONG, dtype=torch.long, device=device)
    right = (_last_argmax(_scatter(totals, image, cls, (batch, classes))) == labels).nonzero(as_tuple=True)[0]
    if right.numel() == 0:
        return prediction, codes
    truth = labels[right]
    bound = _masked_true_class_bound(_exact(chunk, right, truth, evidence), wy, wx, threshold)  # (B', A)
    # A wrong class's evidence outside any window is at most its total: only classes whose
    # total / (1 - T) reaches the true class's smallest bound can win at some window.
    keep = 1.0 - threshold
    reach = ceiling[right] / keep >= bound.amin(dim=1, keepdim=True)
    reach[torch.arange(right.numel(), device=device), truth] = False
    pair, cls = reach.nonzero(as_tuple=True)
    failed = torch.zeros(right.numel(), dtype=torch.long, device=device)
    if pair.numel():
        _, outside = _window_sums(_exact(chunk, right[pair], cls, evidence).unsqueeze(-1), wy, wx, inside=False)
        wrong = outside.flatten(1) / keep  # (P, A), the reference's t / (1 - T)
        ours = bound[pair]
        beaten = (wrong > ours) | ((wrong == ours) & (cls > truth[pair]).unsqueeze(1))
        failed.index_add_(0, pair, beaten.any(dim=1).long())
    codes[right] = torch.where(failed > 0, VULNERABLE, CERTIFIED)
    return prediction, codes


# --- clipping (CBN and [0, clip]) ------------------------------------------------------------


def clipping(
    logits: torch.Tensor,
    labels,
    window: Window,
    clip: Optional[float] = None,
    *,
    sound: bool = False,
    chunk_size: Optional[int] = None,
) -> CertifyResult:
    """The clipping defences: Clipped BagNet (clip=None: f = tanh(0.05 x - 1)) or f = x clipped
    to [0, clip]; the prediction is the arg-max of the mean of f (lowest index among ties).

    Certification (0 if the prediction is not the label): with f in [lo, hi], a patch can
    change a window's evidence difference by at most w^2 (hi - lo) (2 w^2 for CBN, w^2 clip).
    ``sound=False`` (the reference's check): only the runner-up class r (the best class other
    than the prediction, lowest index among ties) is examined, and the image is certified when
    for every window, sum outside the window of (f_y - f_r) >= that gain. This is not a proof:
    another class with a smaller margin outside some window can win. ``sound=True`` examines
    every class c != y and counts a tie as lost when c < y (arg-max ties go to the lowest index).

    The reference's ``np.argsort`` here is not stable, so which class it takes among equal means
    is up to numpy's sort; this implementation takes the lowest index, as its prediction does.
    """
    logits, labels, (wy, wx) = _check_input(logits, labels, window)
    _check_clip(clip, "None (CBN)")

    def work(chunk, truth, start, scratch):
        return _clipping_chunk(chunk, truth, wy, wx, clip, bool(sound), start, scratch)

    return _run_chunks(logits, labels, chunk_size, work, "cbn" if clip is None else "clip", (wy, wx))


def _clipping_chunk(chunk, labels, wy, wx, clip, sound, start, scratch):
    batch, height, width, classes = chunk.shape
    device = chunk.device
    cells = height * width
    dtype, unit = _screen_dtype(chunk)
    if clip is None:
        low, high = -1.0, 1.0
        evidence = lambda maps: maps.mul_(0.05).sub_(1.0).tanh_()  # noqa: E731
        # Screening through tanh(z) = 2 sigmoid(2z) - 1 (float32 sigmoid: 3x faster than tanh
        # here). Per cell it is within 2**-19 of the float64 tanh (a few roundoffs of the
        # argument, damped by tanh' = sech^2, plus sigmoid's own error).
        screened = torch.mul(chunk.to(dtype), 0.1, out=_screen_buffer(chunk, dtype, scratch))
        approx = _class_totals(screened.sub_(2.0).sigmoid_()).double() * 2.0 - cells
        per_cell = 2.0**-19 if dtype == torch.float32 else 2.0**-40
    else:
        low, high = 0.0, float(clip)
        evidence = lambda maps: maps.clamp_(0.0, high)  # noqa: E731
        clipped = torch.clamp(chunk.to(dtype), 0.0, high, out=_screen_buffer(chunk, dtype, scratch))
        approx = _class_totals(clipped).double()
        per_cell = 4.0 * unit * high
    _check_finite(approx, start, "")
    # |float64 total - approx| <= error: per-cell errors plus the sum's rounding (at most
    # (cells - 1) roundoffs of the sum of |f|, |f| <= max(1, high)), doubled for safety.
    error = cells * per_cell + 2.0 * cells * cells * unit * 2.0 * max(1.0, high)
    # The prediction and the runner-up both have totals >= the second largest approx - error.
    second = approx.topk(2, dim=1).values[:, 1:]
    image, cls = (approx >= second - 2.0 * error).nonzero(as_tuple=True)
    totals = _exact(chunk, image, cls, evidence).sum(dim=(1, 2))
    means = _scatter(totals / cells, image, cls, (batch, classes))
    prediction = _first_argmax(means)
    if labels is None:
        return prediction, None
    codes = torch.full((batch,), CLEAN_WRONG, dtype=torch.long, device=device)
    right = (prediction == labels).nonzero(as_tuple=True)[0]
    if right.numel() == 0:
        return prediction, codes
    truth = labels[right]
    rows = torch.arange(right.numel(), device=device)
    gain = wy * wx * (2 if clip is None else high)  # the reference's max_increase
    true_maps = _exact(chunk, right, truth, evidence)  # (B', H, W)

    def lost(pair: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """(P,) whether class cls[p] can beat image right[pair[p]]'s true class at some window."""
        difference = true_maps[pair] - _exact(chunk, right[pair], cls, evidence)
        _, outside = _window_sums(difference.unsqueeze(-1), wy, wx, inside=False)
        outside = outside.flatten(1)  # (P, A): margin outside each window
        beaten = outside < gain
        if sound:
            beaten |= (outside == gain) & (cls < truth[pair]).unsqueeze(1)
        return beaten.any(dim=1)

    # The runner-up (the reference's only check; for sound=True the first, most likely one).
    means = means[right]
    means[rows, truth] = float("-inf")
    runner_up = _first_argmax(means)
    failed = lost(rows, runner_up)
    if sound and not bool(failed.all()):
        # outside_a(f_y - f_c) >= total(f_y) - total(f_c) - max_a window_a(f_y) + w^2 lo (f_c >= lo
        # in the window): classes whose bound clears the gain by more than any rounding are safe.
        inside, _ = _window_sums(true_maps.unsqueeze(-1), wy, wx, outside=False)
        bound = (true_maps.sum(dim=(1, 2)) - inside.flatten(1).amax(dim=1) + wy * wx * low).unsqueeze(1)
        bound = bound - (approx[right] + error)
        slack = 8.0 * _rounding_margin(cells) * cells * max(1.0, high - low)
        reach = (bound - slack <= gain) & ~failed.unsqueeze(1)
        reach[rows, truth] = False
        reach[rows, runner_up] = False
        pair, cls = reach.nonzero(as_tuple=True)
        if pair.numel():
            failed = failed.long().index_add_(0, pair, lost(pair, cls).long()) > 0
    codes[right] = torch.where(failed, VULNERABLE, CERTIFIED)
    return prediction, codes


# --- PatchGuard++ detection ------------------------------------------------------------------


def detection(
    logits: torch.Tensor,
    labels,
    window: Window,
    tau: float,
    *,
    chunk_size: Optional[int] = None,
) -> CertifyResult:
    """PatchGuard++ attack detection on raw (unclipped) logits.

    For every window a: v = (evidence outside a) / (H' W') (the reference's mean minus the
    window's sum / (H' W')), m = softmax(v), masked prediction = arg-max (lowest index among
    ties), confidence = max m. The global prediction is the arg-max of the mean (highest index
    among ties, the reference's stable argsort).

    Prediction: -1 (alert) if some window's masked prediction differs from the global one with
    confidence > tau, else the global prediction. Certification: 0 if the global prediction is
    not the label; 1 if some window's masked prediction is not the label or its confidence is
    below tau; else 2.
    """
    logits, labels, (wy, wx) = _check_input(logits, labels, window)
    if not (isinstance(tau, numbers.Real) and 0.0 <= tau <= 1.0):
        raise ValueError(f"tau must be in [0, 1], got {tau!r}")

    def work(chunk, truth, start, scratch):
        return _detection_chunk(chunk, truth, wy, wx, float(tau), start)

    # Detection keeps float64 copies of whole chunks, and runs fastest when they stay in the cache.
    return _run_chunks(logits, labels, chunk_size, work, "detection", (wy, wx), scale=0.125)


def _detection_chunk(chunk, labels, wy, wx, tau, start):
    cells = chunk.shape[1] * chunk.shape[2]
    evidence = chunk.double()
    totals = evidence.sum(dim=(1, 2))
    _check_finite(totals, start, "")
    overall = _last_argmax(totals / cells)  # (B,)
    _, outside = _window_sums(evidence, wy, wx, inside=False)
    scores = outside.flatten(1, 2).div_(cells)  # (B, A, C)
    best = scores.amax(dim=2, keepdim=True)
    # arg-max of the scores, not of softmax(scores): the same class unless exp or the division
    # round two scores within an ulp of each other to one value.
    masked = _first_argmax(scores)
    # max softmax = exp(0) / sum = 1 / sum.
    confidence = scores.sub_(best).exp_().sum(dim=2).reciprocal_()
    alert = ((masked != overall.unsqueeze(1)) & (confidence > tau)).any(dim=1)
    prediction = torch.where(alert, ALERT, overall)
    if labels is None:
        return prediction, None
    lost = ((masked != labels.unsqueeze(1)) | (confidence < tau)).any(dim=1)
    code = torch.where(lost, VULNERABLE, CERTIFIED)
    return prediction, torch.where(overall == labels, code, CLEAN_WRONG)


# --- the rest --------------------------------------------------------------------------------


def _check_input(logits, labels, window):
    """Checked (logits, labels or None, (wy, wx))."""
    logits = _check_logits(logits)
    count, height, width, classes = logits.shape
    window = _window(window, height, width)
    return logits, _check_labels(labels, count, classes, logits.device), window


def _check_clip(clip, alternative: str) -> None:
    if clip is not None and not (isinstance(clip, numbers.Real) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be {alternative} or a positive finite number, got {clip!r}")


def _run_chunks(logits, labels, chunk_size, work, defense, window, scale=1.0) -> CertifyResult:
    """``work(chunk, labels of the chunk or None, first index, scratch list)`` -> (prediction,
    codes or None) per chunk of images, assembled into one result."""
    predictions, codes, scratch = [], [], []
    for start, stop in _chunks(logits, chunk_size, scale):
        prediction, code = work(logits[start:stop], None if labels is None else labels[start:stop], start, scratch)
        predictions.append(prediction)
        codes.append(code)
    empty = torch.empty(0, dtype=torch.long, device=logits.device)
    prediction = torch.cat(predictions) if predictions else empty
    certified = None if labels is None else (torch.cat(codes) if codes else empty)
    return CertifyResult(prediction, certified, labels, defense, window)


def undefended_prediction(logits: torch.Tensor) -> torch.Tensor:
    """(N,) arg-max of the mean logit map, lowest index among ties (the reference scripts'
    "clean accuracy without defense": ``np.argmax(np.mean(output, axis=(1, 2)))``), in float64."""
    logits = _check_logits(logits)
    return _first_argmax(logits.double().mean(dim=(1, 2)))


def masked_feature_logits(logits: torch.Tensor, labels: torch.Tensor, window: Window = 6) -> torch.Tensor:
    """PatchGuard's masked-feature ("provable adversarial") training aggregation, differentiable.

    logits: (N, H', W', C) per-patch logits (a BagNet with ``avg_pool=False`` in train mode);
    labels: (N,) int64 on the same device. Clip to [0, inf), subtract the true class's largest
    window sum (w x w or (wy, wx); the reference hard-codes 6) from its total, divide every class
    by H' W'. Returns (N, C) logits for the loss, in the input dtype (training, not a certificate:
    no float64). Gradients flow like the reference's (``max`` sends them to one window).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    logits, labels, (wy, wx) = _check_input(logits, labels, window)
    count, height, width, classes = logits.shape
    evidence = logits.clamp(min=0)
    truth = evidence[torch.arange(count, device=logits.device), :, :, labels]  # (N, H', W')
    window_sums = truth.unfold(1, wy, 1).unfold(2, wx, 1).sum(dim=(-2, -1))
    largest = window_sums.flatten(1).max(dim=1).values
    totals = evidence.sum(dim=(1, 2)) - F.one_hot(labels, classes).to(evidence.dtype) * largest.unsqueeze(1)
    return totals / (height * width)
