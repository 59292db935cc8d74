"""``fxlop.expand`` and ``fxlop.fuse``: the passes, with tracing and BatchNorm folding around them."""
from __future__ import annotations

import copy
import time

import torch.fx as fx
import torch.nn as nn

import passes
from passes import linalg
from passes.expand import (MAX_BYTES, MAX_LAYER_PARAMS, MAX_SECONDS, check_budget, check_options, parameter_bytes, plan,
                           progress)
from passes.expanded import ExpandedLayer, module_problem, new_expanded_layer, parameter_count
from passes.graph import set_attr
from passes.ops import MODULE_FUNCTIONS, call_of_module
from passes.select import Patterns, selector


def expand(model: nn.Module, *, expansion: float = 4, mode: str = "online", include: Patterns = None,
           exclude: Patterns = None, depth: int = 3, seed: int = 0, init: str = "orthogonal",
           leaf_modules: Patterns = None, max_params: int | None = None, max_bytes: int | None = MAX_BYTES,
           max_seconds: float | None = MAX_SECONDS, max_layer_params: int | None = MAX_LAYER_PARAMS,
           trace: bool = True) -> nn.Module:
    """Linearly over-parameterize every conv/linear of ``model``; its outputs do not change.

    ``model`` is an ``nn.Module`` (traced with ``torch.fx`` symbolic tracing) or a GraphModule; it
    is never modified.  Each ``nn.Conv1d/2d/3d``/``nn.Linear`` (and each ``F.conv*``/``F.linear``
    whose weight is a parameter) becomes a chain ``1x1 -> k x k -> 1x1`` (or three linears) whose
    product is the original weight: orthonormal outer factors, the middle one solved exactly in
    float64.  Modules called at several places stay shared.  The factors are created on the device
    and in the dtype of each weight.

    Bounded time and memory: before anything is allocated, each layer's parameters, bytes (float64
    temporaries included) and seconds (at speeds measured once on the model's device) are estimated.
    Wide layers: a layer whose factors would hold more than ``max_layer_params`` parameters is expanded
    at the largest lower expansion that fits (steps of 1/4; ``report(gm)["expand"]["reduced"]``) or,
    if even expansion 1 does not fit, left dense (``["skipped"]``), with a warning.  Then the whole
    expansion is refused with :class:`ExpansionError` if it is over ``max_params``, ``max_bytes`` or
    ``max_seconds``; the message names the largest layer, the estimates and options that fit.  Pass
    ``None`` to lift a limit.

    Args:
        model: the (pruned) model.
        expansion: width multiplier of the hidden widths, ``>= 1``.
        mode: ``"online"`` (factors composed into one kernel in the graph; about the compact
            model's training cost) or ``"chain"`` (one op per factor, the paper's literal form).
        include, exclude: qualified-name globs (``"layer1.*"``) or module types to expand / to keep.
        depth: linear ops per chain, ``>= 2``.
        seed: seed of the random orthonormal factors.
        init: ``"orthogonal"`` or ``"balanced"`` (all factors at the same spectral norm).
        leaf_modules: globs or types of modules not to trace into (for data-dependent control flow).
        max_params: refuse an expansion that would give more parameters than this (default: no limit).
        max_bytes: refuse an expansion estimated to add more memory than this (default 4 GiB): the
            factors, a copy of the parameters, the largest layer's float64 temporaries.
        max_seconds: refuse an expansion estimated to take longer than this (default 60), expand and
            the fuse it will need, on the model's device.
        max_layer_params: the wide-layer limit above (default ``2**26``, 256 MiB of fp32 factors).
        trace: ``False`` keeps ``model`` an ordinary module (no tracing, so control flow is fine):
            a copy whose conv/linear modules are replaced by :class:`passes.ExpandedLayer` modules
            that run the chain themselves; ``timm.utils.reparameterize_model`` or :func:`fuse`
            turn them back.  Functional convs are not expanded then.

    Returns:
        A GraphModule (an ``nn.Module`` copy with ``trace=False``); :func:`report` gives what was
        expanded, what was skipped and why, and the parameter counts before and after.

    Raises:
        TraceError: the model cannot be traced (names the module and how to make it a leaf).
        ExpansionError: invalid options, or an expansion over a limit.
    """
    if not isinstance(model, nn.Module):
        raise passes.FxlopError(f"expand takes an nn.Module or a GraphModule, got {type(model).__name__}")
    limits = dict(max_params=max_params, max_bytes=max_bytes, max_seconds=max_seconds,
                  max_layer_params=max_layer_params)
    check_options(expansion, mode, depth, max_params, init, max_bytes=max_bytes, max_seconds=max_seconds,
                  max_layer_params=max_layer_params)
    if not trace:
        return _expand_modules(model, expansion=expansion, mode=mode, include=include, exclude=exclude, depth=depth,
                               seed=seed, init=init, **limits)
    gm = model if isinstance(model, fx.GraphModule) else passes.trace(model, leaf_modules=leaf_modules)
    return passes.expand(gm, expansion=expansion, mode=mode, depth=depth, include=include,
                         exclude=exclude, seed=seed, init=init, **limits)


def report(model: nn.Module) -> dict:
    """What :func:`expand`, :func:`fuse` and BatchNorm folding did to ``model`` (empty if nothing)."""
    if isinstance(model, fx.GraphModule):
        return model.meta.get("fxlop", {})
    return getattr(model, "fxlop_report", {})


