"""The expansion: every matched conv/linear becomes a chain of linear ops with the same product.

One driver (:func:`_expand`) decides what is expanded and why (selection, weights, hooks, tied
weights, groups, the wide-layer policy and the limits) and writes the report, for two thin back ends
that each find layers their own way (:mod:`passes.discover`) and put the expanded layer in place:
:func:`expand` rewrites a graph, :func:`expand_modules` swaps modules of an ordinary ``nn.Module``.
The budget is planned and checked by :mod:`passes.budget` before anything is allocated.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch.fx as fx
import torch.nn as nn

from . import linalg
from .budget import check_budget, parameter_bytes, plan
from .caller import warn_caller
from .discover import Layer, find_graph_layers, find_module_layers
from .errors import ExpansionError
from .expanded import COMPOSED, ExpandedLayer, chain_plan, module_problem, new_expanded_layer, parameter_count, \
    weight_problem
from .graph import inserting_before_with_meta, set_attr
from .ops import emit
from .options import ExpandOptions
from .progress import progress
from .report import Estimate, ExpandedRecord, ExpandReport, ReducedRecord, SkippedRecord, copy_with_report, with_section
from .select import Patterns, selector


def expand(gm: fx.GraphModule, options: ExpandOptions | None = None, /, **fields) -> fx.GraphModule:
    """Rewrite every expandable conv/linear of ``gm`` into a chain whose product is its weight.

    The graph back end of the expansion driver (:func:`expand_modules` is the other; both decide
    what is expanded, and report it, with the same code).  Returns a new GraphModule (``gm`` is not
    changed) whose outputs equal ``gm``'s up to rounding, with an :class:`ExpandReport` in its report
    (:func:`passes.report.report_of`).
    Matched: ``nn.Conv1d/2d/3d``, ``nn.Linear`` and Hugging Face ``Conv1D`` modules; ``F.conv1d/2d/3d``
    and ``F.linear`` calls (and their ``aten`` ops in ``torch.export`` graphs) whose weight is a
    ``get_attr`` parameter; and ``addmm``/``mm``/``matmul`` products ``x @ W`` of a 2-D parameter
    ``W`` or of its transpose, rewritten as ``linear`` (and fused back to a parameter of ``W``'s shape).
    Other nodes that read a weight (``w.dtype``, ``w * mask``) read the composed weight instead
    (``<layer>.read``); in-place writes to it keep the layer dense.  Everything else conv-like is left
    as it is and reported with the reason.  Layers that are already expanded are left alone, so
    expanding twice changes nothing more.  Factors are created on each weight's device and in its
    dtype (see :func:`passes.linalg.factorize`).

    Bounded: before anything is allocated, every layer's parameters, bytes and seconds are
    estimated; a layer over ``max_layer_params`` is expanded less (the report's ``reduced``) or left
    dense (``skipped``), and an expansion over ``max_params``, ``max_bytes`` or ``max_seconds`` is refused.

    Args:
        gm: the graph to expand.
        options: an :class:`ExpandOptions` (default: the defaults).
        fields: fields of :class:`ExpandOptions` replacing those of ``options`` (``expansion=2``);
            ``leaf_modules`` and ``trace`` are the callers' (the graph is already traced).

    Returns:
        The expanded GraphModule.

    Raises:
        ExpansionError: a bad option, or an expansion over a limit (naming the largest layer, the
            estimates and options that fit).
    """
    return _expand(gm, _GRAPH, ExpandOptions.of(options, **fields))


def expand_modules(model: nn.Module, options: ExpandOptions | None = None, /, *, in_place: bool = False,
                   **fields) -> nn.Module:
    """Expand without a graph: a copy of ``model`` whose expandable conv/linear modules are replaced by
    :class:`ExpandedLayer` modules that run the chain themselves (control flow in ``forward`` is fine).

    ``in_place=True`` swaps the layers of ``model`` itself and returns it (no copy, so no copy's memory
    either): every expanded layer is built before the first one is swapped in, so an error (or an
    interrupt) during the expansion leaves ``model`` as it was, never half expanded.  An expanded layer
    keeps the replaced module's ``bias`` parameter itself; the replaced modules are no longer part of
    ``model`` (hold on to them to put them back, as :func:`passes.fuse_modules` does).

    The module-swap back end of the expansion driver: the same selection, limits and report as
    :func:`expand`, from the module tree instead of a graph.  Shared modules stay shared (every name
    that refers to one gets the same layer).  What a module tree cannot show: functional calls and
    products on parameters are not expanded, and neither found nor reported; reads of an expanded
    layer's ``weight`` by other code are answered with the composed weight
    (:attr:`ExpandedLayer.weight`), writes to it raise.

    Args:
        model: the model.
        options: an :class:`ExpandOptions` (default: the defaults).
        in_place: swap ``model``'s own layers instead of a copy's.
        fields: fields of :class:`ExpandOptions` replacing those of ``options``.

    Returns:
        The expanded copy (``model`` itself with ``in_place``).

    Raises:
        ExpansionError: a bad option, or an expansion over a limit.
    """
    return _expand(model, _MODULES, ExpandOptions.of(options, **fields), in_place=in_place)


@dataclasses.dataclass(frozen=True)
class _BackEnd:
    """How one kind of model is expanded: find its layers, put an expanded layer in place, finish."""
    traced: bool
    find: Callable[[nn.Module], tuple[dict[str, Layer], dict[str, str]]]
    replace: Callable[[nn.Module, Layer, ExpandedLayer, str], None]
    finish: Callable[[nn.Module], nn.Module]


def _expand(model: nn.Module, back_end: _BackEnd, options: ExpandOptions, in_place: bool = False) -> nn.Module:
    """The expansion driver: what to expand and why, the limits, the copy, the report; ``back_end``
    does the rest.  ``in_place`` (module swap only): no copy; all layers are swapped in at the end."""
    if in_place and back_end.traced:
        raise ExpansionError("only the module swap (expand_modules) expands in place")
    began = time.perf_counter()
    layers, skipped = back_end.find(model)
    chosen = _choose(model, layers, skipped, options.include, options.exclude)

    # everything is planned and checked on the caller's model, before the copy and any factor exists
    planned, reduced, dense = plan([(layer.name, layer.linear_weight, layer.groups) for layer in chosen],
                                   expansion=options.expansion, pointwise_expansion=options.pointwise_expansion,
                                   depth=options.depth, max_layer_params=options.max_layer_params)
    skipped.update(dense)
    params_before = parameter_count(model)
    estimate = check_budget(planned, params_before=params_before,
                            copy_bytes=0 if in_place else parameter_bytes(model), options=options)

    if not in_place:
        model = copy_with_report(model)
        layers, _ = back_end.find(model)
    expanded, built = [], []
    for item in progress(planned, "expand", [p.seconds[0] for p in planned], [p.name for p in planned]):
        layer = layers[item.name]
        container = new_expanded_layer(layer.weight, item.groups, item.shapes, item.kernel_index,
                                       linalg.generator(options.seed, layer.weight.device, item.name),
                                       balanced=options.init == "balanced", module=layer.module, mode=options.mode,
                                       in_graph=back_end.traced, transposed_weight=layer.transposed)
        if in_place:
            built.append((layer, container))
        else:
            back_end.replace(model, layer, container, options.mode)
        expanded.append(ExpandedRecord(
            name=layer.name, type=layer.module_type.__name__,
            origin="module" if layer.module is not None else "functional",
            weight_shape=tuple(layer.weight.shape), transposed_weight=layer.transposed,
            expansion=item.expansion, factor_shapes=tuple(tuple(s) for s in item.shapes),
            call_sites=len(layer.sites) if back_end.traced else None, weight_reads=layer.reads,
            params_before=layer.weight.numel(), params_after=sum(f.numel() for f in container.factors)))
    if in_place:
        _swap_all(model, built, options.mode)
    model = back_end.finish(model)
    with_section(model, expand=ExpandReport(
        options=options, traced=back_end.traced, expanded=tuple(expanded),
        reduced=tuple(ReducedRecord(**r) for r in reduced),
        skipped=tuple(SkippedRecord(n, r) for n, r in skipped.items()),
        params_before=params_before, params_after=parameter_count(model),
        estimate=Estimate(params=estimate["params"], bytes=estimate["bytes"],
                          expand_seconds=estimate["seconds"]["expand"], fuse_seconds=estimate["seconds"]["fuse"],
                          device=estimate["device"]),
        seconds=time.perf_counter() - began))
    return model


def _choose(model: nn.Module, layers: dict[str, Layer], skipped: dict[str, str], include: Patterns,
            exclude: Patterns) -> list[Layer]:
    """The layers to expand, in discovery order; the others go to ``skipped`` with the reason.  The
    same rules whatever found the layers: the selection, then the weight (dtype, values, lazy), hooks,
    tied weights, what discovery found, and whether the channels divide into the groups."""
    is_included, is_excluded = selector(include), selector(exclude)
    parameter_names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        parameter_names.setdefault(id(param), []).append(name)
    chosen = []
    for layer in layers.values():
        if is_included is not None and not is_included(layer.name, layer.module_type):
            reason = "not matched by include"
        elif is_excluded is not None and is_excluded(layer.name, layer.module_type):
            reason = "matched by exclude"
        else:
            reason = weight_problem(layer.weight) if layer.module is None else module_problem(layer.module)
            own = layer.own_names()
            aliases = [n for n in parameter_names.get(id(layer.weight), []) if n not in own]
            if reason is None and aliases:
                reason = f"its weight is tied to '{aliases[0]}'"
            reason = reason or layer.problem
            if reason is None and layer.linear_weight.shape[0] % layer.groups:
                reason = f"{layer.linear_weight.shape[0]} output channels do not divide into {layer.groups} groups"
        if reason is None:
            chosen.append(layer)
        else:
            skipped[layer.name] = reason
    if is_included is not None and layers and all(skipped.get(n) == "not matched by include" for n in layers):
        shown = [include] if isinstance(include, (str, type)) else list(include)
        warn_caller(f"expand: include={shown!r} matches none of the {len(layers)} expandable layers "
                    f"({', '.join(list(layers)[:5])}{', ...' if len(layers) > 5 else ''}): nothing is expanded")
    return chosen


def _rewrite(gm: fx.GraphModule, layer: Layer, container: ExpandedLayer, mode: str) -> None:
    """Graph back end: put ``container`` at the layer's names and rewrite its call sites and weight reads."""
    for name in layer.names:
        set_attr(gm, name, container)
    graph = gm.graph
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
        old_weights = site.weight_nodes()
        graph.erase_node(site.node)
        for node in old_weights:
            if not node.users:
                graph.erase_node(node)
    # what else reads the weight now reads the composed weight, in the layout it had
    weights = layer.own_names()
    for node in graph.find_nodes(op="get_attr"):
        if node.target in weights:
            if node.users:
                with inserting_before_with_meta(graph, node):
                    factors = [graph.get_attr(f"{name}.factors.{i}") for i in range(container.depth)]
                    read = graph.call_module(f"{name}.read", tuple(factors))
                node.replace_all_uses_with(read)
            graph.erase_node(node)


def _finish_graph(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.lint()
    gm.recompile()
    return gm


def _swap(model: nn.Module, layer: Layer, container: ExpandedLayer, mode: str) -> None:
    """Module back end: put ``container`` at every name of the module (it runs the chain itself)."""
    for name in layer.names:
        set_attr(model, name, container)


def _swap_all(model: nn.Module, built: list[tuple[Layer, ExpandedLayer]], mode: str) -> None:
    """Module back end in place: :func:`_swap` every built layer in, or, if that is interrupted, none."""
    done = []
    try:
        for layer, container in built:
            done.append(layer)
            _swap(model, layer, container, mode)
    except BaseException:
        for layer in reversed(done):
            for name in layer.names:
                set_attr(model, name, layer.module)
        raise


def _finish_modules(model: nn.Module) -> nn.Module:
    return model


_GRAPH = _BackEnd(traced=True, find=find_graph_layers, replace=_rewrite, finish=_finish_graph)
_MODULES = _BackEnd(traced=False, find=find_module_layers, replace=_swap, finish=_finish_modules)
