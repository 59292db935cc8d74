"""``fxlop.expand`` and ``fxlop.fuse``: the passes, with tracing and BatchNorm folding around them."""
from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx
import torch.nn as nn

import passes
from passes import linalg
from passes.expand import check_budget, check_options
from passes.expanded import ExpandedLayer, module_problem, new_expanded_layer, parameter_count
from passes.graph import set_attr
from passes.ops import MODULE_FUNCTIONS, call_of_module
from passes.select import Patterns, selector


def expand(model: nn.Module, *, expansion: float = 4, mode: str = "online", include: Patterns = None,
           exclude: Patterns = None, depth: int = 3, seed: int = 0, init: str = "orthogonal",
           leaf_modules: Patterns = None, max_params: int | None = None, trace: bool = True) -> nn.Module:
    """Linearly over-parameterize every conv/linear of ``model``; its outputs do not change.

    ``model`` is an ``nn.Module`` (traced with ``torch.fx`` symbolic tracing) or a GraphModule; it
    is never modified.  Each ``nn.Conv1d/2d/3d``/``nn.Linear`` (and each ``F.conv*``/``F.linear``
    whose weight is a parameter) becomes a chain ``1x1 -> k x k -> 1x1`` (or three linears) whose
    product is the original weight: orthonormal outer factors, the middle one solved exactly in
    float64.  Modules called at several places stay shared.

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
        max_params: refuse an expansion that would give more parameters than this.
        trace: ``False`` keeps ``model`` an ordinary module (no tracing, so control flow is fine):
            a copy whose conv/linear modules are replaced by :class:`passes.ExpandedLayer` modules
            that run the chain themselves; ``timm.utils.reparameterize_model`` or :func:`fuse`
            turn them back.  Functional convs are not expanded then.

    Returns:
        A GraphModule (an ``nn.Module`` copy with ``trace=False``); :func:`report` gives what was
        expanded, what was skipped and why, and the parameter counts before and after.

    Raises:
        TraceError: the model cannot be traced (names the module and how to make it a leaf).
        ExpansionError: invalid options, or the ``max_params`` guard.
    """
    if not isinstance(model, nn.Module):
        raise passes.FxlopError(f"expand takes an nn.Module or a GraphModule, got {type(model).__name__}")
    if not trace:
        return _expand_modules(model, expansion=expansion, mode=mode, include=include, exclude=exclude, depth=depth,
                               seed=seed, init=init, max_params=max_params)
    gm = model if isinstance(model, fx.GraphModule) else passes.trace(model, leaf_modules=leaf_modules)
    return passes.expand(gm, expansion=expansion, mode=mode, depth=depth, include=include,
                         exclude=exclude, seed=seed, init=init, max_params=max_params)


def report(model: nn.Module) -> dict:
    """What :func:`expand`, :func:`fuse` and BatchNorm folding did to ``model`` (empty if nothing)."""
    if isinstance(model, fx.GraphModule):
        return model.meta.get("fxlop", {})
    return getattr(model, "fxlop_report", {})


def _expand_modules(model, *, expansion, mode, include, exclude, depth, seed, init, max_params) -> nn.Module:
    """Module-swap expansion: every expandable conv/linear module of a copy of ``model`` becomes an
    ExpandedLayer (shared modules stay shared: each name that refers to one gets the same layer)."""
    check_options(expansion, mode, depth, max_params, init)
    model = copy.deepcopy(model)
    names: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) in MODULE_FUNCTIONS:
            names.setdefault(module, []).append(name)
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
            chosen.append(module)
        else:
            skipped.append({"name": name, "reason": reason})
    plans = {m: linalg.chain_shapes(m.weight.shape, call_of_module(m).groups, expansion, depth) for m in chosen}
    before = parameter_count(model)
    counts = {names[m][0]: sum(math.prod(s) for s in plans[m][0]) for m in chosen}
    check_budget(max_params, before, before + sum(counts[names[m][0]] - m.weight.numel() for m in chosen), counts)
    generator = torch.Generator().manual_seed(seed)
    expanded = []
    for module in chosen:
        shapes, kernel_index = plans[module]
        layer = new_expanded_layer(module.weight, call_of_module(module).groups, shapes, kernel_index, generator,
                                   balanced=init == "balanced", module=module, mode=mode)
        for name in names[module]:
            set_attr(model, name, layer)
        expanded.append({"name": names[module][0], "type": type(module).__name__, "origin": "module",
                         "call_sites": None, "weight_shape": list(module.weight.shape),
                         "factor_shapes": [list(s) for s in shapes], "params_before": module.weight.numel(),
                         "params_after": sum(f.numel() for f in layer.factors)})
    model.fxlop_report = {"expand": {"expansion": expansion, "mode": mode, "depth": depth, "seed": seed,
                                     "init": init, "traced": False, "expanded": expanded, "skipped": skipped,
                                     "params_before": before, "params_after": parameter_count(model)}}
    return model


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
