"""The expansion: every matched conv/linear becomes a chain of linear ops with the same product.

One driver (:func:`_expand`) decides what is expanded and why (selection, weights, hooks, tied
weights, groups, the wide-layer policy and the limits) and writes the report, for two thin back ends
that each find layers their own way and put the expanded layer in place: :func:`expand` rewrites a
graph, :func:`expand_modules` swaps modules of an ordinary ``nn.Module``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import operator
import time
import warnings
from collections.abc import Callable, Sequence
from numbers import Integral, Real

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
from .ops import (FUNCTION_MODULES, MATMULS, SPATIAL_DIMS, Call, Product, as_linear, bind, call_of_module,
                  call_of_node, emit, is_hf_conv1d, linear_like, matmul_problem, module_function, operands)
from .select import Patterns, selector

INITS = ("orthogonal", "balanced")
_TRANSPOSED = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


@dataclasses.dataclass
class _Site:
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
class _Layer:
    """A conv/linear layer that may be expanded, as discovery found it (in a graph or a module tree)."""
    name: str
    module_type: type  # for include/exclude and the report (the module type of a functional call)
    weight: torch.Tensor  # as stored
    module: nn.Module | None  # None for the weight of functional calls and matrix products
    names: list[str] = dataclasses.field(default_factory=list)  # every name the module goes by
    sites: list[_Site] = dataclasses.field(default_factory=list)  # graph call sites, in graph order
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


#: Default limits of :func:`expand`.  A layer whose factors would hold more than ``MAX_LAYER_PARAMS``
#: parameters (256 MiB in fp32) is expanded at the largest lower expansion that fits, in steps of 1/4,
#: or left dense; an expansion estimated to add more than ``MAX_BYTES`` of memory (float64
#: temporaries included) or to take more than ``MAX_SECONDS`` (expand and the fuse it will need, on the
#: model's device) is refused before anything is allocated.
MAX_LAYER_PARAMS = 2 ** 26
#: the largest width multiplier accepted at all (ExpandNets use 4): past it the widths alone are absurd, and
#: refusing costs nothing, where planning a layer at such widths would overflow the estimates
MAX_EXPANSION = 1024
MAX_BYTES = 2 ** 32
MAX_SECONDS = 60.0
#: the seconds estimate has come out up to 1.44x short on the zoo's models (RegNet, ConvNeXt; 2-core CPU) and
#: up to 3x long (small models, where the per-layer overhead dominates): a call is refused once
#: SECONDS_MARGIN times its estimate is over ``max_seconds``, so that what is accepted finishes in time
SECONDS_MARGIN = 1.5
#: width multiplier of layers without a spatial kernel (1x1 convs, linears, products) unless told
#: otherwise.  Their middle factor is itself a matrix of ``r^2`` times the weight's entries, so at
#: ``r = 4`` they held 93-98 % of the factors of a MobileNetV2 and a ViT and most of the composition
#: time, while LOP's first-order update does not depend on the widths at all (docs/theory.md,
#: "How LOP changes the optimizer"; the recovery grid's ``lop_r1`` measures the rest).
POINTWISE_EXPANSION = 1.0


def layer_expansion(weight_shape: Sequence[int], expansion: float, pointwise_expansion: float | None) -> float:
    """The width multiplier of a layer whose weight has ``weight_shape`` (``(out, in, k...)``):
    ``pointwise_expansion`` for a single-tap kernel (unless None), ``expansion`` otherwise."""
    if pointwise_expansion is not None and math.prod(weight_shape[2:]) == 1:
        return pointwise_expansion
    return expansion


@dataclasses.dataclass
class Planned:
    """One layer to expand: its factor shapes at the expansion it gets, and what that costs."""
    name: str
    weight: torch.Tensor
    groups: int
    expansion: float
    shapes: list[tuple[int, ...]]
    kernel_index: int
    cost: linalg.Cost
    seconds: tuple[float, float] = (0.0, 0.0)  # estimated: factorize, fuse

    @classmethod
    def of(cls, name: str, weight: torch.Tensor, groups: int, expansion: float, depth: int) -> Planned:
        shapes, kernel_index = linalg.chain_shapes(weight.shape, groups, expansion, depth)
        cost = linalg.factorize_cost(weight.shape, groups, shapes, kernel_index, weight.dtype, weight.device)
        return cls(name, weight, groups, expansion, shapes, kernel_index, cost)


_OPTIONS_DOC = """
    Bounded by default: before anything is allocated, every layer's parameters, bytes and seconds are
    estimated (:func:`plan`, :func:`check_budget`).  A layer whose factors would exceed
    ``max_layer_params`` gets the largest expansion (in steps of 1/4, at least 1) that fits, listed in
    the report's ``"reduced"``, or is left dense, listed in ``"skipped"``; an expansion over
    ``max_params``, ``max_bytes`` or ``max_seconds`` raises :class:`ExpansionError` naming the largest
    layer, the estimates, and options that fit.  ``None`` lifts a limit.

    Args:
        expansion: width multiplier ``r`` of the hidden widths (``>= 1``) of layers with a spatial kernel.
        pointwise_expansion: ``r`` of layers without one (1x1 convs, linears, products; default
            :data:`POINTWISE_EXPANSION`, 1: their factors are then square and the middle one the
            weight's size); ``None``: ``expansion``.
        mode: ``"online"`` composes the factors into one kernel inside the graph (about the compact
            model's cost); ``"chain"`` runs one op per factor.  Same function, same gradients.
        depth: number of linear ops in each chain (``>= 2``).
        include: qualified-name globs or module types to expand; functional calls match the module type
            of their functional (``F.conv2d`` ~ ``nn.Conv2d``, products ~ ``nn.Linear``) and the name of
            their weight.
        exclude: qualified-name globs or module types to leave alone, matched as for ``include``.
        seed: seed of the random orthonormal outer factors; each layer draws from a generator on its
            weight's device seeded by ``seed`` and its name, so its factors do not depend on which other
            layers are expanded.  Reproducible per device type (CPU and CUDA draw different numbers).
        init: ``"orthogonal"`` (outer factors orthonormal, the kernel factor carries the layer's
            scale) or ``"balanced"`` (every factor rescaled to the same spectral norm).
        max_params: refuse an expansion whose model would have more parameters than this.
        max_bytes: refuse an expansion estimated to add more memory than this (default 4 GiB): the
            factors, a copy of the model's parameters, and the largest layer's float64 temporaries.
        max_seconds: refuse an expansion estimated to take longer than this (default 60) for ``expand``
            and a later ``fuse``, at speeds measured on the model's device (once per process).
        max_layer_params: the per-layer limit of the wide-layer policy above (default ``2**26``).
"""


def expand(gm: fx.GraphModule, *, expansion: float = 4, pointwise_expansion: float | None = POINTWISE_EXPANSION,
           mode: str = "online", depth: int = 3,
           include: Patterns = None, exclude: Patterns = None, seed: int = 0, init: str = "orthogonal",
           max_params: int | None = None, max_bytes: int | None = MAX_BYTES, max_seconds: float | None = MAX_SECONDS,
           max_layer_params: int | None = MAX_LAYER_PARAMS) -> fx.GraphModule:
    """Rewrite every expandable conv/linear of ``gm`` into a chain whose product is its weight.

    The graph back end of the expansion driver (:func:`expand_modules` is the other; both decide
    what is expanded, and report it, with the same code).  Returns a new GraphModule (``gm`` is not
    changed) whose outputs equal ``gm``'s up to rounding, with a report in ``meta["fxlop"]["expand"]``.
    Matched: ``nn.Conv1d/2d/3d``, ``nn.Linear`` and Hugging Face ``Conv1D`` modules; ``F.conv1d/2d/3d``
    and ``F.linear`` calls (and their ``aten`` ops in ``torch.export`` graphs) whose weight is a
    ``get_attr`` parameter; and ``addmm``/``mm``/``matmul`` products ``x @ W`` of a 2-D parameter
    ``W`` or of its transpose, rewritten as ``linear`` (and fused back to a parameter of ``W``'s shape).
    Other nodes that read a weight (``w.dtype``, ``w * mask``) read the composed weight instead
    (``<layer>.read``); in-place writes to it keep the layer dense.  Everything else conv-like is left
    as it is and reported with the reason.  Layers that are already expanded are left alone, so
    expanding twice changes nothing more.  Factors are created on each weight's device and in its
    dtype (see :func:`passes.linalg.factorize`).
    """
    return _expand(gm, _GRAPH, expansion=expansion, pointwise_expansion=pointwise_expansion, mode=mode, depth=depth,
                   include=include, exclude=exclude, seed=seed, init=init, max_params=max_params, max_bytes=max_bytes,
                   max_seconds=max_seconds, max_layer_params=max_layer_params)


def expand_modules(model: nn.Module, *, expansion: float = 4,
                   pointwise_expansion: float | None = POINTWISE_EXPANSION, mode: str = "online", depth: int = 3,
                   include: Patterns = None, exclude: Patterns = None, seed: int = 0, init: str = "orthogonal",
                   max_params: int | None = None, max_bytes: int | None = MAX_BYTES,
                   max_seconds: float | None = MAX_SECONDS,
                   max_layer_params: int | None = MAX_LAYER_PARAMS, in_place: bool = False) -> nn.Module:
    """Expand without a graph: a copy of ``model`` whose expandable conv/linear modules are replaced by
    :class:`ExpandedLayer` modules that run the chain themselves (control flow in ``forward`` is fine).

    ``in_place=True`` swaps the layers of ``model`` itself and returns it (no copy, so no copy's memory
    either): every expanded layer is built before the first one is swapped in, so an error (or an
    interrupt) during the expansion leaves ``model`` as it was, never half expanded.  An expanded layer
    keeps the replaced module's ``bias`` parameter itself; the replaced modules are no longer part of
    ``model`` (hold on to them to put them back, as ``fxlop.overparameterized`` does).

    The module-swap back end of the expansion driver: the same selection, limits and report as
    :func:`expand` (in the copy's ``fxlop_report["expand"]``), from the module tree instead of a
    graph.  Shared modules stay shared (every name that refers to one gets the same layer).  What a
    module tree cannot show: functional calls and products on parameters are not expanded, and
    neither found nor reported; reads of an expanded layer's ``weight`` by other code are answered
    with the composed weight (:attr:`ExpandedLayer.weight`), writes to it raise.
    """
    return _expand(model, _MODULES, expansion=expansion, pointwise_expansion=pointwise_expansion, mode=mode,
                   depth=depth, include=include, exclude=exclude,
                   seed=seed, init=init, max_params=max_params, max_bytes=max_bytes, max_seconds=max_seconds,
                   max_layer_params=max_layer_params, in_place=in_place)


expand.__doc__ += _OPTIONS_DOC
expand_modules.__doc__ += _OPTIONS_DOC


@dataclasses.dataclass(frozen=True)
class _BackEnd:
    """How one kind of model is expanded: find its layers, put an expanded layer in place, finish."""
    traced: bool
    find: Callable[[nn.Module], tuple[dict[str, _Layer], dict[str, str]]]
    replace: Callable[[nn.Module, _Layer, ExpandedLayer, str], None]
    finish: Callable[[nn.Module, dict], nn.Module]


def _expand(model: nn.Module, back_end: _BackEnd, *, expansion, pointwise_expansion, mode, depth, include, exclude,
            seed, init, max_params, max_bytes, max_seconds, max_layer_params, in_place: bool = False) -> nn.Module:
    """The expansion driver: what to expand and why, the limits, the copy, the report; ``back_end``
    does the rest.  ``in_place`` (module swap only): no copy; all layers are swapped in at the end."""
    if in_place and back_end.traced:
        raise ExpansionError("only the module swap (expand_modules) expands in place")
    limits = dict(max_params=max_params, max_bytes=max_bytes, max_seconds=max_seconds,
                  max_layer_params=max_layer_params)
    check_options(expansion, mode, depth, max_params, init, max_bytes=max_bytes, max_seconds=max_seconds,
                  max_layer_params=max_layer_params, pointwise_expansion=pointwise_expansion, seed=seed)
    seed = int(seed)  # a NumPy integer too; the report stays plain JSON
    began = time.perf_counter()
    layers, skipped = back_end.find(model)
    chosen = _choose(model, layers, skipped, include, exclude)

    # everything is planned and checked on the caller's model, before the copy and any factor exists
    planned, reduced, dense = plan([(layer.name, layer.linear_weight, layer.groups) for layer in chosen],
                                   expansion=expansion, pointwise_expansion=pointwise_expansion, depth=depth,
                                   max_layer_params=max_layer_params)
    skipped.update(dense)
    params_before = parameter_count(model)
    estimate = check_budget(planned, params_before=params_before,
                            copy_bytes=0 if in_place else parameter_bytes(model),
                            expansion=expansion, pointwise_expansion=pointwise_expansion, depth=depth, **limits)

    if not in_place:
        model = copy.deepcopy(model)
        layers, _ = back_end.find(model)
    expanded, built = [], []
    for item in progress(planned, "expand", [p.seconds[0] for p in planned], [p.name for p in planned]):
        layer = layers[item.name]
        container = new_expanded_layer(layer.weight, item.groups, item.shapes, item.kernel_index,
                                       linalg.generator(seed, layer.weight.device, item.name),
                                       balanced=init == "balanced", module=layer.module, mode=mode,
                                       in_graph=back_end.traced, transposed_weight=layer.transposed)
        if in_place:
            built.append((layer, container))
        else:
            back_end.replace(model, layer, container, mode)
        expanded.append({
            "name": layer.name, "type": layer.module_type.__name__,
            "origin": "module" if layer.module is not None else "functional",
            "weight_shape": list(layer.weight.shape), "transposed_weight": layer.transposed,
            "expansion": item.expansion, "factor_shapes": [list(s) for s in item.shapes],
            "call_sites": len(layer.sites) if back_end.traced else None, "weight_reads": layer.reads,
            "params_before": layer.weight.numel(), "params_after": sum(f.numel() for f in container.factors),
        })
    if in_place:
        _swap_all(model, built, mode)
    return back_end.finish(model, {
        "expansion": expansion, "pointwise_expansion": pointwise_expansion, "mode": mode, "depth": depth, "seed": seed,
        "init": init, "traced": back_end.traced,
        "expanded": expanded, "reduced": reduced, "skipped": [{"name": n, "reason": r} for n, r in skipped.items()],
        "params_before": params_before, "params_after": parameter_count(model),
        "limits": limits, "estimate": estimate, "seconds": time.perf_counter() - began,
    })


def _choose(model: nn.Module, layers: dict[str, _Layer], skipped: dict[str, str], include: Patterns,
            exclude: Patterns) -> list[_Layer]:
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
        warnings.warn(f"fxlop.expand: include={shown!r} matches none of the {len(layers)} expandable layers "
                      f"({', '.join(list(layers)[:5])}{', ...' if len(layers) > 5 else ''}): nothing is expanded",
                      stacklevel=5)
    return chosen


def plan(layers: Sequence[tuple[str, torch.Tensor, int]], *, expansion: float, depth: int,
         max_layer_params: int | None, cache: dict | None = None,
         pointwise_expansion: float | None = None) -> tuple[list[Planned], list[dict], dict[str, str]]:
    """The factor shapes and costs of ``(name, weight, groups)`` layers (weights ``(out, in, k...)``) at
    their :func:`layer_expansion`, with the wide-layer policy.

    Returns the layers to expand; the ``"reduced"`` report (layers given a lower expansion because
    their factors would exceed ``max_layer_params`` parameters); and the layers left dense, with the
    reason.  Shapes only: nothing is allocated.  Shared by the traced and the module-swap expansion.
    ``cache`` keeps the plans of layers at expansions already seen (for repeated planning).
    """
    cache = {} if cache is None else cache

    def at(name, weight, groups, expansion) -> Planned:
        if (name, expansion) not in cache:
            cache[name, expansion] = Planned.of(name, weight, groups, expansion, depth)
        return cache[name, expansion]

    planned, reduced, dense = [], [], {}
    for name, weight, groups in layers:
        own = layer_expansion(weight.shape, expansion, pointwise_expansion)
        item = at(name, weight, groups, own)
        if max_layer_params is None or item.cost.params <= max_layer_params:
            planned.append(item)
            continue
        # the largest expansion in steps of 1/4 whose factors fit (parameters grow with the expansion);
        # the steps are counted, not listed, so that a huge expansion costs a few dozen plans, not memory
        steps = _QuarterSteps(1, own, descending=True)
        low, high = 0, len(steps)
        while low < high:
            middle = (low + high) // 2
            if at(name, weight, groups, steps[middle]).cost.params <= max_layer_params:
                high = middle
            else:
                low = middle + 1
        if low == len(steps):
            at_one = at(name, weight, groups, 1).cost.params
            dense[name] = (f"its factors would hold {item.cost.params:,} parameters at expansion {own:g} and "
                           f"{at_one:,} even at expansion 1, over max_layer_params={max_layer_params:,}: left dense "
                           f"(raise max_layer_params, or None, to expand it)")
            continue
        lower = at(name, weight, groups, steps[low])
        planned.append(lower)
        reduced.append({"name": name, "expansion": lower.expansion, "params": lower.cost.params,
                        "reason": f"its factors would hold {item.cost.params:,} parameters at expansion "
                                  f"{own:g}, over max_layer_params={max_layer_params:,}; "
                                  f"{lower.cost.params:,} at expansion {lower.expansion:g}"})
    if reduced or dense:
        warnings.warn(f"fxlop.expand: {len(reduced)} layers expanded at a lower expansion and {len(dense)} left dense "
                      f"because their factors would exceed max_layer_params={max_layer_params:,} parameters: "
                      f"{', '.join([r['name'] for r in reduced] + list(dense))[:300]} "
                      f"(see the report's 'reduced' and 'skipped')", stacklevel=3)
    return planned, reduced, dense


def estimate(planned: Sequence[Planned], *, params_before: int, copy_bytes: int) -> dict:
    """Estimated parameters, bytes and seconds of expanding (and later fusing) the planned layers;
    fills in each layer's ``seconds``.  Devices are timed once per process when the work is large."""
    work = sum(p.cost.draw_macs + p.cost.combine + p.cost.fuse for p in planned)
    factor_bytes, temporary = 0, 0
    for item in planned:
        item.seconds = linalg.rates_for(item.weight.device, item.weight.dtype, work).seconds(item.cost)
        if item.weight.device.type != "meta":
            factor_bytes += item.cost.params * item.weight.element_size()
            temporary = max(temporary, item.cost.temporary)
    devices = sorted({str(p.weight.device) for p in planned})
    return {"params": params_before + sum(p.cost.params - p.weight.numel() for p in planned),
            "bytes": copy_bytes + factor_bytes + temporary if factor_bytes else 0,
            "seconds": {"expand": sum(p.seconds[0] for p in planned), "fuse": sum(p.seconds[1] for p in planned)},
            "device": ", ".join(devices) or None}


def check_budget(planned: Sequence[Planned], *, params_before: int, copy_bytes: int, expansion: float, depth: int,
                 pointwise_expansion: float | None = None, max_params: int | None = None, max_bytes: int | None = MAX_BYTES,
                 max_seconds: float | None = MAX_SECONDS, max_layer_params: int | None = MAX_LAYER_PARAMS) -> dict:
    """The :func:`estimate` of ``planned``, or :class:`ExpansionError` if it is over a limit.

    The error names the violated limits, the estimates, the largest layer with its own, and options
    that fit: a lower expansion for the largest layers (``max_layer_params``), a lower expansion for
    all, excluding the costliest layers, or a larger limit.
    """
    found = estimate(planned, params_before=params_before, copy_bytes=copy_bytes)
    limits = dict(max_params=max_params, max_bytes=max_bytes, max_seconds=max_seconds)
    over = _over(found, limits)
    if not over:
        return found
    seconds = found["seconds"]["expand"] + found["seconds"]["fuse"]
    clauses = {
        "max_params": lambda: f"would give {found['params']:,} parameters, over max_params={max_params:,} "
                              f"(now {params_before:,})",
        "max_bytes": lambda: f"would need an estimated {_gb(found['bytes'])} of memory (float64 temporaries "
                             f"included), over max_bytes={max_bytes:,} ({_gb(max_bytes)})",
        "max_seconds": lambda: f"would take an estimated {_s(seconds)} on {found['device']} (expand "
                               f"{_s(found['seconds']['expand'])}, fuse {_s(found['seconds']['fuse'])}), "
                               f"{SECONDS_MARGIN:g}x of which (the estimate's margin of error) is over "
                               f"max_seconds={max_seconds:g}",
    }
    key = {"max_params": lambda p: p.cost.params, "max_bytes": lambda p: p.cost.params * p.weight.element_size()
           + p.cost.temporary, "max_seconds": lambda p: sum(p.seconds)}[over[0]]
    largest = max(planned, key=key)
    widths = f"expansion {expansion:g}" + (f" (pointwise layers {pointwise_expansion:g})"
                                            if pointwise_expansion not in (None, expansion) else "")
    message = (f"expanding {len(planned)} layers at {widths} {' and '.join(clauses[k]() for k in over)}. "
               f"In all: {found['params']:,} parameters, {_gb(found['bytes'])}, {_s(seconds)}. The largest expanded "
               f"layer is '{largest.name}' (weight {tuple(largest.weight.shape)}: {largest.cost.params:,} parameters, "
               f"{_gb(largest.cost.params * largest.weight.element_size() + largest.cost.temporary)}, "
               f"{_s(sum(largest.seconds))}). Options that fit: "
               + "; ".join(_options(planned, found, limits, params_before, copy_bytes, expansion, depth,
                                    max_layer_params, key, pointwise_expansion)) + ".")
    raise ExpansionError(message)


def _over(found: dict, limits: dict) -> list[str]:
    value = {"max_params": found["params"], "max_bytes": found["bytes"],
             "max_seconds": SECONDS_MARGIN * (found["seconds"]["expand"] + found["seconds"]["fuse"])}
    return [k for k, limit in limits.items() if limit is not None and value[k] > limit]


def _options(planned, found, limits, params_before, copy_bytes, expansion, depth, max_layer_params, key,
             pointwise_expansion=None) -> list[str]:
    """Settings under which the same call fits the limits (found by arithmetic on shapes and the measured
    speeds, nothing allocated)."""
    layers = [(p.name, p.weight, p.groups) for p in planned]
    cache = {}

    def replan(**settings) -> tuple[dict | None, list, dict]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            items, reduced, dense = plan(layers, depth=depth, cache=cache, pointwise_expansion=pointwise_expansion,
                                         **settings)
        result = estimate(items, params_before=params_before, copy_bytes=copy_bytes)
        return (None if _over(result, limits) else result), reduced, dense

    def describe(result) -> str:
        return f"{result['params']:,} parameters, {_gb(result['bytes'])}, {_s(sum(result['seconds'].values()))}"

    def largest_fitting(candidates, settings):
        """The last candidate (they are in increasing cost) whose plan fits, with its replan, or None."""
        low, high, best = 0, len(candidates) - 1, None
        while low <= high:
            middle = (low + high) // 2
            result = replan(**settings(candidates[middle]))
            if result[0] is not None:
                best, low = (candidates[middle], result), middle + 1
            else:
                high = middle - 1
        return best

    options = []
    # a lower expansion for the largest layers only: the largest per-layer limit that fits and still
    # expands every layer (at least at expansion 1); the candidates are the layers' sizes at quarter steps
    steps = _QuarterSteps(1, expansion, limit=_MAX_CANDIDATES)
    sizes = {(p.name, step): Planned.of(p.name, p.weight, p.groups, step, depth) for p in planned for step in steps}
    cache.update(sizes)
    floor = max((sizes[p.name, 1.0].cost.params for p in planned), default=0) if steps else math.inf
    top = max(p.cost.params for p in planned)
    caps = sorted({item.cost.params for item in sizes.values() if floor <= item.cost.params < top})
    found_cap = largest_fitting(caps, lambda cap: dict(expansion=expansion, max_layer_params=cap))
    if found_cap is not None:
        cap, (result, reduced, _) = found_cap
        options.append(f"max_layer_params={cap:,} (a lower expansion for the {len(reduced)} largest layers: "
                       f"{describe(result)})")
    # a lower expansion for every layer
    found_step = largest_fitting(steps, lambda step: dict(expansion=step, max_layer_params=max_layer_params))
    if found_step is not None:
        options.append(f"expansion={found_step[0]:g} ({describe(found_step[1][0])})")
    # excluding the costliest layers, with running totals
    ranked = sorted(planned, key=key, reverse=True)
    params, seconds = found["params"], sum(found["seconds"].values())
    factor_bytes = sum(p.cost.params * p.weight.element_size() for p in planned if p.weight.device.type != "meta")
    temporary = [0] * (len(ranked) + 1)  # temporary[k]: the largest temporaries once the first k are excluded
    for index in reversed(range(len(ranked))):
        own = ranked[index].cost.temporary if ranked[index].weight.device.type != "meta" else 0
        temporary[index] = max(temporary[index + 1], own)
    for count, item in enumerate(ranked, start=1):
        params -= item.cost.params - item.weight.numel()
        seconds -= sum(item.seconds)
        if item.weight.device.type != "meta":
            factor_bytes -= item.cost.params * item.weight.element_size()
        result = {"params": params, "bytes": copy_bytes + factor_bytes + temporary[count] if factor_bytes else 0,
                  "seconds": {"expand": seconds, "fuse": 0.0}}
        if not _over(result, limits):
            names = [p.name for p in ranked[:count]]
            shown = ", ".join(repr(n) for n in names[:5]) + (f", ... ({count} layers)" if count > 5 else "")
            options.append(f"exclude=[{shown}] ({describe(result)})")
            break
    needed = {"max_params": f"max_params={found['params']:,}", "max_bytes": f"max_bytes={math.ceil(found['bytes'] * 1.1):,}",
              "max_seconds": f"max_seconds={_round_up(1.1 * SECONDS_MARGIN * sum(found['seconds'].values())):g}"}
    options.append(" and ".join(needed[k] for k in _over(found, limits)) + " (or None: no limit)")
    return options


#: at most this many expansions are tried as options of a refusal (a huge ``expansion`` would otherwise
#: plan every quarter step up to it)
_MAX_CANDIDATES = 64


class _QuarterSteps(Sequence):
    """The expansions ``low, low + 1/4, ...`` below ``high`` (``descending``: from the largest down),
    without listing them: indexing is arithmetic, so a huge ``high`` costs no memory.  ``limit``
    keeps at most that many of them, spread evenly (the first and the last kept), for searches whose
    every candidate is planned."""

    def __init__(self, low: float, high: float, *, descending: bool = False, limit: int | None = None):
        self.first = math.ceil(4 * low)
        self.count = max(0, math.ceil(4 * high) - self.first)
        self.descending = descending
        self.stride = 1.0 if limit is None or self.count <= limit else (self.count - 1) / (limit - 1)
        self.length = self.count if self.stride == 1.0 else limit

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.length))]
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(index)
        offset = round(index * self.stride)
        return ((self.first + self.count - 1 - offset) if self.descending else (self.first + offset)) / 4


def _gb(count: int | None) -> str:
    return "no limit" if count is None else f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def _round_up(value: float) -> float:
    """``value`` rounded up to two significant digits."""
    scale = 10 ** (math.floor(math.log10(value)) - 1) if value > 0 else 1
    return float(f"{math.ceil(value / scale) * scale:.12g}")


def _s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s" if seconds >= 0.1 else f"{seconds:.3f} s"


def progress(items: Sequence, desc: str, seconds: Sequence[float], names: Sequence[str]):
    """Iterate over ``items`` with a progress bar weighted by their estimated ``seconds``, showing each
    one's name; on a terminal, and only once the pass has taken two seconds."""
    total = sum(seconds)
    with tqdm(total=total, desc=f"{desc} (est. {total:.0f} s)", unit="s", delay=2.0, leave=False, disable=None,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]") as bar:
        for item, weight, name in zip(items, seconds, names):
            bar.set_postfix_str(name, refresh=False)
            yield item
            bar.update(weight)


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters off the meta device."""
    return sum(p.numel() * p.element_size() for p in module.parameters()
               if p.device.type != "meta" and not isinstance(p, nn.parameter.UninitializedParameter))


def check_options(expansion, mode, depth, max_params, init, *, max_bytes=None, max_seconds=None,
                  max_layer_params=None, pointwise_expansion=None, seed=0) -> None:
    """Refuse, before any work, settings the expansion cannot honour.

    Args:
        expansion: the width multiplier r of layers with a spatial kernel, a finite number >= 1.
        mode: one of :data:`MODES` (``"online"``, ``"chain"``).
        depth: the linear ops per expanded layer, an integer >= 2.
        max_params: the most parameters the expanded model may hold, or None.
        init: one of :data:`INITS`.
        max_bytes: the most bytes the expanded parameters may take, or None.
        max_seconds: the most seconds the expansion may plan for, or None.
        max_layer_params: the most parameters one expanded layer may hold, or None.
        pointwise_expansion: r of 1x1 convs and linears, a finite number >= 1, or None.
        seed: the seed of the factors, an integer (``int`` or a NumPy integer; not a bool).

    Raises:
        ExpansionError: a setting of the wrong type or out of its range, naming it.
    """
    if not isinstance(seed, Integral) or isinstance(seed, bool):
        raise ExpansionError(f"seed must be an integer, got {seed!r}")
    if init not in INITS:
        raise ExpansionError(f"init must be one of {INITS}, got {init!r}")
    if mode not in MODES:
        raise ExpansionError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(expansion, Real) or isinstance(expansion, bool) or not 1 <= expansion <= MAX_EXPANSION:
        raise ExpansionError(f"expansion must be a finite number >= 1, got {expansion!r} (at most {MAX_EXPANSION})")
    if pointwise_expansion is not None and (not isinstance(pointwise_expansion, Real)
                                            or isinstance(pointwise_expansion, bool)
                                            or not 1 <= pointwise_expansion <= MAX_EXPANSION):
        raise ExpansionError(f"pointwise_expansion must be a finite number >= 1 or None, got {pointwise_expansion!r} "
                             f"(at most {MAX_EXPANSION})")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 2:
        raise ExpansionError(f"depth must be an integer >= 2, got {depth!r}")
    for name, value in (("max_params", max_params), ("max_bytes", max_bytes), ("max_layer_params", max_layer_params)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ExpansionError(f"{name} must be a non-negative integer or None, got {value!r}")
    if max_seconds is not None and (not isinstance(max_seconds, Real) or isinstance(max_seconds, bool)
                                    or not max_seconds > 0):
        raise ExpansionError(f"max_seconds must be a positive number or None, got {max_seconds!r}")


def _find_layers(gm: fx.GraphModule) -> tuple[dict[str, _Layer], dict[str, str]]:
    """Graph discovery: the candidate layers by qualified name, with their call sites in graph order
    and what only the graph shows against them, and the conv/linear-like nodes and modules that are
    not candidates at all, with the reason."""
    modules = dict(gm.named_modules())
    aliases: dict[int, list[str]] = {}
    for name, module in gm.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    layers: dict[str, _Layer] = {}
    skipped: dict[str, str] = {}
    broken: set[str] = set()  # layers with one call site that cannot be rewritten
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, ExpandedLayer):
                skipped[node.target] = "already expanded"
            elif module_function(module) is not None:
                layer = layers.setdefault(node.target, _Layer(node.target, type(module), module.weight, module,
                                                              aliases[id(module)]))
                layer.sites.append(_Site(node, call_of_module(module)))
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
            layer = layers.setdefault(weight.target, _Layer(weight.target, FUNCTION_MODULES[node.target], param, None,
                                                            [weight.target]))
            layer.sites.append(_Site(node, call))
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


def _find_product(gm: fx.GraphModule, node: fx.Node, modules: dict, layers: dict[str, _Layer],
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
    layer = layers.setdefault(target, _Layer(target, nn.Linear, param, None, [target], transposed=product.transposed))
    layer.sites.append(_Site(node, Call(linear_like(node.target)), product))


def _find_modules(model: nn.Module) -> tuple[dict[str, _Layer], dict[str, str]]:
    """Module-tree discovery: the expandable conv/linear modules with every name each goes by, and the
    modules that look like layers but are not expandable (or already expanded), with the reason."""
    names: dict[int, list[str]] = {}
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
        found[id(module)] = module
    layers: dict[str, _Layer] = {}
    skipped: dict[str, str] = {}
    inside_expanded = tuple(f"{n}." for key, m in found.items() if isinstance(m, ExpandedLayer) for n in names[key])
    for key, module in found.items():
        name = names[key][0]
        if isinstance(module, ExpandedLayer):
            skipped[name] = "already expanded"
        elif name.startswith(inside_expanded):
            continue
        elif module_function(module) is not None:
            layers[name] = _Layer(name, type(module), module.weight, module, names[key])
        elif isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter):
            skipped[name] = weight_problem(module.weight)
        elif _looks_linear(module):
            skipped[name] = _not_expandable(module)
    return layers, skipped


def _graph_problem(gm: fx.GraphModule, layer: _Layer, called: set[str]) -> tuple[str | None, int]:
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


def _rewrite(gm: fx.GraphModule, layer: _Layer, container: ExpandedLayer, mode: str) -> None:
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


def _finish_graph(gm: fx.GraphModule, report: dict) -> fx.GraphModule:
    gm.graph.lint()
    gm.recompile()
    gm.meta.setdefault("fxlop", {})["expand"] = report
    return gm


def _swap(model: nn.Module, layer: _Layer, container: ExpandedLayer, mode: str) -> None:
    """Module back end: put ``container`` at every name of the module (it runs the chain itself)."""
    for name in layer.names:
        set_attr(model, name, container)


def _swap_all(model: nn.Module, built: list[tuple[_Layer, ExpandedLayer]], mode: str) -> None:
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


def _finish_modules(model: nn.Module, report: dict) -> nn.Module:
    model.fxlop_report = {"expand": report}
    return model


_GRAPH = _BackEnd(traced=True, find=_find_layers, replace=_rewrite, finish=_finish_graph)
_MODULES = _BackEnd(traced=False, find=_find_modules, replace=_swap, finish=_finish_modules)
