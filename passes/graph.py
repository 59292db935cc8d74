"""Small helpers on GraphModules shared by the passes."""
from __future__ import annotations

import networkx as nx
import torch.fx as fx


def set_attr(gm: fx.GraphModule, qualified_name: str, value) -> None:
    """Put ``value`` (a module or a parameter) at ``qualified_name``, replacing what was there."""
    owner_name, _, attr = qualified_name.rpartition(".")
    owner = gm.get_submodule(owner_name)
    # nn.Module.__setattr__ refuses a module where a parameter is registered, so unregister first
    owner._parameters.pop(attr, None)
    owner._modules.pop(attr, None)
    setattr(owner, attr, value)


def dataflow(graph: fx.Graph) -> nx.DiGraph:
    """The graph's data flow as a networkx DiGraph over its nodes (edge ``u -> v``: v reads u)."""
    flow = nx.DiGraph()
    flow.add_nodes_from(graph.nodes)
    flow.add_edges_from((node, user) for node in graph.nodes for user in node.users)
    return flow
