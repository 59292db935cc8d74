"""Folding BatchNorm (eval statistics) into the conv/linear module that feeds it, for deployment."""
from __future__ import annotations

from collections import Counter

import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_weights

from . import linalg
from .expanded import parameter_count
from .report import FoldedRecord, FoldReport, copy_with_report, with_section
from .ops import MODULE_FUNCTIONS, SPATIAL_DIMS

_BATCHNORMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def fold_batchnorm(gm: fx.GraphModule, example_inputs=None) -> fx.GraphModule:
    """Fold every ``conv -> BatchNorm`` (and ``linear -> BatchNorm1d``) module pair into the conv.

    The folded model computes what ``gm`` computes in eval mode (running statistics), so fold
    only for deployment.  ``W' = W gamma / sigma``, ``b' = beta + (b - mu) gamma / sigma`` in float64 (float32 on MPS).
    A pair is left alone, with the reason in its report's ``fold_bn`` (:class:`passes.report.FoldReport`), when the conv or the
    BatchNorm is used anywhere else, the BatchNorm has no running statistics, or the dims do not
    fit.  ``linear -> BatchNorm1d`` is folded only where ``example_inputs`` show a 2-D output:
    on 3-D input BatchNorm1d normalizes another dim than the linear's features.
    Returns a new GraphModule.
    """
    gm = copy_with_report(gm)
    if example_inputs is not None:
        ShapeProp(gm).propagate(*_as_tuple(example_inputs))
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    read_attrs = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    folded, skipped = [], []
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module" or type(modules[bn_node.target]) not in _BATCHNORMS:
            continue
        source = bn_node.args[0] if bn_node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module"
                and type(modules[source.target]) in MODULE_FUNCTIONS):
            continue
        layer, bn = modules[source.target], modules[bn_node.target]
        reason = _unfoldable(source, bn_node, layer, bn, calls, read_attrs)
        if reason is not None:
            skipped.append(FoldedRecord(source.target, bn_node.target, reason))
            continue
        exact = linalg.compute_dtype(layer.weight.device)  # float64, float32 where the device has no float64

        def wide(tensor):
            return None if tensor is None else tensor.detach().to(exact)

        weight, bias = fuse_conv_bn_weights(wide(layer.weight), wide(layer.bias), wide(bn.running_mean),
                                            wide(bn.running_var), bn.eps, wide(bn.weight), wide(bn.bias))
        layer.weight = nn.Parameter(weight.detach().to(layer.weight.dtype), layer.weight.requires_grad)
        layer.bias = nn.Parameter(bias.detach().to(layer.weight.dtype), layer.weight.requires_grad)
        bn_node.replace_all_uses_with(source)
        gm.graph.erase_node(bn_node)
        gm.delete_submodule(bn_node.target)
        folded.append(FoldedRecord(source.target, bn_node.target))
    gm.graph.lint()
    gm.recompile()
    with_section(gm, fold_bn=FoldReport(tuple(folded), tuple(skipped), parameter_count(gm)))
    return gm


def _unfoldable(source, bn_node, layer, bn, calls, read_attrs) -> str | None:
    if len(source.users) != 1:
        return f"the output of '{source.target}' is also used outside the BatchNorm"
    if calls[source.target] != 1 or calls[bn_node.target] != 1:
        return "the layer or the BatchNorm is called at more than one place"
    if any(t.startswith((source.target + ".", bn_node.target + ".")) for t in read_attrs):
        return "a parameter of the layer or the BatchNorm is read directly"
    if bn.running_mean is None or bn.running_var is None:
        return "the BatchNorm keeps no running statistics"
    if bn.num_features != layer.weight.shape[0]:
        return "BatchNorm features differ from the layer's outputs"
    dims = SPATIAL_DIMS[MODULE_FUNCTIONS[type(layer)]]
    if dims == 0:
        shape = getattr(source.meta.get("tensor_meta"), "shape", None)
        if type(bn) is not nn.BatchNorm1d or shape is None or len(shape) != 2:
            return "linear -> BatchNorm1d is folded only when example_inputs show a 2-D output"
    elif _BATCHNORMS[type(bn)] != dims:
        return f"{type(bn).__name__} after a {dims}-d conv"
    return None


def _as_tuple(inputs):
    return inputs if isinstance(inputs, (tuple, list)) else (inputs,)

