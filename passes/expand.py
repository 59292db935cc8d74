"""The expansion pass: every matched conv/linear becomes a chain of linear ops with the same product."""
from __future__ import annotations

import copy
import dataclasses
import math
from numbers import Real

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import linalg
from .errors import ExpansionError
from .graph import inserting_before_with_meta, set_attr
from .expanded import (COMPOSED, MODES, ExpandedLayer, KernelComposer, chain_plan, module_problem, new_expanded_layer,
                       parameter_count, weight_problem)
from .ops import FUNCTION_MODULES, MODULE_FUNCTIONS, SPATIAL_DIMS, Call, bind, call_of_module, call_of_node, emit
from .select import Patterns, selector

INITS = ("orthogonal", "balanced")
_TRANSPOSED = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


@dataclasses.dataclass
class _Site:
    node: fx.Node
    call: Call

    # read from the node when needed: rewriting an earlier layer replaces the nodes they point to
    @property
    def input(self) -> fx.Node:
        if self.node.op == "call_module":
            return self.node.args[0] if self.node.args else self.node.kwargs["input"]
        return bind(self.node)["input"]

    @property
    def bias(self) -> fx.Node | None:
        """The bias argument of a functional site; a module's bias lives in its ExpandedLayer."""
        return None if self.node.op == "call_module" else bind(self.node).get("bias")


@dataclasses.dataclass
class _Layer:
    name: str
    module_type: type
    weight: torch.Tensor
    module: nn.Module | None  # None for the weight of functional calls
    sites: list[_Site] = dataclasses.field(default_factory=list)


def expand(gm: fx.GraphModule, *, expansion: float = 4, mode: str = "online", depth: int = 3,
           include: Patterns = None, exclude: Patterns = None, seed: int = 0, init: str = "orthogonal",
           max_params: int | None = None) -> fx.GraphModule:
    """Rewrite every expandable conv/linear of ``gm`` into a chain whose product is its weight.

    Returns a new GraphModule (``gm`` is not changed) whose outputs equal ``gm``'s up to rounding,
    with a report in ``meta["fxlop"]["expand"]``.  Matched: ``nn.Conv1d/2d/3d`` and ``nn.Linear``
    modules and ``F.conv1d/2d/3d``/``F.linear`` calls whose weight is a ``get_attr`` parameter.
    Everything else conv-like is left as it is and reported with the reason.  Layers that are
    already expanded are left alone, so expanding twice changes nothing more.

    Args:
        expansion: width multiplier ``r`` of the hidden widths (``>= 1``).
        mode: ``"online"`` composes the factors into one kernel inside the graph (about the compact
            model's cost); ``"chain"`` runs one op per factor.  Same function, same gradients.
        depth: number of linear ops in each chain (``>= 2``).
        include, exclude: qualified-name globs or module types; functional calls match the module type
            of their functional (``F.conv2d`` ~ ``nn.Conv2d``) and the name of their weight.
        seed: seed of the random orthonormal outer factors.
        init: ``"orthogonal"`` (outer factors orthonormal, the kernel factor carries the layer's
            scale) or ``"balanced"`` (every factor rescaled to the same spectral norm).
        max_params: refuse, before allocating anything, an expansion whose model would have more
            parameters than this.
    """
    check_options(expansion, mode, depth, max_params, init)
    gm = copy.deepcopy(gm)
    layers, skipped = _find_layers(gm)
    is_included, is_excluded = selector(include), selector(exclude)
    chosen = []
    for layer in layers.values():
        if is_included is not None and not is_included(layer.name, layer.module_type):
            skipped[layer.name] = "not matched by include"
        elif is_excluded is not None and is_excluded(layer.name, layer.module_type):
            skipped[layer.name] = "matched by exclude"
        else:
            reason = _unexpandable(gm, layer)
            if reason is None:
                chosen.append(layer)
            else:
                skipped[layer.name] = reason

    plans = {layer.name: linalg.chain_shapes(layer.weight.shape, layer.sites[0].call.groups, expansion, depth)
             for layer in chosen}
    params_before = parameter_count(gm)
    params_after = params_before + sum(
        sum(math.prod(s) for s in plans[layer.name][0]) - layer.weight.numel() for layer in chosen)
    check_budget(max_params, params_before, params_after,
                 {layer.name: sum(math.prod(s) for s in plans[layer.name][0]) for layer in chosen})

    generator = torch.Generator().manual_seed(seed)
    expanded = []
    for layer in tqdm(chosen, desc="expand", unit="layer", delay=2.0, leave=False, disable=None):
        shapes, kernel_index = plans[layer.name]
        groups = layer.sites[0].call.groups
        container = new_expanded_layer(layer.weight, groups, shapes, kernel_index, generator,
                                       balanced=init == "balanced", module=layer.module, mode=mode, in_graph=True)
        set_attr(gm, layer.name, container)
        _rewrite_sites(gm.graph, layer, container, mode)
        expanded.append({
            "name": layer.name, "type": layer.module_type.__name__,
            "origin": "module" if layer.module is not None else "functional",
            "weight_shape": list(layer.weight.shape), "factor_shapes": [list(s) for s in shapes],
            "call_sites": len(layer.sites), "params_before": layer.weight.numel(),
            "params_after": sum(f.numel() for f in container.factors),
        })
    gm.graph.lint()
    gm.recompile()
    gm.meta.setdefault("fxlop", {})["expand"] = {
        "expansion": expansion, "mode": mode, "depth": depth, "seed": seed, "init": init,
        "expanded": expanded, "skipped": [{"name": n, "reason": r} for n, r in skipped.items()],
        "params_before": params_before, "params_after": parameter_count(gm),
    }
    return gm


