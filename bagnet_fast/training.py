"""The training step that the benchmarks time, in one place (benchmarks/training_speed.py,
benchmarks/test_bench_training.py and benchmarks/gpu_training.py): a BagNet with a new
``num_classes`` head, trained by SGD with momentum on the cross-entropy, either through the
official modules (``reference_forward``, NCHW) or through bagnet_fast's training path."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch

from . import models


def benchmark_model(
    name: str = "bagnet33",
    *,
    official: bool = False,
    channels_last: Optional[bool] = None,
    recompute: Optional[str] = None,
    num_classes: int = 10,
    device: torch.device = torch.device("cpu"),
) -> Tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(model, forward) in training mode, seeded (``torch.manual_seed(0)``) so that every
    configuration starts from the same weights. ``official``: forward is the official modules'
    ``reference_forward`` (NCHW); otherwise the model itself. ``channels_last`` defaults to
    ``not official``. ``recompute``: gradient checkpointing ("stage", "block", "elementwise") or
    None."""
    if name not in models.PATCH_SIZES:
        raise ValueError(f"unknown model {name!r}; one of {sorted(models.PATCH_SIZES)}")
    torch.manual_seed(0)
    model = getattr(models, name)(num_classes=num_classes).to(device).train()
    model.channels_last = (not official) if channels_last is None else channels_last
    if recompute is not None:
        model.set_grad_checkpointing(True, recompute=recompute)
    return model, (model.reference_forward if official else model)


def sgd_step(
    model: torch.nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Callable[[], torch.Tensor]:
    """A closure running one step (zero_grad, forward and loss under autocast if asked,
    backward, SGD with lr 1e-3 and momentum 0.9) and returning the step's loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def context():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=autocast_dtype)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with context():
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step
