"""The tap pass: a GraphModule that also returns the values of chosen layers, addressed by name.

A name is a module's qualified name (a leaf such as ``layer1.0.conv1``, an expanded layer, or a
block such as ``layer1``) or the qualified name of the weight of a functional conv/linear call (or
of a matrix product ``x @ W`` on a parameter, as ``torch.export`` writes Hugging Face's ``Conv1D``).
Block outputs are found through the ``nn_module_stack`` metadata that symbolic tracing and
``torch.export`` record (and that the expansion and fusion passes hand on to the nodes they insert).
In the ``torch.export`` graph of a model expanded without tracing, an expanded layer is no module of
the graph but a stretch of it (its factors composed, one conv/linear call): the metadata still names
it, so it is tapped, and listed, under its module name as in the dense model's graph.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from .errors import PassError
from .expanded import ExpandedLayer, KernelComposer, layer_nodes, site_ends
from .ops import MATMULS, SPATIAL_DIMS, as_linear, bind, module_function


def tap(gm: fx.GraphModule, names: Iterable[str]) -> fx.GraphModule:
    """A GraphModule that returns ``(gm's output, {name: output of the layer called name})``.

    The result shares ``gm``'s modules and parameters (training it trains ``gm``); ``gm`` itself
    is not changed.  A layer called at several places yields the value of its last call.  It takes
    the inputs ``gm`` takes; a ``torch.export`` module keeps its input and output structure (keyword
    inputs, a Hugging Face ``ModelOutput``) and its guards on the input shapes.

    Raises:
        PassError: a name that addresses no layer of ``gm``.
    """
    names = list(dict.fromkeys(names))
    found = {name: tapped_node(gm, name) for name in names}
    missing = [name for name, node in found.items() if node is None]
    if missing:
        raise PassError(f"cannot tap {missing}: no such layer in {type(gm).__name__} "
                        f"(known layers include {layer_names(gm)[:8]})")
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, copies)
    taps = {name: copies[node] for name, node in found.items()}
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info.out_spec is not None:
        # a torch.export module: its graph returns flat leaves that the codegen puts back into the
        # model's output structure; the taps become one more (dict) child of that structure
        info = codegen.pytree_info
        leaves = list(output) if isinstance(output, (list, tuple)) else [output]
        spec = pytree.treespec_tuple([info.out_spec, pytree.treespec_dict({n: pytree.treespec_leaf() for n in taps})])
        graph.output(tuple(leaves + list(taps.values())))
        graph.set_codegen(_PyTreeCodeGen(_PyTreeInfo(info.orig_args, info.in_spec, spec)))
    else:
        graph.output((output, taps))
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
    applies = [n for n in nodes if n.op == "call_function" and _is_get_attr(_weight(n), name)]
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
        if node.op == "call_function":
            owner = _owning_layer(gm, _weight(node))
            if owner is not None:
                names.append(owner)
    return [n for n in dict.fromkeys(names) if n]


def linear_layer_names(gm: fx.GraphModule) -> list[str]:
    """Names of the conv/linear layers of ``gm`` (expanded or not), in graph order.

    Each is named as the expansion names it: a conv/linear module (an expanded one included) by its
    qualified name, a functional call or a matrix product on a parameter by the parameter's name (or
    by the expanded layer that took its place).  In a ``torch.export`` graph an expanded layer of a
    model expanded without tracing is found by the module metadata of its nodes and named by its
    module, which is also the name its dense original has in the dense model's graph."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = _get(gm, node.target)
            if module_function(module) is not None or (isinstance(module, ExpandedLayer) and module.call is not None):
                names.append(node.target)
        elif node.op == "call_function":
            owner = _expanded_owner(node) or _owning_layer(gm, _weight(node))
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


def layer_sites(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    """The nodes whose values are the outputs of the layer ``name``, one per call site, in graph order
    (the places :func:`tapped_node` looks at, all of them rather than the last): an expanded layer's
    chain ends, the nodes a module's own forward made, its ``call_module`` nodes, or the calls that
    read a functional weight of that name.

    Args:
        gm: the graph.
        name: a layer's qualified name (a module, or a functional weight's parameter).

    Returns:
        The nodes; empty if the graph does not call the layer.
    """
    nodes = list(gm.graph.nodes)
    layer = _get(gm, name)
    if isinstance(layer, ExpandedLayer):
        ends = site_ends(layer_nodes(gm.graph, name), name, layer)
        if ends:
            return ends
    in_module = [n for n in nodes if name in _stack_names(n)]
    if in_module:
        members = set(in_module)
        return [n for n in in_module if n.op != "get_attr" and any(u not in members for u in n.users)]
    calls = [n for n in nodes if n.op == "call_module" and n.target == name]
    if calls:
        return calls
    return [n for n in nodes if n.op == "call_function" and _is_get_attr(_weight(n), name)]


def _stack_names(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [qualified for qualified, _ in stack.values()]


_EXPANDED_TYPE = f"{ExpandedLayer.__module__}.{ExpandedLayer.__qualname__}"


def _expanded_owner(node: fx.Node) -> str | None:
    """The name of the expanded layer whose ``forward`` made ``node`` (the metadata of a graph made by
    tracing through expanded layers, as ``torch.export`` does: a class there is written as its name)."""
    stack = node.meta.get("nn_module_stack") or {}
    for qualified, kind in stack.values():
        if kind == _EXPANDED_TYPE or (isinstance(kind, type) and issubclass(kind, ExpandedLayer)):
            return qualified or None
    return None


def _weight(node: fx.Node):
    """The weight argument of a conv/linear call or of a matrix product read as linear, or None."""
    if node.op != "call_function":
        return None
    if node.target in SPATIAL_DIMS:
        return bind(node).get("weight")
    if node.target in MATMULS:
        product = as_linear(node)
        return product.weight if product is not None else None
    return None


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