def check_budget(max_params: int | None, before: int, after: int, factor_counts: dict[str, int]) -> None:
    """The ``max_params`` guard, before anything is allocated."""
    if max_params is not None and after > max_params:
        largest = max(factor_counts, key=factor_counts.get)
        raise ExpansionError(
            f"expanding {len(factor_counts)} layers would give {after:,} parameters, over "
            f"max_params={max_params:,} (now {before:,}); the largest expanded layer is "
            f"'{largest}'. Lower expansion or depth, or exclude layers.")


def check_options(expansion, mode, depth, max_params, init) -> None:
    """Raise ExpansionError for settings the expansion cannot honour."""
    if init not in INITS:
        raise ExpansionError(f"init must be one of {INITS}, got {init!r}")
    if mode not in MODES:
        raise ExpansionError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(expansion, Real) or isinstance(expansion, bool) or not expansion >= 1:
        raise ExpansionError(f"expansion must be a number >= 1, got {expansion!r}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 2:
        raise ExpansionError(f"depth must be an integer >= 2, got {depth!r}")
    if max_params is not None and (not isinstance(max_params, int) or max_params < 0):
        raise ExpansionError(f"max_params must be a non-negative integer or None, got {max_params!r}")


def _find_layers(gm: fx.GraphModule) -> tuple[dict[str, _Layer], dict[str, str]]:
    """The candidate layers by qualified name, with their call sites in graph order, and the
    conv/linear-like nodes that are not candidates at all, with the reason."""
    modules = dict(gm.named_modules())
    layers: dict[str, _Layer] = {}
    skipped: dict[str, str] = {}
    broken: set[str] = set()  # layers with one call site that cannot be rewritten
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = modules[node.target]
            if type(module) in MODULE_FUNCTIONS:
                layer = layers.setdefault(node.target, _Layer(node.target, type(module), module.weight, module))
                layer.sites.append(_Site(node, call_of_module(module)))
            elif isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter):
                skipped[node.target] = weight_problem(module.weight)
            elif _looks_linear(module):
                kind = f"{type(module).__module__}.{type(module).__qualname__}"
                skipped[node.target] = (f"{kind} is not expandable (only nn.Conv1d/2d/3d and nn.Linear "
                                        f"themselves, not subclasses, transposed, quantized or other layer types)")
        elif node.op == "call_function" and node.target in SPATIAL_DIMS:
            bound = bind(node)
            weight = bound.get("weight")
            if _is_expanded(weight, modules):
                skipped[weight.target.rsplit(".", 2)[0]] = "already expanded"
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
            layer = layers.setdefault(weight.target, _Layer(weight.target, FUNCTION_MODULES[node.target], param, None))
            layer.sites.append(_Site(node, call))
        elif node.op == "call_function" and node.target in _TRANSPOSED:
            skipped[node.name] = "transposed convolutions are not expandable"
    for name in broken:
        layers.pop(name, None)
    return layers, skipped


