"""The inference plan: a BagNet compiled into a short list of named fused units.

Exact rewrites applied when the plan is built (same function, float rounding aside; see
docs/design.md):
- BatchNorm folded into each convolution's weight and a bias (in float64);
- the stem's conv1 (1x1, 3->64) and conv2 (3x3, 64->64), with nothing between them, merged into
  one 3x3 conv 3->64: W[o, c] = sum_m W2[o, m] W1[m, c] (saves 3.5 GFLOP per 224 image);
- the downsample of a cropped residual computed on the pixels the crop keeps (a 1x1 conv
  commutes with the crop): the plan's downsample is a stride-1 conv on the subsampled input;
- the stride of a 1x1 strided block moved up through the 1x1-only blocks before it
  (:func:`_move_strides_up`: BagNet-9's layer2 at a quarter of the pixels);
- the linear head applied after the spatial mean.

Units (``plan.units``): ``stem`` (op ``stem_conv_bias_relu``), ``layer{s}.{i}`` (op
``pointwise_bottleneck`` for 1x1-only blocks, ``bottleneck`` otherwise), then the head
(``spatial_mean_linear`` / ``patch_logits``). Each unit knows its geometry: stride, receptive
field and output stride after it, output size. :meth:`InferencePlan.walk` is the one loop
over them, with a per-unit hook for profiling and explanations.

The plan is cached on the model (:func:`get_plan`) and used only while it is fresh
(:class:`PlanState`): same modules and tensors (identity, kept alive by the plan, so memory
reuse cannot fake it), same version counters, data pointers, dtypes and devices, same
attributes the plan depends on (BatchNorm eps, convolution geometry) and, on CPU, the same
values at sampled positions of every tensor (writes through ``.data`` or numpy views bypass
version counters). :func:`refresh` drops a plan; ``BAGNET_FAST_VERIFY_PLAN=1`` (or
:func:`verify_plans`) compares every tensor in full before each use.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from . import executors as _backends
from .executors.base import downsample_input as _downsample_input
from ._plan_state import PlanState, UnsupportedModel, check_structure, dispatch_problem, head_problem
from .dead_branches import DEFAULT_TOLERANCE, eliminate_dead_branches
from .ops import reference as ref
from .precision import fast_path_precision

__all__ = [
    "ConvUnit",
    "StemUnit",
    "BlockUnit",
    "HeadUnit",
    "InferencePlan",
    "build_plan",
    "get_plan",
    "plan_is_fresh",
    "refresh",
    "verify_plans",
    "check_input",
    "receptive_field",
    "uses_inference_plan",
    "fast_path_plan",
    "traced_forward",
    "UnsupportedModel",
]


# --------------------------------------------------------------------------- units


@dataclass
class ConvUnit:
    """A valid k x k convolution with folded BatchNorm: weight (Cout, Cin, k, k) channels-last,
    bias (Cout,)."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: int = 1
    prepared: Dict[str, object] = field(default_factory=dict)  # backend-specific forms

    @property
    def kernel_size(self) -> int:
        return self.weight.shape[-1]

    @property
    def matrix(self) -> torch.Tensor:
        """The (Cout, Cin) matrix of a 1x1 convolution."""
        return self.weight.flatten(1)


@dataclass
class _Geometry:
    """Where a unit sits: its name, op, channels, and the geometry of its output."""

    name: str
    kind: str  # the op, also the backend method: "stem_conv_bias_relu", "bottleneck", ...
    in_channels: int
    out_channels: int
    kernel: int  # of its spatial conv (1 or 3)
    stride: int  # of this unit
    receptive_field: int  # side of the input patch one output position sees, after this unit
    jump: int  # input pixels between neighbouring output positions, after this unit

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """(H, W) of the output for an input map of (height, width)."""
        return (height - self.kernel) // self.stride + 1, (width - self.kernel) // self.stride + 1


@dataclass
class StemUnit(_Geometry):
    conv: ConvUnit = None  # type: ignore[assignment]

    def convolutions(self) -> Iterator[ConvUnit]:
        yield self.conv