def _expand_modules(model, *, expansion, mode, include, exclude, depth, seed, init, **limits) -> nn.Module:
    """Module-swap expansion: every expandable conv/linear module of a copy of ``model`` becomes an
    ExpandedLayer (shared modules stay shared: each name that refers to one gets the same layer).
    Planned and checked against the limits like the traced pass, before the copy is made."""
    check_options(expansion, mode, depth, limits["max_params"], init, max_bytes=limits["max_bytes"],
                  max_seconds=limits["max_seconds"], max_layer_params=limits["max_layer_params"])
    began = time.perf_counter()
    names = _module_names(model)
    is_included, is_excluded = selector(include), selector(exclude)
    weight_names = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        weight_names.setdefault(param, []).append(name)
    chosen, skipped = [], []
    for module, module_names in names.items():
        name = module_names[0]
        aliases = [n for n in weight_names[module.weight] if n.rpartition(".")[0] not in module_names]
        reason = module_problem(module) or (f"its weight is tied to '{aliases[0]}'" if aliases else None)
        if is_included is not None and not is_included(name, type(module)):
            reason = "not matched by include"
        elif is_excluded is not None and is_excluded(name, type(module)):
            reason = "matched by exclude"
        if reason is None:
            chosen.append(name)
        else:
            skipped.append({"name": name, "reason": reason})
    modules = {module_names[0]: module for module, module_names in names.items()}
    planned, reduced, dense = plan([(n, modules[n].weight, call_of_module(modules[n]).groups) for n in chosen],
                                   expansion=expansion, depth=depth, max_layer_params=limits["max_layer_params"])
    skipped += [{"name": n, "reason": r} for n, r in dense.items()]
    before = parameter_count(model)
    estimate = check_budget(planned, params_before=before, copy_bytes=parameter_bytes(model), expansion=expansion,
                            depth=depth, **limits)

    model = copy.deepcopy(model)
    names = {module_names[0]: module_names for module_names in _module_names(model).values()}
    expanded = []
    for item in progress(planned, "expand", [p.seconds[0] for p in planned], [p.name for p in planned]):
        module = model.get_submodule(item.name)
        layer = new_expanded_layer(module.weight, item.groups, item.shapes, item.kernel_index,
                                   linalg.generator(seed, module.weight.device, item.name),
                                   balanced=init == "balanced", module=module, mode=mode)
        for name in names[item.name]:
            set_attr(model, name, layer)
        expanded.append({"name": item.name, "type": type(module).__name__, "origin": "module",
                         "call_sites": None, "weight_shape": list(module.weight.shape), "expansion": item.expansion,
                         "factor_shapes": [list(s) for s in item.shapes], "params_before": module.weight.numel(),
                         "params_after": sum(f.numel() for f in layer.factors)})
    model.fxlop_report = {"expand": {"expansion": expansion, "mode": mode, "depth": depth, "seed": seed,
                                     "init": init, "traced": False, "expanded": expanded, "reduced": reduced,
                                     "skipped": skipped, "params_before": before,
                                     "params_after": parameter_count(model), "limits": limits,
                                     "estimate": estimate, "seconds": time.perf_counter() - began}}
    return model


def _module_names(model: nn.Module) -> dict[nn.Module, list[str]]:
    """Every expandable conv/linear module of ``model`` with all the names it goes by, in order."""
    names: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) in MODULE_FUNCTIONS:
            names.setdefault(module, []).append(name)
    return names


def fuse(gm: nn.Module, *, fold_bn: bool = False, example_inputs=None) -> nn.Module:
    """Fuse every expanded layer of ``gm`` back into one conv/linear under its original name.

    The result has exactly the modules, ``state_dict`` keys and shapes of the model before
    :func:`expand` (traced), with weights composed from the (trained) factors in float64.  A graph
    with nothing to fuse gives an equivalent copy; ``gm`` is not modified.

    Args:
        fold_bn: also fold ``conv -> BatchNorm`` pairs (eval statistics) for deployment; this drops
            the BatchNorm modules.  ``linear -> BatchNorm1d`` pairs need ``example_inputs`` to show
            that the linear's output is 2-D.
        example_inputs: inputs used only to propagate shapes for ``fold_bn``.

    Raises:
        FusionError: an expanded subgraph was edited so that it no longer is a chain of its factors.
    """
    if not isinstance(gm, nn.Module):
        raise passes.FxlopError(f"fuse expects a model returned by fxlop.expand, got {type(gm).__name__}")
    if not isinstance(gm, fx.GraphModule):
        if fold_bn:
            raise passes.FxlopError("fold_bn needs a traced model: fuse a GraphModule (fxlop.expand with trace=True)")
        return _fuse_modules(gm)
    fused = passes.fuse(gm)
    return passes.fold_batchnorm(fused, example_inputs) if fold_bn else fused


def _fuse_modules(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    fused = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, ExpandedLayer):
            if module not in fused:
                fused[module] = module.fuse()
            set_attr(model, name, fused[module])
    model.fxlop_report = {**getattr(model, "fxlop_report", {}),
                          "fuse": {"fused": [{"name": n} for n in dict.fromkeys(
                              n for n, m in model.named_modules() if m in fused.values())],
                                   "params": parameter_count(model)}}
    return model