def _looks_linear(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or "Conv" in name or "Linear" in name


def _is_expanded(weight, modules) -> bool:
    """Whether ``weight`` is a factor or a composed kernel of an ExpandedLayer."""
    if not isinstance(weight, fx.Node):
        return False
    if weight.op == "call_module":
        return isinstance(modules.get(weight.target), KernelComposer)
    if weight.op == "get_attr":
        return isinstance(modules.get(weight.target.rsplit(".", 2)[0]), ExpandedLayer)
    return False


def _parameter(gm: fx.GraphModule, node) -> nn.Parameter | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return value


def _unexpandable(gm: fx.GraphModule, layer: _Layer) -> str | None:
    """Why ``layer`` cannot be expanded exactly, or None."""
    weight = layer.weight
    problem = weight_problem(weight) if layer.module is None else module_problem(layer.module)
    if problem is not None:
        return problem
    groups = {site.call.groups for site in layer.sites}
    if len(groups) != 1:
        return f"call sites disagree on groups {sorted(groups)}"
    weight_name = layer.name if layer.module is None else f"{layer.name}.weight"
    aliases = [n for n, p in gm.named_parameters(remove_duplicate=False) if p is weight and n != weight_name]
    if aliases:
        return f"its weight is tied to '{aliases[0]}'"
    site_nodes = {site.node for site in layer.sites}
    for node in gm.graph.nodes:
        if layer.module is not None:
            if node.op == "get_attr" and node.target.startswith(layer.name + "."):
                return f"node '{node.name}' reads '{node.target}' directly"
        elif node.op == "get_attr" and node.target == layer.name:
            for user in node.users:
                if user not in site_nodes or [k for k, v in bind(user).items() if v is node] != ["weight"]:
                    return f"its weight is also used by node '{user.name}'"
        elif node.op == "call_module" and layer.name.startswith(node.target + "."):
            return f"module '{node.target}' reads the weight inside its own forward"
    if layer.module is None and weight.dim() != SPATIAL_DIMS[layer.sites[0].call.function] + 2:
        return f"weight of shape {tuple(weight.shape)} does not fit {layer.sites[0].call.function.__name__}"
    if weight.shape[0] % next(iter(groups)):
        return f"{weight.shape[0]} output channels do not divide into {next(iter(groups))} groups"
    return None


def _rewrite_sites(graph: fx.Graph, layer: _Layer, container: ExpandedLayer, mode: str) -> None:
    name = layer.name
    composed = None
    for site in layer.sites:
        plan = chain_plan(site.call, container.depth, container.kernel_index, mode)
        with inserting_before_with_meta(graph, site.node):
            if mode == "online" and composed is None:
                factors = [graph.get_attr(f"{name}.factors.{i}") for i in range(container.depth)]
                composed = graph.call_module(f"{name}.compose", tuple(factors))
            bias = site.bias
            if layer.module is not None and container.bias is not None:
                bias = graph.get_attr(f"{name}.bias")
            value = site.input
            for step in plan:
                weight = composed if step.weight == COMPOSED else graph.get_attr(f"{name}.factors.{step.weight}")
                value = emit(graph, step.call, value, weight, bias if step.has_bias else None)
        site.node.replace_all_uses_with(value)
        old_weight = bind(site.node)["weight"] if layer.module is None else None
        graph.erase_node(site.node)
        if old_weight is not None and not old_weight.users:
            graph.erase_node(old_weight)

