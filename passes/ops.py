"""The linear ops fxlop rewrites, described once for eager code, graph emission and matching.

A :class:`Call` says how one call site applies a weight: which functional, with which
stride/padding/dilation/groups, and whether the input is padded first by ``F.pad`` (conv modules
with a ``padding_mode`` other than zeros do exactly that in ``_conv_forward``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

_ATEN = torch.ops.aten
#: functional (or the aten op that ``torch.export`` graphs call) -> number of spatial dims of its weight
SPATIAL_DIMS: dict[Callable, int] = {
    F.linear: 0, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
    _ATEN.linear.default: 0, _ATEN.conv1d.default: 1, _ATEN.conv2d.default: 2, _ATEN.conv3d.default: 3,
    _ATEN.conv1d.padding: 1, _ATEN.conv2d.padding: 2, _ATEN.conv3d.padding: 3,
}
#: module types that are expanded, and the functional each one runs
MODULE_FUNCTIONS: dict[type, Callable] = {
    nn.Linear: F.linear, nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d,
}
#: functional -> module type, so that ``include=[nn.Conv2d]`` also selects ``F.conv2d`` calls
FUNCTION_MODULES: dict[Callable, type] = {
    f: (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims] for f, dims in SPATIAL_DIMS.items()}

_CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_PARAMS: dict[Callable, tuple[str, ...]] = {f: _CONV_PARAMS if dims else ("input", "weight", "bias")
                                            for f, dims in SPATIAL_DIMS.items()}


@dataclasses.dataclass(frozen=True)
class Call:
    """How a call site applies its weight: ``function(F.pad(x, *pad) if pad else x, w, b, **options)``."""

    function: Callable
    options: tuple[tuple[str, Any], ...] = ()
    pad: tuple[tuple[int, ...], str] | None = None

    @property
    def groups(self) -> int:
        return dict(self.options).get("groups", 1)

    def pointwise(self) -> Call:
        """The call of a 1x1 factor next to this call's kernel: same op and groups, nothing else."""
        return Call(self.function, (("groups", self.groups),) if SPATIAL_DIMS[self.function] else ())


def call_of_module(module: nn.Module) -> Call:
    """The :class:`Call` that ``module.forward`` performs (module types of :data:`MODULE_FUNCTIONS`)."""
    function = MODULE_FUNCTIONS[type(module)]
    if function is F.linear:
        return Call(function)
    options = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation,
               "groups": module.groups}
    pad = None
    if module.padding_mode != "zeros":
        pad = (tuple(module._reversed_padding_repeated_twice), module.padding_mode)
        options["padding"] = (0,) * len(module.kernel_size)
    return Call(function, tuple(options.items()), pad)


def bind(node: fx.Node) -> dict[str, Any]:
    """The arguments of a ``call_function`` node of :data:`SPATIAL_DIMS` by parameter name."""
    names = _PARAMS[node.target]
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def call_of_node(node: fx.Node) -> Call:
    """The :class:`Call` of a functional conv/linear node (its non-tensor arguments)."""
    bound = bind(node)
    options = tuple((k, bound[k]) for k in _PARAMS[node.target][3:] if k in bound)
    return Call(node.target, options)


def apply(call: Call, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Run ``call`` eagerly."""
    if call.pad is not None:
        x = F.pad(x, call.pad[0], mode=call.pad[1])
    return call.function(x, weight, bias, **dict(call.options))


def emit(graph: fx.Graph, call: Call, x: fx.Node, weight: fx.Node, bias: fx.Node | None) -> fx.Node:
    """Insert the nodes that run ``call`` at the graph's insertion point; returns the output node."""
    if call.pad is not None:
        x = graph.call_function(F.pad, (x, call.pad[0]), {"mode": call.pad[1]})
    return graph.call_function(call.function, (x, weight, bias), dict(call.options))


def match_pad(node: fx.Node, call: Call) -> bool:
    """Whether ``node`` is the ``F.pad`` that :func:`emit` inserts for ``call``."""
    if node.op != "call_function" or node.target is not F.pad or call.pad is None:
        return False
    widths = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    return tuple(widths) == tuple(call.pad[0]) and mode == call.pad[1]
