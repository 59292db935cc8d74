"""The fusion pass: every expanded subgraph becomes one layer again, under its original name."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn

from . import cost
from .batch import unbatch_compositions
from .errors import FusionError
from .expanded import COMPOSED, ExpandedLayer, chain_plan, layer_nodes, parameter_count, site_ends
from .graph import dataflow, inserting_before_with_meta, set_attr
from .ops import Call, bind, call_of_node, emit, match_pad, transpose_like
from .progress import progress
from .report import FusedRecord, FuseReport, copy_with_report, with_section


@dataclasses.dataclass
class _Site:
    end: fx.Node
    nodes: list[fx.Node]  # every node of the site, last first
    input: fx.Node
    call: Call
    bias: fx.Node | None


def fuse(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace each expanded subgraph of ``gm`` (``online`` or ``chain``, trained or not) by one layer.

    A layer that was a module comes back as that module type with the composed weight under its
    original qualified name (one ``call_module`` per call site); the weight of a functional call
    comes back as a parameter read by ``get_attr`` (of the shape it had: a weight of an ``x @ W``
    product keeps its ``(in, out)`` layout and its sites become ``linear(x, W.t())``); the layer's
    weight reads read that parameter again.  Factors are composed in float64 and cast back
    to their dtype and device.  Layers composed together (:mod:`passes.batch`) are fused each on its
    own.  Returns a new GraphModule; ``gm`` is not changed.

    Raises:
        FusionError: a subgraph does not have the shape the expansion gave it (an edit inserted
            or rewired nodes between the factors), naming the layer and the node.
    """
    # the factors are only read, and then dropped: share them with gm instead of copying them
    factors = {id(p): p for m in gm.modules() if isinstance(m, ExpandedLayer) for p in m.factors}
    gm = unbatch_compositions(copy_with_report(gm, memo=factors), inplace=True)
    graph = gm.graph
    layers = {name: m for name, m in gm.named_modules() if isinstance(m, ExpandedLayer)}
    flow = dataflow(graph)
    fused = []
    for name, layer in fuse_progress(layers):
        own = layer_nodes(graph, name)
        # the bias is the original parameter, kept under its name: reading it is never inside the layer
        biases = [n for n in own if n.op == "get_attr" and n.target == f"{name}.bias"]
        own = [n for n in own if n not in biases]
        sites = [_match_site(end, name, layer) for end in site_ends(own, name, layer)]
        reads = [n for n in own if n.op == "call_module" and n.target == f"{name}.read"]
        _check_boundary(flow, name, own, sites, reads)
        set_attr(gm, name, layer.fused(name))
        weight_name = name if layer.source is None else f"{name}.weight"
        # a site whose input is another site's end (the layer called on its own output, self.l(self.l(x)))
        # takes the fused op that replaced that end: the sites were matched before any was rewritten
        replaced: dict[fx.Node, fx.Node] = {}
        for site in sites:
            source = replaced.get(site.input, site.input)
            with inserting_before_with_meta(graph, site.end):
                if layer.source is not None:
                    value = graph.call_module(name, (source,))
                else:
                    weight = graph.get_attr(name)
                    if layer.transposed_weight:
                        weight = graph.call_function(transpose_like(site.call.function), (weight,))
                    value = emit(graph, site.call, source, weight, site.bias)
            site.end.replace_all_uses_with(value)
            replaced[site.end] = value
            for node in site.nodes:
                graph.erase_node(node)
        for read in reads:
            with inserting_before_with_meta(graph, read):
                read.replace_all_uses_with(graph.get_attr(weight_name))
        for node in reversed(own):
            graph.erase_node(node)
        for node in biases:
            if not node.users:
                graph.erase_node(node)
        fused.append(FusedRecord(name, len(sites), layer.source[0].__name__ if layer.source else "functional weight"))
    graph.lint()
    gm.recompile()
    with_section(gm, fuse=FuseReport(tuple(fused), parameter_count(gm)))
    return gm


def fuse_progress(layers: dict[str, ExpandedLayer]):
    """``layers.items()`` with a progress bar weighted by each layer's estimated seconds (multiply-adds
    of composing it, at the speed of its device); shown on a terminal when fusing takes over two seconds."""
    costs = {name: cost.compose_cost([f.shape for f in layer.factors], layer.groups, layer.kernel_index)
             for name, layer in layers.items()}
    work = sum(costs.values())
    seconds = []
    for name, layer in layers.items():
        rates = cost.rates_for(layer.factors[0].device, layer.factors[0].dtype, work)
        seconds.append(costs[name] / rates.combine + 2 * sum(f.numel() for f in layer.factors) / rates.move)
    return progress(list(layers.items()), "fuse", seconds, list(layers))


