"""The ``torch`` backend: every unit composed from its pure-PyTorch reference
(:mod:`bagnet_fast.ops.reference`). Any device, any floating dtype; NaN-exact (torch.relu)."""

from __future__ import annotations

from ..ops import reference as ref
from . import ANY, BackendInfo, register_backend
from .base import Backend


class TorchBackend(Backend):
    name = "torch"

    def conv_bias_act(self, conv, x, relu=True, residual=None):
        return ref.conv_bias_act(x, conv.weight, conv.bias, conv.stride, relu=relu, residual=residual)

    def pointwise_bottleneck(self, unit, x):
        c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
        return ref.pointwise_bottleneck(x, c1.weight, c1.bias, c2.weight, c2.bias, c3.weight, c3.bias)


register_backend(BackendInfo(
    name="torch",
    load=lambda: TorchBackend,
    summary="pure PyTorch, any device and dtype",
    devices=(ANY,),
    preference={ANY: 100},  # the last resort everywhere
))
