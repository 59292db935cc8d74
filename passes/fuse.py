"""The fusion pass: every expanded subgraph becomes one layer again, under its original name."""
from __future__ import annotations

import copy
import dataclasses

import networkx as nx
import torch.fx as fx

from . import linalg
from .batch import unbatch_compositions
from .errors import FusionError
from .expand import progress
from .expanded import COMPOSED, ExpandedLayer, chain_plan, layer_nodes, parameter_count, site_ends
from .graph import dataflow, inserting_before_with_meta, set_attr
from .ops import Call, bind, call_of_node, emit, match_pad, transpose_like


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
    gm = unbatch_compositions(copy.deepcopy(gm, memo=factors), inplace=True)
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
        fused.append({"name": name, "call_sites": len(sites),
                      "type": layer.source[0].__name__ if layer.source else "functional weight"})
    graph.lint()
    gm.recompile()
    gm.meta.setdefault("fxlop", {})["fuse"] = {"fused": fused, "params": parameter_count(gm)}
    return gm


def fuse_progress(layers: dict[str, ExpandedLayer]):
    """``layers.items()`` with a progress bar weighted by each layer's estimated seconds (multiply-adds
    of composing it, at the speed of its device); shown on a terminal when fusing takes over two seconds."""
    costs = {name: linalg.compose_cost([f.shape for f in layer.factors], layer.groups, layer.kernel_index)
             for name, layer in layers.items()}
    work = sum(costs.values())
    seconds = []
    for name, layer in layers.items():
        rates = linalg.rates_for(layer.factors[0].device, layer.factors[0].dtype, work)
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
