"""The expansion pass: every matched conv/linear becomes a chain of linear ops with the same product."""
from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
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


#: Default limits of :func:`expand`.  A layer whose factors would hold more than ``MAX_LAYER_PARAMS``
#: parameters (256 MiB in fp32) is expanded at the largest lower expansion that fits, in steps of 1/4,
#: or left dense; an expansion estimated to add more than ``MAX_BYTES`` of memory (float64
#: temporaries included) or to take more than ``MAX_SECONDS`` (expand and the fuse it will need, on the
#: model's device) is refused before anything is allocated.
MAX_LAYER_PARAMS = 2 ** 26
MAX_BYTES = 2 ** 32
MAX_SECONDS = 60.0


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


def expand(gm: fx.GraphModule, *, expansion: float = 4, mode: str = "online", depth: int = 3,
           include: Patterns = None, exclude: Patterns = None, seed: int = 0, init: str = "orthogonal",
           max_params: int | None = None, max_bytes: int | None = MAX_BYTES, max_seconds: float | None = MAX_SECONDS,
           max_layer_params: int | None = MAX_LAYER_PARAMS) -> fx.GraphModule:
    """Rewrite every expandable conv/linear of ``gm`` into a chain whose product is its weight.

    Returns a new GraphModule (``gm`` is not changed) whose outputs equal ``gm``'s up to rounding,
    with a report in ``meta["fxlop"]["expand"]``.  Matched: ``nn.Conv1d/2d/3d`` and ``nn.Linear``
    modules and ``F.conv1d/2d/3d``/``F.linear`` calls whose weight is a ``get_attr`` parameter.
    Everything else conv-like is left as it is and reported with the reason.  Layers that are
    already expanded are left alone, so expanding twice changes nothing more.  Factors are created on
    each weight's device and in its dtype (see :func:`passes.linalg.factorize`).

    Bounded by default: before anything is allocated, every layer's parameters, bytes and seconds are
    estimated (:func:`plan`, :func:`check_budget`).  A layer whose factors would exceed
    ``max_layer_params`` gets the largest expansion (in steps of 1/4, at least 1) that fits, listed in
    the report's ``"reduced"``, or is left dense, listed in ``"skipped"``; an expansion over
    ``max_params``, ``max_bytes`` or ``max_seconds`` raises :class:`ExpansionError` naming the largest
    layer, the estimates, and options that fit.  ``None`` lifts a limit.

    Args:
        expansion: width multiplier ``r`` of the hidden widths (``>= 1``).
        mode: ``"online"`` composes the factors into one kernel inside the graph (about the compact
            model's cost); ``"chain"`` runs one op per factor.  Same function, same gradients.
        depth: number of linear ops in each chain (``>= 2``).
        include, exclude: qualified-name globs or module types; functional calls match the module type
            of their functional (``F.conv2d`` ~ ``nn.Conv2d``) and the name of their weight.
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
    check_options(expansion, mode, depth, max_params, init, max_bytes=max_bytes, max_seconds=max_seconds,
                  max_layer_params=max_layer_params)
    began = time.perf_counter()
    layers, skipped = _find_layers(gm)
    is_included, is_excluded = selector(include), selector(exclude)
    parameter_names: dict[int, list[str]] = {}
    for name, param in gm.named_parameters(remove_duplicate=False):
        parameter_names.setdefault(id(param), []).append(name)
    chosen = []
    for layer in layers.values():
        if is_included is not None and not is_included(layer.name, layer.module_type):
            skipped[layer.name] = "not matched by include"
        elif is_excluded is not None and is_excluded(layer.name, layer.module_type):
            skipped[layer.name] = "matched by exclude"
        else:
            reason = _unexpandable(gm, layer, parameter_names)
            if reason is None:
                chosen.append(layer)
            else:
                skipped[layer.name] = reason

    # everything is planned and checked on the caller's graph, before the copy and any factor exists
    limits = dict(max_params=max_params, max_bytes=max_bytes, max_seconds=max_seconds,
                  max_layer_params=max_layer_params)
    planned, reduced, dense = plan([(layer.name, layer.weight, layer.sites[0].call.groups) for layer in chosen],
                                   expansion=expansion, depth=depth, max_layer_params=max_layer_params)
    skipped.update(dense)
    params_before = parameter_count(gm)
    estimate = check_budget(planned, params_before=params_before, copy_bytes=parameter_bytes(gm),
                            expansion=expansion, depth=depth, **limits)

    gm = copy.deepcopy(gm)
    layers, _ = _find_layers(gm)
    expanded = []
    for item in progress(planned, "expand", [p.seconds[0] for p in planned], [p.name for p in planned]):
        layer = layers[item.name]
        container = new_expanded_layer(layer.weight, item.groups, item.shapes, item.kernel_index,
                                       linalg.generator(seed, layer.weight.device, item.name),
                                       balanced=init == "balanced", module=layer.module, mode=mode, in_graph=True)
        set_attr(gm, layer.name, container)
        _rewrite_sites(gm.graph, layer, container, mode)
        expanded.append({
            "name": layer.name, "type": layer.module_type.__name__,
            "origin": "module" if layer.module is not None else "functional",
            "weight_shape": list(layer.weight.shape), "expansion": item.expansion,
            "factor_shapes": [list(s) for s in item.shapes],
            "call_sites": len(layer.sites), "params_before": layer.weight.numel(),
            "params_after": sum(f.numel() for f in container.factors),
        })
    gm.graph.lint()
    gm.recompile()
    gm.meta.setdefault("fxlop", {})["expand"] = {
        "expansion": expansion, "mode": mode, "depth": depth, "seed": seed, "init": init,
        "expanded": expanded, "reduced": reduced, "skipped": [{"name": n, "reason": r} for n, r in skipped.items()],
        "params_before": params_before, "params_after": parameter_count(gm),
        "limits": limits, "estimate": estimate, "seconds": time.perf_counter() - began,
    }
    return gm


def plan(layers: Sequence[tuple[str, torch.Tensor, int]], *, expansion: float, depth: int,
         max_layer_params: int | None, cache: dict | None = None) -> tuple[list[Planned], list[dict], dict[str, str]]:
    """The factor shapes and costs of ``(name, weight, groups)`` layers, with the wide-layer policy.

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
        item = at(name, weight, groups, expansion)
        if max_layer_params is None or item.cost.params <= max_layer_params:
            planned.append(item)
            continue
        # the largest expansion in steps of 1/4 whose factors fit (parameters grow with the expansion)
        steps = [s / 4 for s in range(math.ceil(4 * expansion) - 1, 3, -1)]
        low, high = 0, len(steps)
        while low < high:
            middle = (low + high) // 2
            if at(name, weight, groups, steps[middle]).cost.params <= max_layer_params:
                high = middle
            else:
                low = middle + 1
        if low == len(steps):
            at_one = at(name, weight, groups, 1).cost.params
            dense[name] = (f"its factors would hold {item.cost.params:,} parameters at expansion {expansion:g} and "
                           f"{at_one:,} even at expansion 1, over max_layer_params={max_layer_params:,}: left dense "
                           f"(raise max_layer_params, or None, to expand it)")
            continue
        lower = at(name, weight, groups, steps[low])
        planned.append(lower)
        reduced.append({"name": name, "expansion": lower.expansion, "params": lower.cost.params,
                        "reason": f"its factors would hold {item.cost.params:,} parameters at expansion "
                                  f"{expansion:g}, over max_layer_params={max_layer_params:,}; "
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
                 max_params: int | None = None, max_bytes: int | None = MAX_BYTES,
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
                               f"{_s(found['seconds']['expand'])}, fuse {_s(found['seconds']['fuse'])}), over "
                               f"max_seconds={max_seconds:g}",
    }
    key = {"max_params": lambda p: p.cost.params, "max_bytes": lambda p: p.cost.params * p.weight.element_size()
           + p.cost.temporary, "max_seconds": lambda p: sum(p.seconds)}[over[0]]
    largest = max(planned, key=key)
    message = (f"expanding {len(planned)} layers at expansion {expansion:g} {' and '.join(clauses[k]() for k in over)}. "
               f"In all: {found['params']:,} parameters, {_gb(found['bytes'])}, {_s(seconds)}. The largest expanded "
               f"layer is '{largest.name}' (weight {tuple(largest.weight.shape)}: {largest.cost.params:,} parameters, "
               f"{_gb(largest.cost.params * largest.weight.element_size() + largest.cost.temporary)}, "
               f"{_s(sum(largest.seconds))}). Options that fit: "
               + "; ".join(_options(planned, found, limits, params_before, copy_bytes, expansion, depth,
                                    max_layer_params, key)) + ".")
    raise ExpansionError(message)


def _over(found: dict, limits: dict) -> list[str]:
    value = {"max_params": found["params"], "max_bytes": found["bytes"],
             "max_seconds": found["seconds"]["expand"] + found["seconds"]["fuse"]}
    return [k for k, limit in limits.items() if limit is not None and value[k] > limit]


def _options(planned, found, limits, params_before, copy_bytes, expansion, depth, max_layer_params, key) -> list[str]:
    """Settings under which the same call fits the limits (found by arithmetic on shapes and the measured
    speeds, nothing allocated)."""
    layers = [(p.name, p.weight, p.groups) for p in planned]
    cache = {}

    def replan(**settings) -> tuple[dict | None, list, dict]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            items, reduced, dense = plan(layers, depth=depth, cache=cache, **settings)
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
    steps = [step / 4 for step in range(4, math.ceil(4 * expansion))]
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
              "max_seconds": f"max_seconds={_round_up(1.25 * sum(found['seconds'].values())):g}"}
    options.append(" and ".join(needed[k] for k in _over(found, limits)) + " (or None: no limit)")
    return options


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
                  max_layer_params=None) -> None:
    """Raise ExpansionError for settings the expansion cannot honour."""
    if init not in INITS:
        raise ExpansionError(f"init must be one of {INITS}, got {init!r}")
    if mode not in MODES:
        raise ExpansionError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(expansion, Real) or isinstance(expansion, bool) or not 1 <= expansion < math.inf:
        raise ExpansionError(f"expansion must be a finite number >= 1, got {expansion!r}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 2:
        raise ExpansionError(f"depth must be an integer >= 2, got {depth!r}")
    for name, value in (("max_params", max_params), ("max_bytes", max_bytes), ("max_layer_params", max_layer_params)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ExpansionError(f"{name} must be a non-negative integer or None, got {value!r}")
    if max_seconds is not None and (not isinstance(max_seconds, Real) or isinstance(max_seconds, bool)
                                    or not max_seconds > 0):
        raise ExpansionError(f"max_seconds must be a positive number or None, got {max_seconds!r}")


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


def _unexpandable(gm: fx.GraphModule, layer: _Layer, parameter_names: dict[int, list[str]]) -> str | None:
    """Why ``layer`` cannot be expanded exactly, or None; ``parameter_names``: every name of each
    parameter of ``gm`` by ``id``."""
    weight = layer.weight
    problem = weight_problem(weight) if layer.module is None else module_problem(layer.module)
    if problem is not None:
        return problem
    groups = {site.call.groups for site in layer.sites}
    if len(groups) != 1:
        return f"call sites disagree on groups {sorted(groups)}"
    weight_name = layer.name if layer.module is None else f"{layer.name}.weight"
    aliases = [n for n in parameter_names.get(id(weight), []) if n != weight_name]
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

