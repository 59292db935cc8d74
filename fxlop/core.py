"""``fxlop.expand`` and ``fxlop.fuse``: the passes, with tracing and BatchNorm folding around them."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

import passes
from passes.expand import MAX_BYTES, MAX_LAYER_PARAMS, MAX_SECONDS, check_options
from passes.expanded import ExpandedLayer, parameter_count
from passes.graph import set_attr
from passes.select import Patterns, selector


def expand(model: nn.Module | torch.export.ExportedProgram, *, expansion: float = 4, mode: str = "online",
           include: Patterns = None, exclude: Patterns = None, depth: int = 3, seed: int = 0, init: str = "orthogonal",
           leaf_modules: Patterns = None, max_params: int | None = None, max_bytes: int | None = MAX_BYTES,
           max_seconds: float | None = MAX_SECONDS, max_layer_params: int | None = MAX_LAYER_PARAMS,
           trace: bool = True) -> nn.Module:
    """Linearly over-parameterize every conv/linear of ``model``; its outputs do not change.

    ``model`` is an ``nn.Module`` (traced with ``torch.fx`` symbolic tracing), a GraphModule (a
    ``torch.export`` program's ``.module()`` included) or a ``torch.export.ExportedProgram`` (expanded
    as its ``.module()``, which shares the program's parameters); it is never modified.  Each
    ``nn.Conv1d/2d/3d``/``nn.Linear``/Hugging Face ``Conv1D`` (and each ``F.conv*``/``F.linear`` whose
    weight is a parameter, and each ``addmm``/``mm``/``matmul`` product ``x @ W`` on a 2-D parameter
    or its transpose) becomes a chain ``1x1 -> k x k -> 1x1`` (or three linears) whose product is the
    original weight: orthonormal outer factors, the middle one solved exactly in float64.  Modules
    called at several places stay shared; tied weights (one parameter under two names, such as GPT-2's
    ``lm_head`` and its token embedding) stay as they are.  The factors are created on the device and
    in the dtype of each weight.  One driver decides, for both ways of expanding (a graph, or
    ``trace=False``), what is expanded and why; :func:`report` gives its decisions.

    Bounded time and memory: before anything is allocated, each layer's parameters, bytes (float64
    temporaries included) and seconds (at speeds measured once on the model's device) are estimated.
    Wide layers: a layer whose factors would hold more than ``max_layer_params`` parameters is expanded
    at the largest lower expansion that fits (steps of 1/4; ``report(gm)["expand"]["reduced"]``) or,
    if even expansion 1 does not fit, left dense (``["skipped"]``), with a warning.  Then the whole
    expansion is refused with :class:`ExpansionError` if it is over ``max_params``, ``max_bytes`` or
    ``max_seconds``; the message names the largest layer, the estimates and options that fit.  Pass
    ``None`` to lift a limit.

    When symbolic tracing fails, ``expand`` raises :class:`TraceError` (naming the module, how to make
    it a leaf, ``trace=False`` and ``torch.export``) rather than falling back to ``trace=False`` by
    itself: the two give different kinds of model (a GraphModule, or a copy of the module), and
    what comes next differs (``fuse(fold_bn=True)`` and ``distiller`` need a graph); the caller
    chooses.

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
        trace: ``False`` keeps ``model`` an ordinary module (no tracing, so control flow is fine,
            Hugging Face models included): a copy whose conv/linear modules are replaced by
            :class:`passes.ExpandedLayer` modules that run the chain themselves and still answer
            ``weight``, ``bias`` and the constructor attributes; ``timm.utils.reparameterize_model``
            or :func:`fuse` turn them back.  Functional convs and products are not expanded then.

    Returns:
        A GraphModule (also for an ExportedProgram: fine-tune it, :func:`fuse` it, and
        ``torch.export.export`` the fused model for a program again); with ``trace=False`` an
        ``nn.Module`` copy of ``model``.  :func:`report` gives what was expanded, what was skipped
        and why, and the parameter counts before and after.

    Raises:
        TraceError: the model cannot be traced (names the module and how to make it a leaf).
        ExpansionError: invalid options, or an expansion over a limit.
    """
    if not isinstance(trace, bool):
        raise passes.ExpansionError(f"trace must be True or False, got {trace!r}")
    if isinstance(model, torch.export.ExportedProgram):
        if not trace:
            raise passes.ExpansionError("an ExportedProgram is already a graph: expand it with trace=True (the "
                                        "default), or pass the nn.Module it was exported from with trace=False")
        model = model.module()
    elif not isinstance(model, nn.Module):
        raise passes.FxlopError(f"expand takes an nn.Module, a GraphModule or a torch.export.ExportedProgram, "
                                f"got {type(model).__name__}")
    options = dict(expansion=expansion, mode=mode, include=include, exclude=exclude, depth=depth, seed=seed,
                   init=init, max_params=max_params, max_bytes=max_bytes, max_seconds=max_seconds,
                   max_layer_params=max_layer_params)
    check_options(expansion, mode, depth, max_params, init, max_bytes=max_bytes, max_seconds=max_seconds,
                  max_layer_params=max_layer_params)
    for patterns in (include, exclude, leaf_modules):
        selector(patterns)  # a bad pattern is refused before any work
    if not trace:
        return passes.expand_modules(model, **options)
    gm = model if isinstance(model, fx.GraphModule) else passes.trace(model, leaf_modules=leaf_modules)
    return passes.expand(gm, **options)


def report(model: nn.Module) -> dict:
    """What :func:`expand`, :func:`fuse` and BatchNorm folding did to ``model`` (empty if nothing)."""
    if isinstance(model, fx.GraphModule):
        return model.meta.get("fxlop", {})
    return getattr(model, "fxlop_report", {})


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
