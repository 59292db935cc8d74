"""The tap pass: a GraphModule that also returns the values of chosen layers, addressed by name.

A name is a module's qualified name (a leaf such as ``layer1.0.conv1``, an expanded layer, or a
block such as ``layer1``) or the qualified name of the weight of a functional conv/linear call.
Block outputs are found through the ``nn_module_stack`` metadata that symbolic tracing records
(and that the expansion and fusion passes hand on to the nodes they insert).
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch.fx as fx

from .errors import FxlopError
from .expanded import ExpandedLayer, KernelComposer, layer_nodes, site_ends
from .ops import MODULE_FUNCTIONS, SPATIAL_DIMS, bind


def tap(gm: fx.GraphModule, names: Iterable[str]) -> fx.GraphModule:
    """A GraphModule that returns ``(gm's output, {name: output of the layer called name})``.

    The result shares ``gm``'s modules and parameters (training it trains ``gm``); ``gm`` itself
    is not changed.  A layer called at several places yields the value of its last call.

    Raises:
        FxlopError: a name that addresses no layer of ``gm``.
    """
    names = list(dict.fromkeys(names))
    found = {name: tapped_node(gm, name) for name in names}
    missing = [name for name, node in found.items() if node is None]
    if missing:
        raise FxlopError(f"cannot tap {missing}: no such layer in {type(gm).__name__} "
                         f"(known layers include {layer_names(gm)[:8]})")
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, copies)
    graph.output((output, {name: copies[node] for name, node in found.items()}))
    tapped = fx.GraphModule(gm, graph, f"Tapped{type(gm).__name__}")
    tapped.meta = dict(gm.meta)
    return tapped


def tapped_node(gm: fx.GraphModule, name: str) -> fx.Node | None:
    """The node whose value is the output of the layer ``name`` (its last call), or None."""
    nodes = list(gm.graph.nodes)
    in_module = [n for n in nodes if name in _stack_names(n)]
    if in_module:
        members = set(in_module)
        leaving = [n for n in in_module if any(u not in members for u in n.users)]
        return leaving[-1] if leaving else None
    calls = [n for n in nodes if n.op == "call_module" and n.target == name]
    if calls:
        return calls[-1]
    layer = _get(gm, name)
    if isinstance(layer, ExpandedLayer):
        ends = site_ends(layer_nodes(gm.graph, name), name, layer)
        return ends[-1] if ends else None
    applies = [n for n in nodes if n.op == "call_function" and n.target in SPATIAL_DIMS
               and _is_get_attr(bind(n).get("weight"), name)]
    return applies[-1] if applies else None


def layer_names(gm: fx.GraphModule) -> list[str]:
    """Names :func:`tap` can address: modules the graph uses (and the blocks around them) and the
    weights of functional conv/linear calls; the internals of expanded layers are not names."""
    names = []
    for node in gm.graph.nodes:
        for name in _stack_names(node):
            names.append(name)
        if node.op == "call_module" and not isinstance(_get(gm, node.target), KernelComposer):
            names.append(node.target)
        if node.op == "call_function" and node.target in SPATIAL_DIMS:
            weight = bind(node).get("weight")
            owner = _owning_layer(gm, weight)
            if owner is not None:
                names.append(owner)
    return [n for n in dict.fromkeys(names) if n]


def linear_layer_names(gm: fx.GraphModule) -> list[str]:
    """Names of the conv/linear layers of ``gm`` (expanded or not), in graph order."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(_get(gm, node.target)) in MODULE_FUNCTIONS:
            names.append(node.target)
        elif node.op == "call_function" and node.target in SPATIAL_DIMS:
            owner = _owning_layer(gm, bind(node).get("weight"))
            if owner is not None:
                names.append(owner)
    return list(dict.fromkeys(names))


def match_names(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The ``names`` matched by any of the globs ``patterns``, in the order of ``names``; a pattern
    without glob characters is kept as it is (so a missing name can be reported)."""
    names = list(names)
    chosen = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            chosen.extend(n for n in names if fnmatch.fnmatchcase(n, pattern))
        else:
            chosen.append(pattern)
    return list(dict.fromkeys(chosen))


def _stack_names(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [qualified for qualified, _ in stack.values()]


def _get(gm: fx.GraphModule, name: str):
    try:
        return gm.get_submodule(name)
    except AttributeError:
        return None


def _is_get_attr(node, target: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and node.target == target


def _owning_layer(gm: fx.GraphModule, weight) -> str | None:
    """The layer name of a weight argument: an expanded layer's name, or a parameter's own name."""
    if not isinstance(weight, fx.Node):
        return None
    if weight.op == "call_module" and weight.target.endswith(".compose"):
        return weight.target[: -len(".compose")]
    if weight.op == "get_attr":
        owner = weight.target.rsplit(".", 2)[0]
        if isinstance(_get(gm, owner), ExpandedLayer):
            return owner
        return weight.target
    return None