@dataclass
class BlockUnit(_Geometry):
    """One bottleneck block; ``downsample`` is the stride-1 1x1 conv on the input subsampled by
    ``downsample_stride`` and cropped (see ``backends.base.downsample_input``)."""

    conv1: ConvUnit = None  # type: ignore[assignment]
    conv2: ConvUnit = None  # type: ignore[assignment]
    conv3: ConvUnit = None  # type: ignore[assignment]
    downsample: Optional[ConvUnit] = None
    downsample_stride: int = 1
    # The output is the module's output at every subsample-th row and column (1: the same map);
    # > 1 for the blocks computed below their stride by ``_move_strides_up``.
    subsample: int = 1

    @property
    def is_pointwise(self) -> bool:
        """A 1x1-only block with an identity residual: one fused ``pointwise_bottleneck``."""
        return self.kind == "pointwise_bottleneck"

    def convolutions(self) -> Iterator[ConvUnit]:
        yield from (c for c in (self.conv1, self.conv2, self.conv3, self.downsample) if c is not None)


@dataclass
class HeadUnit:
    """The linear head: ``spatial_mean_linear`` (avg_pool=True) or ``patch_logits``."""

    weight: torch.Tensor  # (K, C)
    bias: torch.Tensor  # (K,)
    name: str = "head"


# --------------------------------------------------------------------------- the plan


