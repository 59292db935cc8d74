"""The budget of an expansion: each layer's factor shapes at the expansion it gets (the wide-layer
policy), the estimated parameters, bytes and seconds, and, when a limit is over, the settings that
fit, found by arithmetic on shapes and measured speeds (:mod:`passes.cost`) before anything is allocated.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn

from . import cost as cost_model, linalg
from .caller import warn_caller
from .errors import ExpansionError
from .options import ExpandOptions


#: the seconds estimate errs both ways (short on the largest models, long on small ones, where the
#: per-layer overhead dominates; docs/results/speed.md): a call is refused once SECONDS_MARGIN times
#: its estimate is over ``max_seconds``, so that what is accepted finishes in time
SECONDS_MARGIN = 1.5


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
    cost: cost_model.Cost
    seconds: tuple[float, float] = (0.0, 0.0)  # estimated: factorize, fuse

    @classmethod
    def of(cls, name: str, weight: torch.Tensor, groups: int, expansion: float, depth: int) -> Planned:
        shapes, kernel_index = linalg.chain_shapes(weight.shape, groups, expansion, depth)
        cost = cost_model.factorize_cost(weight.shape, groups, shapes, kernel_index, weight.dtype, weight.device)
        return cls(name, weight, groups, expansion, shapes, kernel_index, cost)


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
        warn_caller(f"expand: {len(reduced)} layers expanded at a lower expansion and {len(dense)} left dense "
                    f"because their factors would exceed max_layer_params={max_layer_params:,} parameters: "
                    f"{', '.join([r['name'] for r in reduced] + list(dense))[:300]} "
                    f"(see the report's 'reduced' and 'skipped')")
    return planned, reduced, dense


def estimate(planned: Sequence[Planned], *, params_before: int, copy_bytes: int) -> dict:
    """Estimated parameters, bytes and seconds of expanding (and later fusing) the planned layers;
    fills in each layer's ``seconds``.  Devices are timed once per process when the work is large."""
    work = sum(p.cost.draw_macs + p.cost.combine + p.cost.fuse for p in planned)
    factor_bytes, temporary = 0, 0
    for item in planned:
        item.seconds = cost_model.rates_for(item.weight.device, item.weight.dtype, work).seconds(item.cost)
        if item.weight.device.type != "meta":
            factor_bytes += item.cost.params * item.weight.element_size()
            temporary = max(temporary, item.cost.temporary)
    devices = sorted({str(p.weight.device) for p in planned})
    return {"params": params_before + sum(p.cost.params - p.weight.numel() for p in planned),
            "bytes": copy_bytes + factor_bytes + temporary if factor_bytes else 0,
            "seconds": {"expand": sum(p.seconds[0] for p in planned), "fuse": sum(p.seconds[1] for p in planned)},
            "device": ", ".join(devices) or None}


def check_budget(planned: Sequence[Planned], *, params_before: int, copy_bytes: int,
                 options: ExpandOptions) -> dict:
    """The :func:`estimate` of ``planned``, or :class:`ExpansionError` if it is over a limit of ``options``.

    The error names the violated limits, the estimates, the largest layer with its own, and options
    that fit: a lower expansion for the largest layers (``max_layer_params``), a lower expansion for
    all, excluding the costliest layers, or a larger limit.
    """
    expansion, pointwise_expansion, depth = options.expansion, options.pointwise_expansion, options.depth
    max_params, max_bytes, max_seconds = options.max_params, options.max_bytes, options.max_seconds
    max_layer_params = options.max_layer_params
    found = estimate(planned, params_before=params_before, copy_bytes=copy_bytes)
    limits = dict(max_params=max_params, max_bytes=max_bytes, max_seconds=max_seconds)
    over = _over(found, limits)
    if not over:
        return found
    if not planned:  # every layer left dense, and the model alone is over max_params: no expansion can help
        raise ExpansionError(f"max_params={max_params:,} is below the {params_before:,} parameters the model has "
                             f"before any expansion: raise it, or pass max_params=None")
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


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters off the meta device."""
    return sum(p.numel() * p.element_size() for p in module.parameters()
               if p.device.type != "meta" and not isinstance(p, nn.parameter.UninitializedParameter))
