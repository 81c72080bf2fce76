"""``accelerate``: any BagNet-architecture model or checkpoint -> a fast inference module."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .models import BagNet, Bottleneck
from .weights import load_checkpoint, unwrap_state_dict

__all__ = ["accelerate", "bagnet_from_state_dict"]


def _kernel3_and_depths(state: Mapping[str, torch.Tensor]):
    kernel3, depths = [], []
    for stage in range(1, 5):
        depth = 0
        while f"layer{stage}.{depth}.conv2.weight" in state:
            depth += 1
        if depth == 0:
            raise ValueError(f"not a BagNet state_dict: no layer{stage}.0.conv2.weight")
        sizes = [state[f"layer{stage}.{i}.conv2.weight"].shape[-1] for i in range(depth)]
        # kernel3[s] = number of leading blocks with a 3x3 conv2 (the reference's rule).
        leading = next((i for i, k in enumerate(sizes) if k != 3), depth)
        if any(k == 3 for k in sizes[leading:]):
            raise ValueError(f"not a BagNet: 3x3 convolutions after 1x1 ones in layer{stage}")
        kernel3.append(leading)
        depths.append(depth)
    return kernel3, depths


def bagnet_from_state_dict(
    state: Mapping[str, torch.Tensor],
    strides: Sequence[int] = (2, 2, 2, 1),
    avg_pool: bool = True,
) -> BagNet:
    """A :class:`BagNet` with the architecture that ``state`` describes, weights loaded."""
    state = unwrap_state_dict(state)
    if "fc.weight" not in state:
        raise ValueError("not a BagNet state_dict: no fc.weight")
    kernel3, depths = _kernel3_and_depths(state)
    model = BagNet(
        Bottleneck,
        depths,
        strides=strides,
        kernel3=kernel3,
        num_classes=state["fc.weight"].shape[0],
        avg_pool=avg_pool,
    )
    model.load_state_dict(state, strict=True)
    return model


def accelerate(
    model: Any,
    backend: Optional[str] = None,
    *,
    strides: Optional[Sequence[int]] = None,
    avg_pool: Optional[bool] = None,
) -> BagNet:
    """A fast inference copy of ``model``.

    ``model`` may be our :class:`BagNet`, the authors' ``bagnets.pytorchnet.BagNet`` (or any
    module with that architecture and state_dict), a DataParallel-wrapped one, a state_dict
    (plain, ``module.``-prefixed or wrapped in {"state_dict": ...}) or a checkpoint path.
    The result is a :class:`BagNet` in eval mode with frozen parameters on the model's device
    and dtype, so its forward always runs the fused inference plan (gradients w.r.t. the input
    still work: they take the reference path). ``backend`` forces one backend.
    """
    source_module = None
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    if isinstance(model, nn.Module):
        source_module = model
        state = model.state_dict()
    elif isinstance(model, (str, os.PathLike)):
        state = load_checkpoint(model)
    elif isinstance(model, Mapping):
        state = unwrap_state_dict(model)
    else:
        raise TypeError(
            f"accelerate() takes a BagNet module, a state_dict or a checkpoint path, "
            f"not {type(model).__name__}"
        )
    if strides is None:
        strides = (
            [source_module.__getattr__(f"layer{s}")[0].conv2.stride[0] for s in range(1, 5)]
            if source_module is not None and hasattr(source_module, "layer1")
            else (2, 2, 2, 1)
        )
    if avg_pool is None:
        avg_pool = bool(getattr(source_module, "avg_pool", True))
    fast = bagnet_from_state_dict(state, strides=strides, avg_pool=avg_pool)
    reference_weight = state["fc.weight"]
    fast = fast.to(device=reference_weight.device, dtype=reference_weight.dtype)
    fast.eval().requires_grad_(False)
    fast.backend = backend
    if backend is not None:  # fail now, not at the first forward, if it cannot run here
        from .plan import get_plan

        get_plan(fast)
    return fast
