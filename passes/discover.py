"""Discovery: the conv/linear layers an expansion may rewrite, found in a graph or in a module tree,
each with what only its way of finding it can tell against it (call sites, weight reads, in-place
writes, leaf modules), and the layer-like nodes and modules that are not candidates, with the reason.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .expanded import ExpandedLayer, KernelComposer, weight_problem
from .ops import (FUNCTION_MODULES, MATMULS, SPATIAL_DIMS, Call, Product, as_linear, bind, call_of_module,
                  call_of_node, is_hf_conv1d, linear_like, matmul_problem, module_function, operands)


_TRANSPOSED = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


@dataclasses.dataclass
class Site:
    node: fx.Node
    call: Call
    product: Product | None = None  # for a matrix product read as linear

    # read from the node when needed: rewriting an earlier layer replaces the nodes they point to
    @property
    def input(self) -> fx.Node:
        if self.node.op == "call_module":
            return self.node.args[0] if self.node.args else self.node.kwargs["input"]
        return (operands if self.product else bind)(self.node)["input"]

    @property
    def bias(self) -> fx.Node | None:
        """The bias argument of a functional site; a module's bias lives in its ExpandedLayer."""
        if self.node.op == "call_module":
            return None
        return (operands if self.product else bind)(self.node).get("bias")

    def weight_nodes(self) -> list[fx.Node]:
        """The nodes that bring a functional site its weight, nearest first (a transpose, the get_attr)."""
        if self.node.op == "call_module":
            return []
        if self.product is not None:
            return [n for n in (self.product.through, self.product.weight) if n is not None]
        return [bind(self.node)["weight"]]


@dataclasses.dataclass
class Layer:
    """A conv/linear layer that may be expanded, as discovery found it (in a graph or a module tree)."""
    name: str
    module_type: type  # for include/exclude and the report (the module type of a functional call)
    weight: torch.Tensor  # as stored
    module: nn.Module | None  # None for the weight of functional calls and matrix products
    names: list[str] = dataclasses.field(default_factory=list)  # every name the module goes by
    sites: list[Site] = dataclasses.field(default_factory=list)  # graph call sites, in graph order
    transposed: bool = False  # the weight is stored (in, out): x @ W, Hugging Face's Conv1D
    reads: int | None = None  # graph nodes that read the weight outside the call sites (None: not known)
    problem: str | None = None  # why it cannot be expanded, as only discovery can tell

    def __post_init__(self):
        if self.module is not None:
            self.transposed = is_hf_conv1d(self.module)

    @property
    def groups(self) -> int:
        return call_of_module(self.module).groups if self.module is not None else self.sites[0].call.groups

    @property
    def linear_weight(self) -> torch.Tensor:
        """The weight in the ``(out, in, k...)`` layout the factors compose (a view, nothing copied)."""
        return self.weight.t() if self.transposed else self.weight

    def own_names(self) -> set[str]:
        """The parameter names under which the weight is this layer's own (not tied to another)."""
        return {f"{n}.weight" for n in self.names} if self.module is not None else {self.name}


