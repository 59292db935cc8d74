"""The linear ops fxlop rewrites, described once for eager code, graph emission and matching.

A :class:`Call` says how one call site applies a weight: which functional, with which
stride/padding/dilation/groups, and whether the input is padded first by ``F.pad`` (conv modules
with a ``padding_mode`` other than zeros do exactly that in ``_conv_forward``).

Matrix products on a 2-D parameter (``addmm``/``mm``/``matmul``, as Hugging Face's ``Conv1D`` and
``torch.export`` graphs write them) are read as ``F.linear`` by :func:`as_linear`; a weight stored
``(in, out)`` is *transposed* with respect to ``F.linear``'s ``(out, in)``.
"""
from __future__ import annotations

import builtins
import dataclasses
import operator
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

#: matrix products ``x @ W`` (plus a bias for addmm): op -> its operands' names, in argument order
MATMULS: dict[Callable, tuple[str, ...]] = {
    torch.addmm: ("bias", "input", "weight"), _ATEN.addmm.default: ("bias", "input", "weight"),
    torch.mm: ("input", "weight"), _ATEN.mm.default: ("input", "weight"),
    torch.matmul: ("input", "weight"), operator.matmul: ("input", "weight"), _ATEN.matmul.default: ("input", "weight"),
}
#: keyword names of the products' operands (torch, aten) -> the names above
_MATMUL_KWARGS = {"self": 0, "input": 0, "mat1": -2, "mat2": -1, "other": -1}
#: ops that transpose a 2-D tensor whatever their other arguments (for these, the dims are checked)
_TRANSPOSE_OPS = {_ATEN.t.default, _ATEN.numpy_T.default, torch.t, _ATEN.transpose.int, torch.transpose,
                  _ATEN.permute.default, torch.permute}
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is exactly Hugging Face's ``Conv1D`` (GPT-2 family): ``x @ weight + bias`` with
    ``weight`` of shape ``(in, out)``, i.e. an ``nn.Linear`` whose weight is stored transposed.  Known by
    its class (``transformers`` is not a dependency), its ``nf``/``nx`` and its weight's shape."""
    kind = type(module)
    weight = module._parameters.get("weight")
    return (kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers.")
            and isinstance(weight, Tensor) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
            and isinstance(module._parameters.get("bias"), Tensor))


def module_function(module: nn.Module) -> Callable | None:
    """The functional an expandable module applies (its exact type: subclasses may change forward), or None."""
    function = MODULE_FUNCTIONS.get(type(module))
    if function is None and is_hf_conv1d(module):
        return F.linear
    return function


def is_expandable(module: nn.Module) -> bool:
    """Whether the expansion can rewrite ``module`` itself: an ``nn.Conv1d/2d/3d``, ``nn.Linear`` or Hugging
    Face ``Conv1D`` of exactly that type."""
    return module_function(module) is not None


def linear_like(function: Callable) -> Callable:
    """The ``linear`` of the same graph dialect as ``function`` (``aten`` ops in export graphs)."""
    return _ATEN.linear.default if isinstance(function, torch._ops.OpOverload) else F.linear


def transpose_like(function: Callable) -> Callable:
    """The 2-D transpose of the same graph dialect as ``function``."""
    return _ATEN.t.default if isinstance(function, torch._ops.OpOverload) else torch.t


@dataclasses.dataclass(frozen=True)
class Product:
    """A matrix product read as ``F.linear(input, W, bias)``: ``weight`` is the ``get_attr`` node of the
    parameter, ``transposed`` whether it is stored ``(in, out)`` (used as is), ``through`` the transpose
    node between it and the product (None when used as is)."""
    input: fx.Node
    weight: fx.Node
    bias: Any
    transposed: bool
    through: fx.Node | None


def operands(node: fx.Node) -> dict[str, Any]:
    """The operands of a :data:`MATMULS` node by the names of :data:`MATMULS` (plus ``beta``/``alpha``)."""
    names = MATMULS[node.target]
    bound = dict(zip(names, node.args))
    for key, value in node.kwargs.items():
        bound[names[_MATMUL_KWARGS[key]] if key in _MATMUL_KWARGS else key] = value
    return bound


def _transposed_source(node) -> fx.Node | None:
    """The tensor that ``node`` is the 2-D transpose of, or None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in _TRANSPOSE_OPS:
        args = list(node.args[1:]) + list(node.kwargs.values())
    elif node.op == "call_method" and node.target in _TRANSPOSE_METHODS:
        args = list(node.args[1:]) + list(node.kwargs.values())
    elif node.op == "call_function" and node.target is builtins.getattr and node.args[1:] in (("T",), ("mT",)):
        args = []
    else:
        return None
    if node.target in ("permute", _ATEN.permute.default, torch.permute):
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if [d % 2 if isinstance(d, int) else None for d in dims] != [1, 0]:
            return None
    elif args and ({d % 2 if isinstance(d, int) else None for d in args[:2]} != {0, 1} or len(args) != 2):
        return None
    return node.args[0] if isinstance(node.args[0], fx.Node) else None


def as_linear(node: fx.Node) -> Product | None:
    """``node`` (a :data:`MATMULS` call) read as a linear layer on a ``get_attr`` tensor, or None when its
    right operand is not one (nor its transpose): a product of activations such as attention scores."""
    bound = operands(node)
    weight, through = bound.get("weight"), None
    source = _transposed_source(weight)
    if source is not None:
        weight, through = source, weight
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    return Product(bound["input"], weight, bound.get("bias"), transposed=through is None, through=through)


def matmul_problem(node: fx.Node, product: Product, weight: Tensor, bias: Tensor | None) -> str | None:
    """Why the product ``node`` on the parameter ``weight`` cannot be rewritten as a linear layer, or None;
    ``bias``: the value of the added ``get_attr`` tensor of an addmm (None if it is not one)."""
    bound = operands(node)
    where = f"{getattr(node.target, '__name__', node.target)} at node '{node.name}'"
    if weight.dim() != 2:
        return f"{where}: its weight of shape {tuple(weight.shape)} is not a matrix"
    if any(bound.get(k, 1) != 1 for k in ("beta", "alpha")):
        return f"{where} scales its terms (beta={bound.get('beta', 1)}, alpha={bound.get('alpha', 1)})"
    out = weight.shape[1] if product.transposed else weight.shape[0]
    if "bias" in bound and (bias is None or tuple(bias.shape) != (out,)):
        return f"{where} adds a tensor that is not a bias vector of {out} entries read by get_attr"
    return None


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
    """The :class:`Call` that ``module.forward`` performs (modules with a :func:`module_function`)."""
    function = module_function(module)
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
