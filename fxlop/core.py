"""``fxlop.expand`` and ``fxlop.fuse``: the passes, with tracing and BatchNorm folding around them."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

import passes
from passes.select import Patterns


def expand(model: nn.Module, *, expansion: float = 4, mode: str = "online", include: Patterns = None,
           exclude: Patterns = None, depth: int = 3, seed: int = 0, init: str = "orthogonal",
           leaf_modules: Patterns = None, max_params: int | None = None) -> fx.GraphModule:
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

    Returns:
        A GraphModule; ``gm.meta["fxlop"]["expand"]`` reports what was expanded, what was skipped
        and why, and the parameter counts before and after.

    Raises:
        TraceError: the model cannot be traced (names the module and how to make it a leaf).
        ExpansionError: invalid options, or the ``max_params`` guard.
    """
    gm = model if isinstance(model, fx.GraphModule) else passes.trace(model, leaf_modules=leaf_modules)
    return passes.expand(gm, expansion=expansion, mode=mode, depth=depth, include=include,
                         exclude=exclude, seed=seed, init=init, max_params=max_params)


def fuse(gm: fx.GraphModule, *, fold_bn: bool = False, example_inputs=None) -> fx.GraphModule:
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
    if not isinstance(gm, fx.GraphModule):
        raise passes.FxlopError(f"fuse expects the GraphModule returned by fxlop.expand, got {type(gm).__name__}")
    fused = passes.fuse(gm)
    return passes.fold_batchnorm(fused, example_inputs) if fold_bn else fused