def find_graph_layers(gm: fx.GraphModule) -> tuple[dict[str, Layer], dict[str, str]]:
    """Graph discovery: the candidate layers by qualified name, with their call sites in graph order
    and what only the graph shows against them, and the conv/linear-like nodes and modules that are
    not candidates at all, with the reason."""
    modules = dict(gm.named_modules())
    aliases: dict[int, list[str]] = {}
    for name, module in gm.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    layers: dict[str, Layer] = {}
    skipped: dict[str, str] = {}
    broken: set[str] = set()  # layers with one call site that cannot be rewritten
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, ExpandedLayer):
                skipped[node.target] = "already expanded"
            elif module_function(module) is not None:
                layer = layers.setdefault(node.target, Layer(node.target, type(module), module.weight, module,
                                                              aliases[id(module)]))
                layer.sites.append(Site(node, call_of_module(module)))
            elif isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter):
                skipped[node.target] = weight_problem(module.weight)
            elif _looks_linear(module):
                skipped[node.target] = _not_expandable(module)
        elif node.op == "call_function" and node.target in SPATIAL_DIMS:
            bound = bind(node)
            weight = bound.get("weight")
            if _is_expanded(weight, modules):
                skipped[_expanded_name(weight)] = "already expanded"
                continue
            param = _parameter(gm, weight)
            if param is None:
                skipped[node.name] = (f"{node.target.__name__} at node '{node.name}': its weight is not a "
                                      f"parameter read by get_attr")
                continue
            call = call_of_node(node)
            if any(isinstance(v, fx.Node) for _, v in call.options):
                skipped[weight.target] = f"node '{node.name}' computes its conv options in the graph"
                broken.add(weight.target)
                continue
            layer = layers.setdefault(weight.target, Layer(weight.target, FUNCTION_MODULES[node.target], param, None,
                                                            [weight.target]))
            layer.sites.append(Site(node, call))
        elif node.op == "call_function" and node.target in MATMULS:
            _find_product(gm, node, modules, layers, skipped, broken)
        elif node.op == "call_function" and node.target in _TRANSPOSED:
            skipped[node.name] = "transposed convolutions are not expandable"
    for name in broken:
        layers.pop(name, None)
    called = {n.target for n in gm.graph.find_nodes(op="call_module")}
    for layer in layers.values():
        layer.problem, layer.reads = _graph_problem(gm, layer, called)
    expanded = tuple(f"{n}." for n, m in modules.items() if isinstance(m, ExpandedLayer))
    for name, module in modules.items():
        if (name in layers or name in skipped or f"{name}.weight" in layers or name.startswith(expanded)
                or not (module_function(module) or _looks_linear(module))):
            continue
        leaf = next((c for c in called if name.startswith(c + ".")), None)
        skipped[name] = ("never called by the graph" if leaf is None else
                         f"inside leaf module '{leaf}', which is not traced")
    return layers, skipped


def _find_product(gm: fx.GraphModule, node: fx.Node, modules: dict, layers: dict[str, Layer],
                  skipped: dict[str, str], broken: set[str]) -> None:
    """Discovery of one ``addmm``/``mm``/``matmul`` node: a linear layer when its right operand is a 2-D
    parameter (or its transpose); a product of activations is not a layer and not reported."""
    product = as_linear(node)
    if product is None:
        left = operands(node).get("input")
        if _parameter(gm, left) is not None:
            skipped[left.target] = (f"{getattr(node.target, '__name__', node.target)} at node '{node.name}' "
                                    f"multiplies by the parameter from the left (W @ x), not as a linear layer does")
        return
    if _is_expanded(product.weight, modules):
        skipped[_expanded_name(product.weight)] = "already expanded"
        return
    target = product.weight.target
    param = _parameter(gm, product.weight)
    if param is None:
        skipped[target] = (f"{getattr(node.target, '__name__', node.target)} at node '{node.name}': its weight is "
                           f"not a parameter")
        return
    bias = product.bias
    bias_value = _tensor(gm, bias) if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
    problem = matmul_problem(node, product, param, bias_value)
    if problem is None and target in layers and layers[target].transposed != product.transposed:
        problem = f"node '{node.name}' uses the weight in the other orientation than its other call sites"
    if problem is not None:
        skipped[target] = problem
        broken.add(target)
        return
    layer = layers.setdefault(target, Layer(target, nn.Linear, param, None, [target], transposed=product.transposed))
    layer.sites.append(Site(node, Call(linear_like(node.target)), product))


def find_module_layers(model: nn.Module) -> tuple[dict[str, Layer], dict[str, str]]:
    """Module-tree discovery: the expandable conv/linear modules with every name each goes by, and the
    modules that look like layers but are not expandable (or already expanded), with the reason."""
    names: dict[int, list[str]] = {}
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
        found[id(module)] = module
    layers: dict[str, Layer] = {}
    skipped: dict[str, str] = {}
    inside_expanded = tuple(f"{n}." for key, m in found.items() if isinstance(m, ExpandedLayer) for n in names[key])
    for key, module in found.items():
        name = names[key][0]
        if isinstance(module, ExpandedLayer):
            skipped[name] = "already expanded"
        elif name.startswith(inside_expanded):
            continue
        elif module_function(module) is not None:
            layers[name] = Layer(name, type(module), module.weight, module, names[key])
        elif isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter):
            skipped[name] = weight_problem(module.weight)
        elif _looks_linear(module):
            skipped[name] = _not_expandable(module)
    return layers, skipped


