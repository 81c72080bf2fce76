"""Heatmap figures in the paper's style (matplotlib is an optional dependency: ``pip install
bagnet_fast[plot]``).

Evidence is drawn with a diverging colormap, symmetric around zero and clipped at the 99th
percentile of |evidence| (a few extreme patches would otherwise wash out the rest); the image's
edges are drawn over it so that the evidence can be placed; top patches are outlined.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ._io import write_atomically
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["denormalize", "image_edges", "plot_heatmap", "save_heatmap_png"]


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or bagnet_fast[plot])") from error
    return Figure, FigureCanvasAgg, Rectangle


def denormalize(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """A normalised (3, H, W) image -> (H, W, 3) float array in [0, 1] for display."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one image (3, H, W), got shape {tuple(image.shape)}")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = image.detach().float().cpu() * std_t + mean_t
    return rgb.clamp(0, 1).permute(1, 2, 0).numpy()


def image_edges(rgb: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Boolean (H, W) mask of the strongest ``fraction`` of gradient magnitudes of the grey image."""
    grey = rgb.mean(axis=-1) if rgb.ndim == 3 else rgb
    gy, gx = np.gradient(grey.astype(np.float64))
    magnitude = np.hypot(gx, gy)
    if not np.any(magnitude):
        return np.zeros_like(magnitude, dtype=bool)
    return magnitude >= np.quantile(magnitude, 1.0 - fraction)


def _clip_value(evidence: np.ndarray, percentile: float) -> float:
    value = float(np.percentile(np.abs(evidence), percentile))
    return value if value > 0 else 1.0


def plot_heatmap(
    heatmap,
    image: Optional[np.ndarray] = None,
    *,
    extent: Optional[Tuple[float, float, float, float]] = None,
    boxes_most: Optional[Sequence[Sequence[int]]] = None,
    boxes_least: Optional[Sequence[Sequence[int]]] = None,
    percentile: float = 99.0,
    title: Optional[str] = None,
):
    """A matplotlib Figure: the image (if given) beside the evidence with the image's edges.

    heatmap: (H, W) dense evidence, or a coarse (H', W') patch map with ``extent`` = (left,
    right, bottom, top) in image pixels (the patch centres' span, half a stride beyond).
    image: (H, W, 3) float in [0, 1] (see :func:`denormalize`). Boxes: (top, left, bottom,
    right) pixel boxes, exclusive, outlined on the evidence.
    """
    Figure, FigureCanvasAgg, Rectangle = _matplotlib()
    evidence = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap, dtype=np.float32)
    if evidence.ndim != 2:
        raise ValueError(f"expected a 2-D heatmap, got shape {evidence.shape}")
    limit = _clip_value(evidence, percentile)
    panels = 2 if image is not None else 1
    figure = Figure(figsize=(4.2 * panels, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(1, panels, i + 1) for i in range(panels)]
    if image is not None:
        axes[0].imshow(image)
        axes[0].set_title("image")
    ax = axes[-1]
    shown = ax.imshow(evidence, cmap="RdBu_r", vmin=-limit, vmax=limit, extent=extent, interpolation="nearest")
    if image is not None:
        edges = image_edges(image)
        overlay = np.zeros(edges.shape + (4,), dtype=np.float32)
        overlay[edges] = (0.0, 0.0, 0.0, 0.55)
        ax.imshow(overlay, extent=(-0.5, edges.shape[1] - 0.5, edges.shape[0] - 0.5, -0.5), interpolation="nearest")
        ax.set_xlim(-0.5, edges.shape[1] - 0.5)
        ax.set_ylim(edges.shape[0] - 0.5, -0.5)
    for boxes, colour in ((boxes_most, "#00c000"), (boxes_least, "#ff00ff")):
        for top, left, bottom, right in boxes if boxes is not None else ():
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, edgecolor=colour, linewidth=1.5))
    ax.set_title(title or "evidence", fontsize=9)
    note = f"colour range: {percentile:g}th percentile of |evidence| = {limit:.3g}"
    if boxes_most is not None or boxes_least is not None:
        note += "; boxes: green most, magenta least indicative"
    ax.set_xlabel(note, fontsize=7)
    figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    figure.tight_layout()
    return figure


def save_heatmap_png(figure, path: str) -> None:
    """Write ``figure`` to ``path`` atomically (a temporary file in the same folder, renamed)."""
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
