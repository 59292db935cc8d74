"""Small helpers on GraphModules shared by the passes."""
from __future__ import annotations

import contextlib
import copy

import networkx as nx
import torch.fx as fx
import torch.nn as nn

#: node metadata a rewrite passes on to the nodes that replace a node (module stack: which module
#: a value belongs to, used to address block outputs by name)
INHERITED_META = ("nn_module_stack", "stack_trace")


def set_attr(gm: fx.GraphModule, qualified_name: str, value) -> None:
    """Put ``value`` (a module or a parameter) at ``qualified_name``, replacing what was there."""
    owner_name, _, attr = qualified_name.rpartition(".")
    owner = gm.get_submodule(owner_name)
    # nn.Module.__setattr__ refuses a module where a parameter is registered (and the reverse), so
    # unregister the other kind first; a module replacing a module keeps its place in _modules,
    # which is the order nn.Sequential runs its children in
    if isinstance(value, nn.Module):
        owner._parameters.pop(attr, None)
    else:
        owner._modules.pop(attr, None)
    setattr(owner, attr, value)


def dataflow(graph: fx.Graph) -> nx.DiGraph:
    """The graph's data flow as a networkx DiGraph over its nodes (edge ``u -> v``: v reads u)."""
    flow = nx.DiGraph()
    flow.add_nodes_from(graph.nodes)
    flow.add_edges_from((node, user) for node in graph.nodes for user in node.users)
    return flow


@contextlib.contextmanager
def inserting_before_with_meta(graph: fx.Graph, node: fx.Node):
    """``graph.inserting_before(node)``; the inserted nodes also inherit ``node``'s module stack."""
    anchor = node.prev
    with graph.inserting_before(node):
        yield
    current = anchor.next
    while current is not node:
        for key in INHERITED_META:
            if key in node.meta and key not in current.meta:
                current.meta[key] = copy.copy(node.meta[key])
        current = current.next