def _graph_problem(gm: fx.GraphModule, layer: Layer, called: set[str]) -> tuple[str | None, int]:
    """Why the graph keeps ``layer`` from being expanded exactly, or None; and how many nodes read its
    weight other than through its call sites (they will read the composed weight).  ``called``: the
    targets of the graph's call_module nodes."""
    groups = {site.call.groups for site in layer.sites}
    if len(groups) != 1:
        return f"call sites disagree on groups {sorted(groups)}", 0
    site_nodes = {n for site in layer.sites for n in [site.node, *site.weight_nodes()]}
    weights = layer.own_names()
    prefixes = tuple(f"{n}." for n in layer.names)
    reads = 0
    for node in gm.graph.find_nodes(op="get_attr"):
        if node.target in weights:
            for user in node.users:
                if user in site_nodes:
                    continue
                if _writes(user):
                    return f"node '{user.name}' writes to '{node.target}' in place", 0
                reads += 1
        elif layer.module is not None and node.target.startswith(prefixes) and not node.target.endswith(".bias"):
            return f"node '{node.name}' reads '{node.target}' directly", 0
    if layer.module is None:
        owners = [layer.name.rsplit(".", k)[0] for k in range(1, layer.name.count(".") + 1)]
        owner = next((o for o in owners if o in called), None)
        if owner is not None:
            return f"module '{owner}' reads the weight inside its own forward", 0
        if layer.linear_weight.dim() != SPATIAL_DIMS[layer.sites[0].call.function] + 2:
            return (f"weight of shape {tuple(layer.weight.shape)} does not fit "
                    f"{layer.sites[0].call.function.__name__}"), 0
    return None, reads


def _writes(node: fx.Node) -> bool:
    """Whether ``node`` may write into its input in place (``w.add_(...)``, ``w[0] = ...``, ``w.data``)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        if node.target in (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv):
            return True
        if node.target is getattr and node.args[1:] == ("data",):
            return True
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            return schema.is_mutable
        return getattr(node.target, "__name__", "").endswith("_")
    return False


def _looks_linear(module: nn.Module) -> bool:
    """A conv/linear module type, or a module holding its own ``weight`` parameter whose class name says
    Conv or Linear (not a container whose name does, such as a block of layers)."""
    name = type(module).__name__
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or (
        ("Conv" in name or "Linear" in name) and isinstance(module._parameters.get("weight"), torch.Tensor))


def _not_expandable(module: nn.Module) -> str:
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    return (f"{kind} is not expandable (only nn.Conv1d/2d/3d, nn.Linear and Hugging Face Conv1D themselves, not "
            f"subclasses, transposed, quantized or other layer types)")


def _is_expanded(weight, modules) -> bool:
    """Whether ``weight`` is a factor, a composed kernel or a weight read of an ExpandedLayer."""
    if not isinstance(weight, fx.Node):
        return False
    if weight.op == "call_module":
        return isinstance(modules.get(weight.target), KernelComposer)
    if weight.op == "get_attr":
        return isinstance(modules.get(weight.target.rsplit(".", 2)[0]), ExpandedLayer)
    return False


def _expanded_name(weight: fx.Node) -> str:
    """The name of the ExpandedLayer whose factor, kernel or read ``weight`` is (see :func:`_is_expanded`)."""
    return weight.target.rsplit(".", 1 if weight.op == "call_module" else 2)[0]


def _parameter(gm: fx.GraphModule, node) -> nn.Parameter | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return value


def _tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The parameter or buffer a get_attr node reads, or None."""
    owner, _, attr = node.target.rpartition(".")
    try:
        value = getattr(gm.get_submodule(owner), attr)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None
