"""BagNet models with the reference architecture (Brendel & Bethge, ICLR 2019).

The modules, parameter names and shapes match the authors' ``bagnets.pytorchnet`` exactly, so
their checkpoints load with ``strict=True``. The plain forward is the reference computation
(the oracle of every test). In eval mode without autograd the forward runs the fused inference
plan of :mod:`bagnet_fast.plan` instead; it computes the same function.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import weights as _weights

__all__ = ["BagNet", "Bottleneck", "bagnet9", "bagnet17", "bagnet33", "PATCH_SIZES"]

# kernel3 per stage for each builder: how many leading blocks of a stage use a 3x3 conv2.
_KERNEL3 = {
    "bagnet9": (1, 1, 0, 0),
    "bagnet17": (1, 1, 1, 0),
    "bagnet33": (1, 1, 1, 1),
}
PATCH_SIZES = {"bagnet9": 9, "bagnet17": 17, "bagnet33": 33}


class Bottleneck(nn.Module):
    """ResNet bottleneck with *valid* (unpadded) convolutions.

    The residual branch is cropped to the top-left of the (smaller) main branch output.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        kernel_size: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, kernel_size=kernel_size, stride=stride, padding=0, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # The reference crops with the last dimension only (square maps); cropping both
        # dimensions is the same for square inputs and correct for the others.
        height, width = out.shape[-2:]
        if residual.shape[-2] != height or residual.shape[-1] != width:
            residual = _crop(residual, height, width)
        return self.relu(out + residual)


def _crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """x[:, :, :height, :width]. A channels-last x (the training path) is cropped by a negative
    padding instead of a slice: the same values, but the gradient comes back channels-last,
    where a slice's backward makes a zero NCHW tensor, and a BatchNorm backward with NCHW
    gradients for channels-last inputs takes a slow generic kernel. Measured on the 2-core AVX2
    VM, the downsample BatchNorm of layer1.0 (4 x 256 x 111 x 111): 429 ms per backward with
    the slice, 57 ms with the padding; a BagNet-33 step at batch 4 spent 694 ms in BatchNorm
    backwards against the official (NCHW) modules' 158 ms."""
    if x.shape[-2] < height or x.shape[-1] < width:  # a crop, never a padding
        raise ValueError(f"residual {tuple(x.shape)} is smaller than the block's output ({height}, {width})")
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))
    return x[:, :, :height, :width]