def _match_site(end: fx.Node, name: str, layer: ExpandedLayer) -> _Site:
    """Walk from a site's last op back to its input, checking every node against the chain plan."""
    def fail(node, expected: str):
        raise FusionError(f"cannot fuse expanded layer '{name}': expected {expected} but found node "
                          f"'{node.name}' ({node.format_node()}); the subgraph was edited after expand")

    end_weight = bind(end)["weight"]
    online = end_weight.op == "call_module"
    weights = [COMPOSED] if online else list(range(layer.depth))
    kernel_step = 0 if online else layer.kernel_index
    nodes, ops, node = [], {}, end
    for index in reversed(range(len(weights))):
        expected = "the composed kernel" if online else f"'{name}.factors.{weights[index]}'"
        if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is end.target):
            fail(node, f"a {end.target.__name__} call with weight {expected}")
        weight = bind(node).get("weight")
        if not (weight is end_weight if online else (isinstance(weight, fx.Node) and weight.op == "get_attr"
                                                     and weight.target == f"{name}.factors.{index}")):
            fail(node, f"a {end.target.__name__} call with weight {expected}")
        nodes.append(node)
        ops[index] = node
        node = bind(node)["input"]
        if index == kernel_step and layer.call is not None and layer.call.pad is not None:
            if not (isinstance(node, fx.Node) and match_pad(node, layer.call)):
                fail(node, f"the F.pad of padding_mode='{layer.call.pad[1]}'")
            nodes.append(node)
            node = node.args[0]

    call = layer.call if layer.call is not None else call_of_node(ops[kernel_step])
    plan = chain_plan(call, layer.depth, layer.kernel_index, "online" if online else "chain")
    for index, step in enumerate(plan):
        found = call_of_node(ops[index])
        if found.function is not step.call.function or dict(found.options) != dict(step.call.options):
            fail(ops[index], f"options {dict(step.call.options)}")
        if not step.has_bias and bind(ops[index]).get("bias") is not None:
            fail(ops[index], "no bias on an inner op")
    if call.groups != layer.groups:
        fail(ops[kernel_step], f"groups={layer.groups}")
    bias = bind(end).get("bias")
    if layer.source is not None:
        expected_bias = f"{name}.bias" if layer.bias is not None else None
        if (bias.target if isinstance(bias, fx.Node) and bias.op == "get_attr" else bias) != expected_bias:
            fail(end, f"bias {expected_bias}")
    return _Site(end, nodes, node, call, bias)


def _check_boundary(flow: nx.DiGraph, name: str, own: list[fx.Node], sites: list[_Site],
                    reads: list[fx.Node]) -> None:
    """Only the ends of the sites and the weight reads may feed nodes outside the layer's subgraph."""
    inside = set(own).union(*(site.nodes for site in sites))
    ends = {site.end for site in sites} | set(reads)
    for source, reader in nx.edge_boundary(flow, inside):
        if source not in ends:
            raise FusionError(f"cannot fuse expanded layer '{name}': node '{reader.name}' "
                              f"({reader.format_node()}) reads '{source.name}' from inside its expanded "
                              f"subgraph, which fusion would remove")


def fuse_modules(model: nn.Module, *, in_place: bool = False,
                 into: Mapping[ExpandedLayer, nn.Module] | None = None) -> nn.Module:
    """Fuse every :class:`ExpandedLayer` of a module tree back into one conv/linear: the way back from
    :func:`passes.expand_modules`, for a copy and in place.

    Every weight is composed (float64, cast back to the factors' dtype and device) before any module
    is put back, so a failure leaves ``model`` exactly as it was.  Shared layers stay shared.  The
    report's ``fuse`` section lists the fused layers.

    Args:
        model: a model holding expanded layers (not one itself).
        in_place: fuse ``model``'s own layers instead of a copy's.
        into: with ``in_place``, the module each layer replaced, by layer: the composed weight is
            written into that module's own ``weight`` parameter (its ``bias`` becomes the layer's) and
            the module is put back, so every weight ``Parameter`` is the one it had before the expansion
            (``fxlop.overparameterized``).  Layers not in it are rebuilt as for a copy.

    Returns:
        The fused copy, or ``model`` itself with ``in_place``.

    Raises:
        FusionError: ``into`` without ``in_place``; a layer whose factors do not compose to its
            weight's shape (edited since the expansion); ``model`` is unchanged.
    """
    if into and not in_place:
        raise FusionError("fuse_modules: into= writes the weights into the original modules, which needs in_place=True")
    if not in_place:
        model = copy_with_report(model)
    into = into or {}
    layers: dict[int, tuple[ExpandedLayer, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, ExpandedLayer):
            layers.setdefault(id(module), (module, []))[1].append(name)
    replacements = []
    with torch.no_grad():  # every weight composed before anything is put back
        for layer, names in layers.values():
            original = into.get(layer)
            if original is None:
                replacements.append((names, layer.fused(names[0]), None))
                continue
            try:
                weight = layer.fused_weight()
            except RuntimeError as error:  # factors edited to shapes that do not chain
                raise FusionError(f"'{names[0]}': its factors do not compose ({error})") from error
            if weight.shape != original.weight.shape:
                raise FusionError(f"'{names[0]}' composes to a weight of shape {tuple(weight.shape)}, not "
                                  f"{tuple(original.weight.shape)}")
            replacements.append((names, original, (layer, weight.detach())))
    for names, module, written in replacements:
        if written is not None:
            layer, weight = written
            module.weight.data = weight  # the same Parameter, now on the factors' device and dtype
            module.weight.grad = None
            if module.bias is not layer.bias:
                module.bias = layer.bias
            module.train(layer.training)
        for name in names:
            set_attr(model, name, module)
    fused = [FusedRecord(names[0], None, type(module).__name__ if isinstance(module, nn.Module) else "functional weight")
             for names, module, _ in replacements]
    with_section(model, fuse=FuseReport(tuple(fused), parameter_count(model)))
    return model
