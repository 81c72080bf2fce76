"""When a cached plan may be used: the model's structure, modes, hooks and tensors, checked
cheaply before every forward (see :class:`PlanState`).

Replacing a module, parameter or buffer anywhere goes through ``nn.Module.__setattr__``, whose
global registration hooks bump ``_EPOCH``; only then are identities compared again. Everything
else is read at every forward: training flags and hooks of every sub-module, the attributes the
plan depends on (BatchNorm eps, convolution geometry), and per tensor its data pointer, version
counter, dtype, device and (CPU tensors) the values at 8 evenly spaced positions, in one call
of the C++ op ``bagnet_fast::tensor_states``. About 0.08 ms for a BagNet-33 (321 tensors) on the development machine.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _module

from . import _extension

__all__ = ["PlanState", "UnsupportedModel", "check_structure", "dispatch_problem", "head_problem", "tensor_states", "SAMPLES"]

SAMPLES = 8  # values read per tensor by the freshness check (CPU tensors): ~5 us per 100 tensors, cache misses

_EPOCH = [0]


def _bump(*args) -> None:
    _EPOCH[0] += 1


# Any module, parameter or buffer assignment on any module, in this process.
_module.register_module_module_registration_hook(_bump)
_module.register_module_parameter_registration_hook(_bump)
_module.register_module_buffer_registration_hook(_bump)


class UnsupportedModel(ValueError):
    """A module structure the fused plan does not compute (the reference modules run instead)."""


# --------------------------------------------------------------------------- structure


def _expect(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise UnsupportedModel(f"{where}: {what}")


def _check_conv(conv, where: str) -> None:
    _expect(type(conv) is nn.Conv2d, where, f"a {type(conv).__name__}, not an nn.Conv2d")
    _expect(conv.bias is None, where, "has a bias (BagNet convolutions have none)")
    _expect(conv.padding in ((0, 0), 0) and conv.dilation == (1, 1) and conv.groups == 1,
            where, "padding, dilation or groups (BagNet convolutions are valid, undilated, ungrouped)")
    _expect(conv.stride[0] == conv.stride[1] and conv.kernel_size[0] == conv.kernel_size[1],
            where, f"a non-square stride {conv.stride} or kernel {conv.kernel_size}")


def _check_bn(bn, where: str) -> None:
    _expect(type(bn) is nn.BatchNorm2d, where, f"a {type(bn).__name__}, not an nn.BatchNorm2d")
    _expect(bn.running_mean is not None and bn.running_var is not None, where,
            "a BatchNorm without running statistics (it normalises with batch statistics)")


def head_problem(model: nn.Module) -> Optional[str]:
    """Why the plan cannot fuse ``model``'s head (None: it can): any nn.Linear ``fc`` after the
    reference's mean. Other heads run on the plan's features (``BagNet.forward_head``)."""
    if not (isinstance(model.avgpool, nn.AdaptiveAvgPool2d) and model.avgpool.output_size in (1, (1, 1))):
        return "avgpool is not AdaptiveAvgPool2d(1)"
    if not isinstance(model.fc, nn.Linear) or type(model.fc).forward is not nn.Linear.forward:
        return f"fc is a {type(model.fc).__name__}, not an nn.Linear"
    if model.fc._forward_hooks or model.fc._forward_pre_hooks:
        return "fc has forward hooks"
    return None


def check_structure(model: nn.Module, head: bool = True) -> None:
    """Raise :class:`UnsupportedModel` unless ``model`` has exactly the modules the plan folds
    (with ``head``: its head too)."""
    _check_conv(model.conv1, "conv1")
    _check_conv(model.conv2, "conv2")
    _check_bn(model.bn1, "bn1")
    _expect(type(model.relu) is nn.ReLU, "relu", f"a {type(model.relu).__name__}, not an nn.ReLU")
    if head:
        problem = head_problem(model)
        _expect(problem is None, "head", problem or "")
    for s in range(1, 5):
        stage = getattr(model, f"layer{s}")
        _expect(type(stage) is nn.Sequential, f"layer{s}", "not an nn.Sequential of blocks")
        for i, block in enumerate(stage):
            where = f"layer{s}.{i}"
            for name in ("conv1", "conv2", "conv3"):
                _check_conv(getattr(block, name, None), f"{where}.{name}")
            for name in ("bn1", "bn2", "bn3"):
                _check_bn(getattr(block, name, None), f"{where}.{name}")
            relu = getattr(block, "relu", None)
            _expect(type(relu) is nn.ReLU, f"{where}.relu", f"a {type(relu).__name__}, not an nn.ReLU")
            _expect(block.conv1.kernel_size == (1, 1) and block.conv1.stride == (1, 1)
                    and block.conv3.kernel_size == (1, 1) and block.conv3.stride == (1, 1),
                    where, "conv1 and conv3 must be 1x1 with stride 1")
            downsample = getattr(block, "downsample", None)
            if downsample is not None:
                _expect(type(downsample) is nn.Sequential and len(downsample) == 2, f"{where}.downsample",
                        "not Sequential(Conv2d, BatchNorm2d)")
                _check_conv(downsample[0], f"{where}.downsample.0")
                _check_bn(downsample[1], f"{where}.downsample.1")
                _expect(downsample[0].kernel_size == (1, 1) and downsample[0].stride == block.conv2.stride,
                        f"{where}.downsample.0", "must be a 1x1 conv with the block's stride")


# --------------------------------------------------------------------------- per forward


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def _dispatch_cache(model: nn.Module):
    """(epoch, __dict__ of every sub-module but the head's, structure problem or None, head
    problem or None), recomputed when a module, parameter or buffer was assigned anywhere since."""
    cached = model.__dict__.get("_bagnet_fast_dispatch")
    if cached is None or cached[0] != _EPOCH[0]:
        try:
            check_structure(model, head=False)
            problem = None
        except UnsupportedModel as error:
            problem = str(error)
        except AttributeError as error:  # a module the structure needs is missing
            problem = f"missing module ({error})"
        head = head_problem(model) if problem is None else problem
        heads = {id(m) for m in model.fc.modules()} if hasattr(model, "fc") else set()
        dicts = [m.__dict__ for _, m in model.named_modules() if m is not model and id(m) not in heads]
        cached = (_EPOCH[0], dicts, problem, head)
        model.__dict__["_bagnet_fast_dispatch"] = cached
    return cached


def dispatch_problem(model: nn.Module, head: bool = True) -> Optional[Tuple[str, str]]:
    """Why a forward must run the reference modules instead of the plan (``head``: the plan's
    fused head too), or None: ("mode", ...) a sub-module in training mode, ("hooks", ...) forward
    hooks, ("unsupported", ...) a structure it cannot fold, ("head", ...) a head it cannot fuse
    (the plan can still compute the features). The head's own modules may train and have hooks
    when only the features are asked for."""
    _, dicts, problem, head_issue = _dispatch_cache(model)
    if problem is not None:
        return "unsupported", problem
    if _global_hooks():
        return "hooks", "global module forward hooks are registered"
    if head and head_issue is not None:
        return "head", head_issue
    for d in dicts:
        if d["training"]:
            return "mode", "a sub-module is in training mode"
        if d["_forward_hooks"] or d["_forward_pre_hooks"]:
            return "hooks", "a sub-module has forward hooks"
    return None


def _config(bns: List[dict], convs: List[dict]) -> tuple:
    """The plain attributes the plan depends on (no hook sees them change)."""
    return (tuple(d["eps"] for d in bns),
            tuple((d["stride"], d["padding"], d["dilation"], d["groups"], d["padding_mode"]) for d in convs))


def tensor_states(tensors: List[torch.Tensor]) -> torch.Tensor:
    """(len(tensors), 5) int64: data pointer, version counter (-1 for inference tensors), dtype,
    device and a hash of the values at SAMPLES evenly spaced positions (0 for non-CPU tensors:
    reading them would wait for the device)."""
    if _extension.loaded():
        return _extension.module().tensor_states_list(tensors, SAMPLES)
    rows = []
    for t in tensors:
        sample = 0
        if t.device.type == "cpu" and t.numel():
            flat = t.detach().reshape(-1)
            index = torch.linspace(0, flat.numel() - 1, min(SAMPLES, flat.numel())).long()
            sample = hash(flat[index].double().tolist())
        rows.append([t.data_ptr(), -1 if t.is_inference() else t._version, hash(t.dtype) & 0xFFFF,
                     hash(str(t.device)) & 0xFFFF, sample & 0x7FFFFFFFFFFFFFFF])
    return torch.tensor(rows, dtype=torch.long).reshape(len(tensors), 5)


class PlanState:
    """What a plan was built from. :meth:`is_fresh` says whether it still holds.

    Seen: load_state_dict, optimizer steps, BatchNorm statistics, ``.to()``, assignment of any
    module/parameter/buffer (the plan keeps the old objects alive, so a new one can never reuse
    their address), in-place writes (version counters), and on CPU writes through ``.data`` or
    numpy views that change any sampled value (every whole-tensor write; a partial one may
    miss the 8 sampled positions), eps and convolution attributes. Not seen without
    ``verify`` (``BAGNET_FAST_VERIFY_PLAN=1``): writes through ``.data`` into CUDA tensors and
    partial ``.data`` writes between the sampled positions; call ``bagnet_fast.refresh(model)``.
    """

    def __init__(self, model: nn.Module, settings: tuple, verify: bool = False) -> None:
        self.settings = settings  # (backend name, dead-branch tolerance) it was built for
        self.epoch = _EPOCH[0]
        self.modules = [m for m in model.modules()]  # kept alive: their ids cannot be reused
        self.tensors = [*model.parameters(), *model.buffers()]
        self._bns = [m.__dict__ for m in self.modules if isinstance(m, nn.BatchNorm2d)]
        self._convs = [m.__dict__ for m in self.modules if isinstance(m, nn.Conv2d)]
        self.config = _config(self._bns, self._convs)
        self.snapshot = tensor_states(self.tensors)
        # Full copies for ``verify``: taken now when verification is on, else at its first use.
        self._copies: Optional[List[torch.Tensor]] = [t.detach().clone() for t in self.tensors] if verify else None

    def is_fresh(self, model: nn.Module, settings: tuple, full: bool = False) -> bool:
        if settings != self.settings:
            return False
        if _EPOCH[0] != self.epoch:
            modules = [m for m in model.modules()]
            tensors = [*model.parameters(), *model.buffers()]
            same = len(modules) == len(self.modules) and all(a is b for a, b in zip(modules, self.modules))
            same = same and len(tensors) == len(self.tensors) and all(a is b for a, b in zip(tensors, self.tensors))
            if not same:
                return False
            self.epoch = _EPOCH[0]
        if _config(self._bns, self._convs) != self.config:
            return False
        if not torch.equal(tensor_states(self.tensors), self.snapshot):
            return False
        return not full or self._same_values()

    def _same_values(self) -> bool:
        """Every tensor equal to its copy from the first full check (which records them)."""
        if self._copies is None:
            self._copies = [t.detach().clone() for t in self.tensors]
            return True
        return all(torch.equal(t, c) for t, c in zip(self.tensors, self._copies))
