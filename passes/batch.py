"""Compose the kernels of same-shape expanded layers together: the batching pass of the ``online`` mode.

In an ``online`` graph each expanded layer composes its kernel from its factors with a few small
matmuls before its conv runs.  Pruned networks hold many layers of few factor shapes, and on a CPU
composing them one at a time is mostly per-op overhead (autograd included) on small matrices;
composing each shape's layers together removes most of it (measured in docs/results/speed.md).

:func:`batch_compositions` puts one :class:`~passes.expanded.BatchComposer` call before the first of
each set of layers whose factors have the same shapes, dtype and device, and hands each layer's
composer node its kernel (``<layer>.compose(*factors, composed=kernel)``).  The per-layer composer
nodes stay where they are, so the graph keeps the structure that :func:`passes.fuse.fuse` and the
feature taps read; :func:`unbatch_compositions` takes the batching out again (``fuse`` does that first).
"""
from __future__ import annotations

import itertools
import math
import operator

import torch.fx as fx

from . import cost as cost_model
from .errors import FusionError
from .expanded import BatchComposer, ExpandedLayer, KernelComposer
from .graph import set_attr
from .report import BatchRecord, copy_with_report, report_of, with_section

#: the name prefix of the batch composers at the root of a GraphModule
PREFIX = "fxlop_compose_"
#: pointwise layers (1x1 convs, linears) are composed together only while composing one costs at most
#: this many multiply-adds.  A spatial kernel factor is copied into the layout its matmuls need either
#: way, so batching those layers costs no memory; a pointwise layer composes from views of its factors,
#: and batching saves a copy of them for the backward pass: worth it only where the per-op overhead
#: outweighs the arithmetic, which small pointwise layers do and large ones do not (docs/results/speed.md,
#: "Measurements behind the defaults").
POINTWISE_MAX_MACS = 2**22


def batch_compositions(gm: fx.GraphModule, inplace: bool = False) -> fx.GraphModule:
    """Compose the kernels of expanded layers of the same factor shapes, dtype and device together.

    Returns a GraphModule (a copy of ``gm`` unless ``inplace``) that computes the same kernels, with
    each set of two or more such layers composed by one root-level ``fxlop_compose_<i>``
    :class:`BatchComposer` placed before the first of them; its report's ``batch`` lists the sets (:class:`passes.report.BatchRecord`).
    Layers composed in a batch already, pointwise layers over :data:`POINTWISE_MAX_MACS`, layers
    without a same-shape partner and ``chain``-mode graphs are left as they are.
    """
    if not inplace:
        gm = copy_with_report(gm)
    graph = gm.graph
    modules = dict(gm.named_modules())
    sets: dict[tuple, list[tuple[fx.Node, str, ExpandedLayer]]] = {}
    for node in graph.find_nodes(op="call_module"):
        found = _composer_call(node, modules)
        if found is None:
            continue
        name, layer = found
        factors = list(layer.factors)
        pointwise = math.prod(factors[layer.kernel_index].shape[2:]) == 1
        cost = cost_model.compose_cost([f.shape for f in factors], layer.groups, layer.kernel_index)
        if pointwise and cost > POINTWISE_MAX_MACS:
            continue
        key = (tuple((f.shape, f.dtype, f.device) for f in factors), layer.groups, layer.kernel_index,
               layer.compose.order)
        sets.setdefault(key, []).append((node, name, layer))
    free_names = (f"{PREFIX}{i}" for i in itertools.count() if f"{PREFIX}{i}" not in modules)
    batches = []
    for (_, groups, kernel_index, order), members in sets.items():
        if len(members) < 2:
            continue
        target = next(free_names)
        set_attr(gm, target, BatchComposer(len(members), groups, kernel_index, order))
        first = members[0][0]
        # no module metadata: a batch belongs to no one module (feature taps address modules by it)
        with graph.inserting_before(first):
            factors = [graph.get_attr(f"{name}.factors.{i}") for _, name, layer in members for i in range(layer.depth)]
            batch = graph.call_module(target, tuple(factors))
            kernels = [graph.call_function(operator.getitem, (batch, i)) for i in range(len(members))]
        for (node, _, _), kernel in zip(members, kernels):
            node.kwargs = {**node.kwargs, "composed": kernel}
        batches.append(BatchRecord(target, tuple(name for _, name, _ in members)))
    graph.lint()
    gm.recompile()
    with_section(gm, batch=(report_of(gm).batch or ()) + tuple(batches))
    return gm


def unbatch_compositions(gm: fx.GraphModule, inplace: bool = False) -> fx.GraphModule:
    """The inverse of :func:`batch_compositions`: every layer composes its own kernel again.

    Raises:
        FusionError: a node other than the layer's composer reads a kernel of a batch (an edit).
    """
    if not inplace:
        gm = copy_with_report(gm)
    graph = gm.graph
    modules = dict(gm.named_modules())
    for batch in list(graph.find_nodes(op="call_module")):
        if not isinstance(modules[batch.target], BatchComposer):
            continue
        for kernel in list(batch.users):
            for user in list(kernel.users):
                if not (user.op == "call_module" and type(modules.get(user.target)) is KernelComposer
                        and user.kwargs.get("composed") is kernel):
                    raise FusionError(f"node '{user.name}' ({user.format_node()}) reads a kernel that "
                                      f"'{batch.target}' composes; only the layers' composers may")
                user.kwargs = {k: v for k, v in user.kwargs.items() if k != "composed"}
            graph.erase_node(kernel)
        factors = batch.args
        graph.erase_node(batch)
        for node in factors:
            if not node.users:
                graph.erase_node(node)
        delattr(gm, batch.target)
    graph.lint()
    gm.recompile()
    if report_of(gm).batch is not None:
        with_section(gm, batch=None)
    return gm


def _composer_call(node: fx.Node, modules: dict) -> tuple[str, ExpandedLayer] | None:
    """``(layer name, layer)`` when ``node`` is a layer's own composer called on its own factors and
    not yet given a batched kernel; else None."""
    if type(modules.get(node.target)) is not KernelComposer:
        return None
    name = node.target[: -len(".compose")]
    layer = modules.get(name)
    if not (isinstance(layer, ExpandedLayer) and node.target == f"{name}.compose"
            and len(node.args) == layer.depth and not node.kwargs):
        return None
    expected = [f"{name}.factors.{i}" for i in range(layer.depth)]
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" and a.target == t for a, t in zip(node.args, expected)):
        return None
    return name, layer