Hook = Callable[[object, Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass
class InferencePlan:
    stem: StemUnit
    blocks: List[BlockUnit]
    head: HeadUnit
    backend: "_backends.Backend"
    finite_weights: bool = True  # every folded weight and bias finite (see ``executor``)
    state: Optional[PlanState] = None  # what it was built from (freshness)
    dead_branches: List[object] = field(default_factory=list)  # dead_branches.DeadBranch records

    @property
    def eliminated(self) -> List[object]:
        """The blocks removed as dead branches (their constants are in the neighbours' biases)."""
        return [d for d in self.dead_branches if d.eliminated]

    # --- description --------------------------------------------------------------------

    @property
    def units(self) -> List[_Geometry]:
        """The stem and the blocks, in order (the head is ``plan.head``)."""
        return [self.stem, *self.blocks]

    def unit(self, name: str):
        """The unit called ``name`` ("stem", "layer1.0", ..., "head")."""
        if name == "head":
            return self.head
        for unit in self.units:
            if unit.name == name:
                return unit
        raise KeyError(f"no unit {name!r} in this plan; units: {[u.name for u in self.units] + ['head']}")

    def convolutions(self) -> Iterator[ConvUnit]:
        for unit in self.units:
            yield from unit.convolutions()

    @property
    def patch_size(self) -> int:
        """Receptive field q of one output position (9, 17 or 33 for the shipped BagNets)."""
        return self.units[-1].receptive_field

    @property
    def stride(self) -> int:
        """Input pixels between neighbouring output positions (8 for the shipped BagNets)."""
        return self.units[-1].jump

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """(H', W') of the patch map for (height, width) images."""
        for unit in self.units:
            height, width = unit.output_size(height, width)
        return height, width

    def input_extent(self, height: int, width: int) -> Tuple[int, int]:
        """(rows, cols) at the top left of (height, width) images that the patch map depends on:
        (H' - 1) * stride + patch_size per side, since every convolution is valid (unpadded) and
        each crop keeps the top left. The rest is never read by any output position: at 224 the
        217 x 217 corner (for q = 9, 17 and 33), so running on it skips 1.5 % of the FLOPs
        (stem 222^2 -> 215^2 positions, layer1 110^2 -> 107^2, layer2 54^2 -> 53^2) and gives
        the same numbers. The full size where the crop would not keep (H', W') (not a BagNet
        geometry, images smaller than a patch)."""
        out = self.output_size(height, width)
        extent = tuple((o - 1) * self.stride + self.patch_size for o in out)
        if min(out) < 1 or extent[0] > height or extent[1] > width or self.output_size(*extent) != out:
            return height, width
        return extent

    @property
    def fc_weight(self) -> torch.Tensor:
        return self.head.weight

    @property
    def fc_bias(self) -> torch.Tensor:
        return self.head.bias

    @property
    def device(self) -> torch.device:
        return self.stem.conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.stem.conv.weight.dtype

    def _fused_head(self) -> HeadUnit:
        if self.head is None:
            raise ValueError("this model's head (fc) is not an nn.Linear: the plan computes its features "
                             "(plan.features, BagNet.forward_features), its own head runs on them")
        return self.head

    # --- running --------------------------------------------------------------------------

    def executor(self, x: torch.Tensor) -> "_backends.Backend":
        """The backend that runs ``x``: the plan's, or the torch backend where the plan's would
        turn a NaN into a number. A backend whose fused ReLU maps NaN to 0 (oneDNN's) can only
        meet a NaN or infinity if the input holds one or a weight does (or an activation exceeds
        3.4e38, which needs inputs about 1e30 times a normalised image's): such inputs and
        plans run the exact torch composition of the same units. The check reads the input once
        (0.6 MB per 224 image)."""
        backend = self.backend
        if backend.propagates_nan(x.device):
            return backend
        if self.finite_weights and bool(torch.isfinite(x).all()):
            return backend
        return _torch_backend()

    def walk(self, x: torch.Tensor, hook: Optional[Hook] = None, upto: Optional[int] = None,
             executor: Optional["_backends.Backend"] = None, crop: bool = True) -> torch.Tensor:
        """Run the stem and the blocks (the first ``upto`` units) on images (N, 3, H, W): features
        (N, C, H', W') in channels-last memory. ``hook(unit, run, x)`` is called for each unit
        instead of ``run(x)`` and returns the unit's output (time it, transform its input, ...).
        The units see ``x`` cropped to ``input_extent`` (the pixels no output depends on are
        dropped before the first copy); ``crop=False`` for a hook that moves the output grid
        (dense heatmaps' shifted phases read the pixels past it)."""
        executor = executor or self.executor(x)
        if crop:
            rows, cols = self.input_extent(*x.shape[-2:])
            x = x[..., :rows, :cols]
        x = x.contiguous(memory_format=torch.channels_last)
        for unit in self.units[:upto]:
            run = _runner(executor, unit)
            x = run(x) if hook is None else hook(unit, run, x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, C, H', W') features in channels-last memory."""
        if x.shape[0] == 0:
            return x.new_empty((0, self.units[-1].out_channels, *self.output_size(*x.shape[-2:])))
        with fast_path_precision(self.dtype, x.device.type):
            return self.walk(x)

    def patch_logits(self, x: torch.Tensor, classes=None, hook: Optional[Hook] = None,
                     crop: bool = True) -> torch.Tensor:
        """Per-patch logits (N, H', W', K) (K = len(classes) when given); ``crop`` as in ``walk``."""
        self._fused_head()
        if x.shape[0] == 0:
            count = self.head.weight.shape[0] if classes is None else len(classes)
            return x.new_empty((0, *self.output_size(*x.shape[-2:]), count))
        with fast_path_precision(self.dtype, x.device.type):
            executor = self.executor(x)
            features = self.walk(x, hook, executor=executor, crop=crop)
            run = lambda f: executor.patch_logits(f, self.head.weight, self.head.bias, classes)  # noqa: E731
            return run(features) if hook is None else hook(self.head, run, features)

    def run(self, x: torch.Tensor, avg_pool: bool = True, hook: Optional[Hook] = None) -> torch.Tensor:
        """Logits (N, K) with avg_pool, else per-patch logits (N, H', W', K). With a hook every
        unit runs on its own (the fused last block + mean is split into its two units)."""
        self._fused_head()
        if x.shape[0] == 0:  # the reference's shapes, without launching anything
            classes = self.head.weight.shape[0]
            shape = (0, classes) if avg_pool else (0, *self.output_size(*x.shape[-2:]), classes)
            return x.new_empty(shape)
        if not avg_pool:
            return self.patch_logits(x, hook=hook)
        with fast_path_precision(self.dtype, x.device.type):
            return self._logits(x, hook)

    def _logits(self, x: torch.Tensor, hook: Optional[Hook]) -> torch.Tensor:
        executor = self.executor(x)
        last = self.blocks[-1]
        if hook is None and last.is_pointwise:
            # The last block and the head's mean together: a backend may fuse them.
            x = self.walk(x, upto=len(self.units) - 1, executor=executor)
            means = executor.pointwise_bottleneck_mean(last, x)
            return ref.mean_linear(means, self.head.weight, self.head.bias, x.dtype)
        features = self.walk(x, hook, executor=executor)
        run = lambda f: executor.spatial_mean_linear(f, self.head.weight, self.head.bias)  # noqa: E731
        return run(features) if hook is None else hook(self.head, run, features)


def _runner(executor, unit) -> Callable[[torch.Tensor], torch.Tensor]:
    method = getattr(executor, unit.kind)
    return lambda x: method(unit, x)


_TORCH_BACKEND: List["_backends.Backend"] = []


def _torch_backend() -> "_backends.Backend":
    if not _TORCH_BACKEND:
        _TORCH_BACKEND.append(_backends.select("torch", "cpu", torch.float32))
    return _TORCH_BACKEND[0]


# --------------------------------------------------------------------------- input checks


def patch_geometry(model: nn.Module) -> Tuple[int, int]:
    """(patch size q, output stride) of a BagNet-architecture model (stem 3x3, then each block's
    conv2): (33, 8) for BagNet-33."""
    size, jump = 3, 1
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            kernel, stride = block.conv2.kernel_size[0], block.conv2.stride[0]
            size += (kernel - 1) * jump
            jump *= stride
    return size, jump


def receptive_field(model: nn.Module) -> int:
    """Patch size q of a BagNet-architecture model."""
    return patch_geometry(model)[0]


def check_input(x: torch.Tensor, patch_size: int) -> None:
    """Clear errors for what the reference would reject with a cryptic one (or accept wrongly)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"expected a 4-D batch of images (N, 3, H, W), got shape {tuple(x.shape)}; "
            "use x.unsqueeze(0) for a single image"
        )
    if x.shape[1] != 3:
        raise ValueError(
            f"expected 3 colour channels in dimension 1 (N, 3, H, W), got shape {tuple(x.shape)}"
            + ("; the images look channels-last (N, H, W, 3): permute(0, 3, 1, 2)" if x.shape[-1] == 3 else "")
        )
    if not x.is_floating_point():
        raise TypeError(
            f"expected floating-point images normalised with the ImageNet mean/std, got {x.dtype}; "
            "see bagnet_fast.preprocess for uint8 images"
        )
    if x.shape[2] < patch_size or x.shape[3] < patch_size:
        raise ValueError(
            f"images must be at least {patch_size}x{patch_size} pixels (the patch size of this "
            f"BagNet), got {x.shape[2]}x{x.shape[3]}"
        )


def check_model_input_match(model: nn.Module, x: torch.Tensor) -> None:
    weight = model.conv2.weight  # the first weight the images meet (the head may be any module)
    if x.device != weight.device:
        raise ValueError(f"images are on {x.device} but the model is on {weight.device}")
    if x.dtype != weight.dtype:
        raise TypeError(
            f"images are {x.dtype} but the model is {weight.dtype}; convert one of them "
            f"(e.g. x.to({weight.dtype}) or model.to({x.dtype}))"
        )


# --------------------------------------------------------------------------- when the plan runs


_noted: set = set()


def uses_inference_plan(model: nn.Module, x: torch.Tensor, head: bool = True) -> bool:
    """Whether a forward of ``model`` on ``x`` runs the plan (else: the reference modules);
    with ``head=False``, whether the plan computes the features (the head's own parameters may
    then require grad: a new head trained on a frozen backbone gets the fused features).

    The plan computes the eval-mode function of the modules as they are; it is not used when
    - an autograd graph is needed: grad enabled and the input or any parameter requires grad
      (saliency maps, fine-tuning in eval mode get the reference's gradients);
    - any sub-module is in training mode (its BatchNorm uses batch statistics);
    - any sub-module has forward hooks or pre-hooks, or global module hooks are set (they must
      see their module run: captum's layer attributions, feature extractors);
    - TorchScript traces or scripts the model (``torch.jit.trace`` records the reference);
    - the structure is one the plan does not understand (a BatchNorm replaced by Identity, a
      ReLU by another activation, BatchNorm without running statistics): a one-time note says so.
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch.is_grad_enabled():
        if x.requires_grad or any(p.requires_grad for p in _backbone_parameters(model, head)):
            return False
    problem = dispatch_problem(model, head)
    if problem is None:
        return True
    kind, reason = problem
    if kind in ("unsupported", "head") and (type(model), reason) not in _noted:
        _noted.add((type(model), reason))
        what = ("the fused head is not used (the plan computes the features, the head module runs on them)"
                if kind == "head" else "running the reference modules, not the fused plan")
        warnings.warn(f"bagnet_fast: {what}: {reason}", stacklevel=3)
    return False


def _backbone_parameters(model: nn.Module, head: bool):
    if head or not hasattr(model, "fc"):
        return model.parameters()
    skip = {id(p) for p in model.fc.parameters()}
    return (p for p in model.parameters() if id(p) not in skip)


_verify_all = [os.environ.get("BAGNET_FAST_VERIFY_PLAN") == "1"]


def verify_plans(enabled: bool = True):
    """Compare every weight in full before each use of a cached plan (slow: reads all weights,
    and on a GPU waits for them). Use as a function (sets it for the process) or as a context
    manager (for the block). ``BAGNET_FAST_VERIFY_PLAN=1`` sets it at import."""
    previous = _verify_all[0]
    _verify_all[0] = enabled
    return _Restore(previous)


class _Restore:
    def __init__(self, previous: bool) -> None:
        self._previous = previous

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        _verify_all[0] = self._previous


def fast_path_plan(model: nn.Module, x: torch.Tensor, head: bool = True) -> Optional[InferencePlan]:
    """The plan a forward of ``model`` on ``x`` runs (``head=False``: for its features only), or
    None for the reference modules (:func:`uses_inference_plan`; a structure the plan cannot
    fold, found when it is built, also gives None, with a one-time note)."""
    if not uses_inference_plan(model, x, head):
        return None
    try:
        return get_plan(model)
    except UnsupportedModel as error:
        if (type(model), str(error)) not in _noted:
            _noted.add((type(model), str(error)))
            warnings.warn(f"bagnet_fast: running the reference modules, not the fused plan: {error}", stacklevel=3)
        return None


def get_plan(model: nn.Module) -> InferencePlan:
    """The model's cached plan, rebuilt if anything it depends on changed since it was built
    (see :class:`PlanState`). (Under torch.compile / torch.export the forward runs
    :func:`traced_forward` instead: no cache, no pointer reads.)"""
    settings = plan_settings(model)
    cached = getattr(model, "_inference_plan", None)
    if cached is not None and cached.state.is_fresh(model, settings, full=_verify_all[0]):
        return cached
    plan = build_plan(model, *settings)
    model._inference_plan = plan
    return plan


def plan_settings(model: nn.Module) -> tuple:
    """What a plan is built for besides the weights: (backend, dead-branch tolerance)."""
    return getattr(model, "backend", None), getattr(model, "dead_branch_tolerance", DEFAULT_TOLERANCE)


def plan_is_fresh(model: nn.Module) -> bool:
    """Whether the model's cached plan (if any) still computes what the model computes."""
    cached = getattr(model, "_inference_plan", None)
    return cached is not None and cached.state.is_fresh(model, plan_settings(model), full=_verify_all[0])


def refresh(model: nn.Module) -> None:
    """Drop the model's cached plan: the next forward builds a new one. Needed only for writes
    that no check sees (see :class:`PlanState`), e.g. a partial in-place write through ``.data``
    into a CUDA tensor."""
    model._inference_plan = None


# --------------------------------------------------------------------------- building


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm(conv(x)) == conv'(x) + bias' in eval mode; computed in float64 for accuracy."""
    weight = conv.weight if weight is None else weight
    gamma = bn.weight.double() if bn.weight is not None else 1.0  # affine=False: no weight, no bias
    scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    folded = weight.double() * scale.view(-1, 1, 1, 1)
    bias = -bn.running_mean.double() * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    return folded.to(weight.dtype), bias.to(weight.dtype)


def _conv_unit(conv: nn.Conv2d, bn: nn.BatchNorm2d, weight: Optional[torch.Tensor] = None,
               stride: Optional[int] = None) -> ConvUnit:
    w, b = _fold(conv, bn, weight)
    return ConvUnit(w.contiguous(memory_format=torch.channels_last), b.contiguous(),
                    conv.stride[0] if stride is None else stride)


def merged_stem_weight(model: nn.Module) -> torch.Tensor:
    """conv2 o conv1 as one 3x3 conv 3->64 (both linear, nothing between them)."""
    w1 = model.conv1.weight.double()[:, :, 0, 0]  # (64, 3)
    w2 = model.conv2.weight.double()  # (64, 64, 3, 3)
    return torch.einsum("omhw,mc->ochw", w2, w1).to(model.conv2.weight.dtype)


def _blocks(model: nn.Module, first_jump: int, first_field: int) -> List[BlockUnit]:
    units, jump, field_size = [], first_jump, first_field
    for stage_index, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), start=1):
        for index, block in enumerate(stage):
            kernel, stride = block.conv2.kernel_size[0], block.conv2.stride[0]
            downsample = None
            if block.downsample is not None:
                downsample = _conv_unit(block.downsample[0], block.downsample[1], stride=1)
            field_size += (kernel - 1) * jump
            jump *= stride
            pointwise = kernel == 1 and stride == 1 and downsample is None
            units.append(BlockUnit(
                name=f"layer{stage_index}.{index}",
                kind="pointwise_bottleneck" if pointwise else "bottleneck",
                in_channels=block.conv1.in_channels, out_channels=block.conv3.out_channels,
                kernel=kernel, stride=stride, receptive_field=field_size, jump=jump,
                conv1=_conv_unit(block.conv1, block.bn1), conv2=_conv_unit(block.conv2, block.bn2),
                conv3=_conv_unit(block.conv3, block.bn3),
                downsample=downsample,
                downsample_stride=block.downsample[0].stride[0] if downsample is not None else 1,
            ))
    return units


def _move_strides_up(blocks: List[BlockUnit]) -> List[BlockUnit]:
    """Exact rewrite: a first block whose conv2 is 1x1 with stride s (BagNet-9's layer3.0) reads
    only every s-th row and column of its input, in conv1 and in its downsample alike; the 1x1-only
    blocks before it commute with that subsampling, back to the last block with a 3x3 conv2 and a
    downsample, whose conv2 and downsample then run at stride t·s. So those blocks compute s² times
    fewer pixels (BagNet-9: layer2 at 27² instead of 54² for a 224 image, a quarter of its FLOPs;
    OpenVINO's StridesOptimization pass does the same) and the strided block runs at stride 1.
    Sizes agree: a valid conv's ceil-divided output count is the strided one's, (H−k)//(t·s) + 1.
    Receptive fields and the final stride are unchanged; intermediate maps are smaller."""
    for index, block in enumerate(blocks):
        if not (block.kernel == 1 and block.stride > 1 and block.downsample is not None
                and block.downsample_stride == block.stride):
            continue
        first = index - 1
        while first >= 0 and blocks[first].is_pointwise:
            first -= 1
        if first < 0 or blocks[first].downsample is None:
            continue
        stride, source = block.stride, blocks[first]
        source.stride *= stride
        source.conv2.stride *= stride
        source.downsample_stride *= stride
        for unit in blocks[first:index]:
            unit.jump *= stride  # the output stride after these units (the strided block's is unchanged)
            unit.subsample *= stride
        block.stride = block.conv2.stride = block.downsample_stride = 1
    return blocks


def _head_unit(model: nn.Module) -> Optional[HeadUnit]:
    """The fused head (any nn.Linear ``fc``; no bias: zeros), or None where it is another module."""
    if head_problem(model) is not None:
        return None
    weight = model.fc.weight.detach()
    bias = model.fc.bias.detach() if model.fc.bias is not None else weight.new_zeros(weight.shape[0])
    return HeadUnit(weight, bias)


def build_plan(model: nn.Module, backend_name: Optional[str] = None,
               dead_branch_tolerance: float = DEFAULT_TOLERANCE) -> InferencePlan:
    """Fold, merge and prepare a BagNet-architecture model for ``backend_name`` (None: the
    fastest correct backend for the model's device and dtype), eliminating the blocks whose
    branch is constant within ``dead_branch_tolerance`` (relative to the block's largest input;
    0 keeps every block; see :mod:`bagnet_fast.dead_branches`). Raises :class:`UnsupportedModel`
    for a structure the plan does not understand."""
    check_structure(model, head=False)
    device, dtype = model.conv2.weight.device, model.conv2.weight.dtype
    backend = _backends.select(backend_name, device, dtype)
    with torch.no_grad():
        stem_conv = _conv_unit(model.conv2, model.bn1, merged_stem_weight(model))
        stem = StemUnit(name="stem", kind="stem_conv_bias_relu", in_channels=3,
                        out_channels=model.conv2.out_channels, kernel=3, stride=1, receptive_field=3, jump=1,
                        conv=stem_conv)
        plan = InferencePlan(
            stem=stem,
            blocks=_move_strides_up(_blocks(model, stem.jump, stem.receptive_field)),
            head=_head_unit(model),
            backend=backend,
        )
        plan.dead_branches = eliminate_dead_branches(plan, model, dead_branch_tolerance)
        tensors = [t for conv in plan.convolutions() for t in (conv.weight, conv.bias)]
        if plan.head is not None:
            tensors += [plan.head.weight, plan.head.bias]
        plan.finite_weights = all(bool(torch.isfinite(t).all()) for t in tensors)
        plan.state = PlanState(model, (backend_name, dead_branch_tolerance), verify=_verify_all[0])
        backend.prepare(plan)
    return plan


# --------------------------------------------------------------------------- torch.compile / export


def traced_uses_plan(model: nn.Module, x: torch.Tensor) -> bool:
    """:func:`uses_inference_plan` in a form torch.compile and torch.export trace into guards
    (no caches, no pointer reads)."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.parameters())):
        return False
    for module in model.modules():
        if module is not model and (module.training or module._forward_hooks or module._forward_pre_hooks):
            return False
    return True


def traced_forward(model: nn.Module, x: torch.Tensor, avg_pool: bool) -> torch.Tensor:
    """The plan's function for torch.compile and torch.export: the same exact rewrites (BatchNorm
    folded in float64, the merged stem, the downsample of the kept pixels, the head after the
    mean) computed from the live weights inside the graph, so a compiled model stays correct
    when its weights change and an exported program carries the model's own state_dict. Units
    run as the Triton ops on CUDA tensors (where triton is installed), else as their
    pure-PyTorch twins, which inductor lowers to its own kernels."""
    check_structure(model)
    ops = _traced_ops(x)
    x = ops.conv_bias_act(x.contiguous(memory_format=torch.channels_last),
                          *_fold(model.conv2, model.bn1, merged_stem_weight(model)))
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            x = _traced_block(ops, block, x)
    if avg_pool:
        return ops.spatial_mean_linear(x, model.fc.weight, model.fc.bias)
    return ops.patch_logits(x, model.fc.weight, model.fc.bias)


def _traced_block(ops, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w1, b1 = _fold(block.conv1, block.bn1)
    w2, b2 = _fold(block.conv2, block.bn2)
    w3, b3 = _fold(block.conv3, block.bn3)
    stride = block.conv2.stride[0]
    if block.downsample is None and block.conv2.kernel_size[0] == 1 and stride == 1:
        return ops.pointwise_bottleneck(x, w1, b1, w2, b2, w3, b3)
    t = ops.conv_bias_act(ops.conv_bias_act(x, w1, b1), w2, b2, stride)
    height, width = t.shape[-2:]
    if block.downsample is None:
        residual = ref.crop_top_left(x, height, width)
    else:
        wd, bd = _fold(block.downsample[0], block.downsample[1])
        xs = _downsample_input(x, stride, height, width).contiguous(memory_format=torch.channels_last)
        residual = ops.conv_bias_act(xs, wd, bd, 1, relu=False)
    return ops.conv_bias_act(t, w3, b3, residual=residual)


def _traced_ops(x: torch.Tensor):
    if x.is_cuda:
        try:
            from .ops import triton_ops

            return triton_ops
        except ImportError:  # no triton: the pure-PyTorch twins
            pass
    return ref