class BagNet(nn.Module):
    """A BagNet: ResNet-50-like, receptive field capped at ``patch_size`` pixels."""

    def __init__(
        self,
        block: type = Bottleneck,
        layers: Sequence[int] = (3, 4, 6, 3),
        strides: Sequence[int] = (1, 2, 2, 2),
        kernel3: Sequence[int] = (0, 0, 0, 0),
        num_classes: int = 1000,
        avg_pool: bool = True,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(strides) != 4 or len(kernel3) != 4:
            raise ValueError("layers, strides and kernel3 must each have 4 entries (one per stage)")
        self.inplanes = 64
        self.avg_pool = avg_pool
        self.block = block
        self.kernel3 = tuple(int(k) for k in kernel3)
        self.strides = tuple(int(s) for s in strides)
        # Stem: 1x1 then 3x3 valid conv with nothing in between (merged into one conv by the plan).
        self.conv1 = nn.Conv2d(3, 64, kernel_size=1, stride=1, padding=0, bias=False)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=0.001)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0], strides[0], kernel3[0])
        self.layer2 = self._make_layer(block, 128, layers[1], strides[1], kernel3[1])
        self.layer3 = self._make_layer(block, 256, layers[2], strides[2], kernel3[2])
        self.layer4 = self._make_layer(block, 512, layers[3], strides[3], kernel3[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

        self._inference_plan: Any = None
        self.backend: Optional[str] = None  # None: the fastest correct backend available
        # Blocks whose residual branch is constant within this bound (relative to their largest
        # input) are left out of the plan; 0 keeps every block (bagnet_fast.dead_branches).
        self.dead_branch_tolerance: float = 2.0 ** -24
        self.channels_last = True  # the training path's memory format (faster convolutions)
        self.grad_checkpointing: frozenset = frozenset()  # stages recomputed in backward
        self.checkpoint_recompute: str = "stage"  # what is recomputed there (set_grad_checkpointing)

    def _make_layer(
        self, block: type, planes: int, blocks: int, stride: int, kernel3: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, kernel_size=3 if kernel3 > 0 else 1)]
        self.inplanes = planes * block.expansion
        for i in range(1, blocks):
            layers.append(block(self.inplanes, planes, kernel_size=3 if kernel3 > i else 1))
        return nn.Sequential(*layers)

    @property
    def patch_size(self) -> int:
        """Receptive field q of one output position (9, 17 or 33 for the shipped builders)."""
        from .plan import receptive_field

        return receptive_field(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The reference feature map (N, 2048, H', W'), before the head: the authors' modules as
        they are (the oracle; :meth:`forward_features` is the fast way to get the same)."""
        x = self.relu(self.bn1(self.conv2(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference computation, always in plain PyTorch (the oracle of every test)."""
        return self.forward_head(self.features(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """The reference head on (N, 2048, H', W') features: ``fc`` after the mean over H and W
        (avg_pool=True; the reference's AvgPool2d(H) is this for square maps), else ``fc`` on
        every position's feature vector: per-patch logits (N, H', W', K). Any module as ``fc``."""
        if self.avg_pool:
            return self.fc(torch.flatten(self.avgpool(features), 1))
        return self.fc(features.permute(0, 2, 3, 1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, 2048, H', W') features: the fused plan wherever it applies
        (eval, no autograd through the backbone; a new head may train on them), else the
        training path (:meth:`training_features`)."""
        from .plan import check_input, check_model_input_match, fast_path_plan

        check_input(x, self.patch_size)
        check_model_input_match(self, x)
        if not torch.compiler.is_compiling():
            plan = fast_path_plan(self, x, head=False)
            if plan is not None:
                return plan.features(x)
        return self.training_features(x)

    def training_features(self, x: torch.Tensor) -> torch.Tensor:
        """The features through the modules, with the rewrites that stay exact in training:
        channels-last memory throughout, and the stem's conv1 (1x1) and conv2 (3x3) run as one
        3x3 convolution whose weight is computed from both at every call (gradients reach both;
        -3.5 GFLOP forward, -7 backward per 224 image, and the 64 x 224 x 224 output of conv1 is
        never stored). Stages listed in ``grad_checkpointing`` are recomputed in backward instead
        of storing their activations (``checkpoint_recompute``: the whole stage, or only each
        block's BatchNorms, ReLUs and sums; BatchNorm statistics are updated once). The
        downsample runs on its whole input: in training mode its BatchNorm's batch statistics
        cover every position, so computing only the kept ones would change them."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.relu(self.bn1(self._stem_conv(x)))
        for index, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            if index in self.grad_checkpointing and torch.is_grad_enabled():
                recompute = getattr(self, "checkpoint_recompute", "stage")
                if recompute == "elementwise":
                    for block in stage:
                        x = _checkpoint_elementwise(block, x)
                elif recompute == "block":
                    for block in stage:
                        x = _checkpoint_stage(block, x)
                else:
                    x = _checkpoint_stage(stage, x)
            else:
                x = stage(x)
        return x

    def _stem_conv(self, x: torch.Tensor) -> torch.Tensor:
        conv1, conv2 = self.conv1, self.conv2
        # Under torch.compile the two convolutions run as they are: inductor (torch 2.14.1, CPU)
        # miscompiled the training graph with the merged weight, measured: stage-4 gradients 9 %
        # off float64 where eager and the aot_eager backend were within 1e-5.
        if torch.compiler.is_compiling() or not _mergeable_stem(conv1, conv2):
            return conv2(conv1(x))  # hooks, other modules or settings: exactly as the reference
        weight = torch.einsum("omhw,mc->ochw", conv2.weight, conv1.weight[:, :, 0, 0])
        if self.channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, weight, conv2.bias, conv2.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .plan import check_input, check_model_input_match, fast_path_plan, traced_forward, traced_uses_plan

        check_input(x, self.patch_size)
        check_model_input_match(self, x)
        if torch.compiler.is_compiling():  # torch.compile / torch.export: the plan's function, traced
            if traced_uses_plan(self, x):
                return traced_forward(self, x, self.avg_pool)
            return self.forward_head(self.training_features(x))
        plan = fast_path_plan(self, x)
        if plan is not None:
            return plan.run(x, avg_pool=self.avg_pool)
        return self.forward_head(self.forward_features(x))

    # --- timm-style conveniences ------------------------------------------------------------

    @property
    def num_features(self) -> int:
        return self.layer4[-1].conv3.out_channels

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new ``fc`` (Linear num_features -> num_classes; Identity for 0), like timm's."""
        device, dtype = self.conv2.weight.device, self.conv2.weight.dtype
        self.fc = nn.Linear(self.num_features, num_classes).to(device, dtype) if num_classes else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True, stages: Sequence[int] = (1, 2, 3, 4),
                               recompute: str = "stage") -> None:
        """Recompute parts of the given stages (1-4) in backward instead of storing them.

        ``recompute="stage"``: only each stage's input is stored and the whole stage runs again
        in backward (about one more forward of compute; the recomputed stage's activations are
        all live during its backward). ``"block"``: each block's input is stored and each block
        runs again in backward (the same compute; the least memory at the peak, since only one
        block's activations are live at a time: BagNet-33 SGD step, batch 8 at 224, with
        :func:`bagnet_fast.enable_cpu_caching_allocator`, peak resident memory 0.39x the official
        modules' against 0.53x for "stage", README "Fine-tuning"). ``"elementwise"``:
        every convolution's output is stored and only the BatchNorms, ReLUs and residual sums run
        again (no convolution is recomputed; each block stores its input and its convolutions'
        outputs, not the BatchNorm/ReLU outputs). All three are exact: the same operations on the same
        values, gradients and BatchNorm statistics equal to the reference's."""
        if recompute not in ("stage", "block", "elementwise"):
            raise ValueError(f"recompute must be 'stage', 'block' or 'elementwise', got {recompute!r}")
        stages = frozenset(int(s) for s in stages)
        if not stages <= {1, 2, 3, 4}:
            raise ValueError(f"stages must be among 1, 2, 3, 4, got {sorted(stages)}")
        self.grad_checkpointing = stages if enable else frozenset()
        self.checkpoint_recompute = recompute

    def __getstate__(self):
        # The plan is derived data (and holds oneDNN tensors that do not pickle): rebuild it.
        state = self.__dict__.copy()
        state["_inference_plan"] = None
        state.pop("_bagnet_fast_dispatch", None)
        return state


def _mergeable_stem(conv1: nn.Module, conv2: nn.Module) -> bool:
    """Whether conv2(conv1(x)) is one convolution with the product weight here: plain valid
    convolutions without hooks, conv1 1x1 without bias."""
    for conv in (conv1, conv2):
        if type(conv) is not nn.Conv2d or conv._forward_hooks or conv._forward_pre_hooks or conv.groups != 1:
            return False
        if conv.padding not in ((0, 0), 0) or conv.dilation != (1, 1):
            return False
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return False
    return conv1.kernel_size == (1, 1) and conv1.stride == (1, 1) and conv1.bias is None


class _RestoreBatchNormStatistics:
    """Keeps the BatchNorm running statistics of ``module`` as they are across the block: the
    recomputation of a checkpointed stage must not count its batch twice."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                      for m in self.norms if m.running_mean is not None]
        return self

    def __exit__(self, *exc) -> None:
        tracked = [m for m in self.norms if m.running_mean is not None]
        with torch.no_grad():
            for m, (mean, var, count) in zip(tracked, self.saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def _checkpoint_stage(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``stage`` (a stage or one block) recomputed whole in backward; only ``x`` is stored."""
    if torch.compiler.is_compiling():  # the graph's own recomputation: statistics mutate once
        return checkpoint(stage, x, use_reentrant=False)

    return checkpoint(stage, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _RestoreBatchNormStatistics(stage)))


def _convolution_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("convolution", "mkldnn_convolution", "cudnn_convolution", "_convolution")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _save_convolutions(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: keep convolution outputs, recompute everything else
    (BatchNorm, ReLU, slicing, sums: elementwise work)."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _CONVOLUTIONS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_CONVOLUTIONS = _convolution_ops()


@contextlib.contextmanager
def _recompute_context(block: nn.Module, selective):
    """The recomputation's context: the BatchNorm statistics restored around it (entered first,
    so its copies are not seen by the selective-checkpoint mode), then that mode."""
    with _RestoreBatchNormStatistics(block), selective:
        yield


def _checkpoint_elementwise(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import functools

    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    if torch.compiler.is_compiling():  # the graph's own recomputation: statistics mutate once
        return checkpoint(block, x, use_reentrant=False,
                          context_fn=functools.partial(create_selective_checkpoint_contexts, _save_convolutions))

    def contexts():
        forward, recompute = create_selective_checkpoint_contexts(_save_convolutions)
        return forward, _recompute_context(block, recompute)

    return checkpoint(block, x, use_reentrant=False, context_fn=contexts, **_CHECKPOINT_HOOKS)


def _checkpoint_options() -> dict:
    # torch >= 2.12 asks whether saved_tensors_hooks (save_on_cpu, memory counters) see the
    # tensors selective checkpointing keeps: yes, like any other saved tensor.
    import inspect

    return {"respect_saved_tensors_hooks": True} if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters else {}


_CHECKPOINT_HOOKS = _checkpoint_options()


def _bagnet(
    name: str,
    pretrained: bool,
    strides: Sequence[int],
    weights: Optional[str],
    progress: bool,
    **kwargs: Any,
) -> BagNet:
    model = BagNet(Bottleneck, (3, 4, 6, 3), strides=strides, kernel3=_KERNEL3[name], **kwargs)
    if pretrained and weights is not None:
        raise ValueError("pass either pretrained=True or weights=PATH, not both")
    if pretrained:
        model.load_state_dict(_weights.load_pretrained(name, progress=progress))
    elif weights is not None:
        model.load_state_dict(_weights.load_checkpoint(weights))
    return model


def bagnet9(
    pretrained: bool = False,
    strides: Sequence[int] = (2, 2, 2, 1),
    *,
    weights: Optional[str] = None,
    progress: bool = True,
    **kwargs: Any,
) -> BagNet:
    """BagNet-9 (patch size 9). ``pretrained`` loads the authors' ImageNet weights;
    ``weights`` loads a local checkpoint file. kwargs: ``num_classes``, ``avg_pool``."""
    return _bagnet("bagnet9", pretrained, strides, weights, progress, **kwargs)


def bagnet17(
    pretrained: bool = False,
    strides: Sequence[int] = (2, 2, 2, 1),
    *,
    weights: Optional[str] = None,
    progress: bool = True,
    **kwargs: Any,
) -> BagNet:
    """BagNet-17 (patch size 17). See :func:`bagnet9` for the arguments."""
    return _bagnet("bagnet17", pretrained, strides, weights, progress, **kwargs)


def bagnet33(
    pretrained: bool = False,
    strides: Sequence[int] = (2, 2, 2, 1),
    *,
    weights: Optional[str] = None,
    progress: bool = True,
    **kwargs: Any,
) -> BagNet:
    """BagNet-33 (patch size 33). See :func:`bagnet9` for the arguments."""
    return _bagnet("bagnet33", pretrained, strides, weights, progress, **kwargs)
