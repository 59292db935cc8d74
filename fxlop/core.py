"""``fxlop.expand`` and ``fxlop.fuse``: the passes, with tracing and BatchNorm folding around them."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from . import passes
from .errors import ExpansionError, FusionError, FxlopError, raises_fxlop_errors
from .passes import (MAX_BYTES, MAX_LAYER_PARAMS, MAX_SECONDS, POINTWISE_EXPANSION, ExpandedLayer, ExpandOptions,
                     Patterns, Report, is_expandable, report_of, set_attr)


@raises_fxlop_errors
def expand(model: nn.Module | torch.export.ExportedProgram, *, expansion: float = 4.0,
           pointwise_expansion: float | None = POINTWISE_EXPANSION, mode: str = "online", depth: int = 3,
           init: str = "orthogonal", seed: int = 0, include: Patterns = None, exclude: Patterns = None,
           leaf_modules: Patterns = None, trace: bool = True, max_params: int | None = None,
           max_bytes: int | None = MAX_BYTES, max_seconds: float | None = MAX_SECONDS,
           max_layer_params: int | None = MAX_LAYER_PARAMS) -> nn.Module:
    """Linearly over-parameterize every conv/linear of ``model``; its outputs do not change.

    ``model`` is an ``nn.Module`` (traced with ``torch.fx`` symbolic tracing), a GraphModule (a
    ``torch.export`` program's ``.module()`` included) or a ``torch.export.ExportedProgram`` (expanded
    as its ``.module()``, which shares the program's parameters); it is never modified.  Each
    conv/linear (modules, functional calls on parameters, ``x @ W`` products) becomes a chain
    ``1x1 -> k x k -> 1x1`` (or three linears) whose product is the original weight, composed exactly
    in float64 (:func:`passes.expand`).  Shared modules stay shared, tied weights stay as they are,
    and the factors are created on each weight's device and in its dtype.  Before anything is
    allocated the expansion is planned against the limits; :func:`report` gives what was expanded,
    reduced or skipped and why.

    Tracing failures raise :class:`TraceError` (naming the module, how to make it a leaf,
    ``trace=False`` and ``torch.export``) rather than falling back by themselves: the two ways give
    different kinds of model, and the caller chooses.

    Args:
        model: the (pruned) model.
        expansion: width multiplier of layers with a spatial kernel (``>= 1``).
        pointwise_expansion: of 1x1 convs, linears and products; ``None``: ``expansion``.
        mode: ``"online"`` (one composed kernel) or ``"chain"`` (one op per factor).
        depth: linear ops per expanded layer (``>= 2``).
        init: ``"orthogonal"`` or ``"balanced"``.
        seed: seed of the factors.
        include: qualified-name globs or module types to expand.
        exclude: globs or module types to leave alone.
        leaf_modules: globs or module types not to trace into.
        trace: ``False`` keeps ``model`` an ordinary module: a copy whose conv/linear modules are
            :class:`passes.ExpandedLayer` modules (control flow is fine, Hugging Face models included;
            functional convs and products are not expanded then).
        max_params: the most parameters the expanded model may hold.
        max_bytes: the most memory the expansion may add (estimated).
        max_seconds: the longest the expansion and its fuse may take (estimated).
        max_layer_params: the most parameters one layer's factors may hold (each option is a field
            of :class:`fxlop.ExpandOptions`, which says more; ``None`` lifts a limit).

    Returns:
        A GraphModule (also for an ExportedProgram: fine-tune it, :func:`fuse` it, and
        ``torch.export.export`` the fused model for a program again); with ``trace=False`` an
        ``nn.Module`` copy of ``model``.

    Raises:
        TraceError: the model cannot be traced (names the module and how to make it a leaf).
        ExpansionError: invalid options, or an expansion over a limit (naming the largest layer, the
            estimates and options that fit).
    """
    options = ExpandOptions(expansion=expansion, pointwise_expansion=pointwise_expansion, mode=mode, depth=depth,
                            init=init, seed=seed, include=include, exclude=exclude, leaf_modules=leaf_modules,
                            trace=trace, max_params=max_params, max_bytes=max_bytes, max_seconds=max_seconds,
                            max_layer_params=max_layer_params)
    return expand_with(model, options)


@raises_fxlop_errors
def expand_with(model: nn.Module | torch.export.ExportedProgram, options: ExpandOptions) -> nn.Module:
    """:func:`expand` with its options as one :class:`fxlop.ExpandOptions` (what ``fxlop run`` holds).

    Args:
        model: as for :func:`expand`.
        options: the expansion.

    Returns:
        As :func:`expand`.

    Raises:
        TraceError, ExpansionError: as :func:`expand`.
    """
    if not isinstance(options, ExpandOptions):
        raise ExpansionError(f"options must be a fxlop.ExpandOptions, got {type(options).__name__}")
    if isinstance(model, torch.export.ExportedProgram):
        if not options.trace:
            raise ExpansionError("an ExportedProgram is already a graph: expand it with trace=True (the "
                                 "default), or pass the nn.Module it was exported from with trace=False")
        model = model.module()
    elif not isinstance(model, nn.Module):
        raise FxlopError(f"expand takes an nn.Module, a GraphModule or a torch.export.ExportedProgram, "
                         f"got {type(model).__name__}")
    if not options.trace:
        return passes.expand_modules(model, options)
    gm = model if isinstance(model, fx.GraphModule) else passes.trace(model, leaf_modules=options.leaf_modules)
    return passes.batch_compositions(passes.expand(gm, options), inplace=True)


@raises_fxlop_errors
def report(model: nn.Module) -> Report:
    """What :func:`expand`, :func:`fuse` and BatchNorm folding did to ``model``.

    The report survives ``torch.save``/``torch.load`` of the model (and pickling): a GraphModule's
    ``meta`` does not, so it is also kept in the model's ``fxlop_report`` attribute.

    Args:
        model: a model that :func:`expand` or :func:`fuse` returned (or any other module).

    Returns:
        A :class:`passes.Report`: its ``expand`` (an :class:`passes.ExpandReport`), ``batch``, ``fuse``
        and ``fold_bn`` sections, each None where that pass did not run on ``model``.
        :func:`passes.as_dict` turns it into JSON data.
    """
    return report_of(model)


@raises_fxlop_errors
def fuse(gm: nn.Module, *, fold_bn: bool = False, example_inputs=None) -> nn.Module:
    """Fuse every expanded layer of ``gm`` back into one conv/linear under its original name.

    The result has exactly the modules, ``state_dict`` keys and shapes of the model before
    :func:`expand`, with weights composed from the (trained) factors in float64.  A graph
    is fused by :func:`passes.fuse`, a module tree (``expand(..., trace=False)``) by
    :func:`passes.fuse_modules`; a model with nothing to fuse gives an equivalent copy; ``gm`` is not
    modified.

    Args:
        gm: a model :func:`expand` returned (trained or not).
        fold_bn: also fold ``conv -> BatchNorm`` pairs (eval statistics) for deployment; this drops
            the BatchNorm modules.  ``linear -> BatchNorm1d`` pairs need ``example_inputs`` to show
            that the linear's output is 2-D.
        example_inputs: inputs used only to propagate shapes for ``fold_bn``.

    Returns:
        The fused model; :func:`report` gives its ``fuse`` (and ``fold_bn``) section.

    Raises:
        FusionError: an expanded subgraph was edited so that it no longer is a chain of its factors.
    """
    if not isinstance(gm, nn.Module):
        raise FxlopError(f"fuse expects a model returned by fxlop.expand, got {type(gm).__name__}")
    if not isinstance(gm, fx.GraphModule):
        if fold_bn:
            raise FxlopError("fold_bn needs a traced model: fuse a GraphModule (fxlop.expand with trace=True)")
        return passes.fuse_modules(gm)
    fused = passes.fuse(gm)
    return passes.fold_batchnorm(fused, example_inputs) if fold_bn else fused


class overparameterized:
    """Expand the conv/linear layers of ``model`` *in place* for a ``with`` block; fuse them back on exit.

    For code that holds the model object (a trainer, callbacks, your own loop)::

        with fxlop.overparameterized(model, expansion=4) as model:
            optimizer = torch.optim.SGD(fxlop.param_groups(model, lr=0.05, weight_decay=5e-4), momentum=0.9)
            ...  # train `model`
        # `model` is compact again, with the trained weights

    On entry every expandable layer of ``model`` is swapped for a :class:`passes.ExpandedLayer` (the
    module swap of ``fxlop.expand(model, trace=False)``, with the same options, selection, limits and
    report, ``fxlop.report(model)``); all are built before the first is swapped in, so a refusal or an
    error leaves ``model`` as it was.  ``as`` gives ``model`` itself.  Inside the block its
    ``state_dict`` has the keys and shapes of ``fxlop.expand(model, <same options>)`` (either way of
    expanding), and at the start the same values: the factors are seeded by ``seed`` and each layer's
    name.  On exit each layer's factors are composed in float64 and written into the *original*
    module object, which is put back: ``model`` ends with its own modules, module types,
    ``state_dict`` keys and shapes, and the trained weights (each weight ``Parameter`` is the one it
    had before the block, on the device and in the dtype of the factors).

    Exceptions: leaving the block by an exception (``KeyboardInterrupt`` included) fuses back all the
    same, so ``model`` stays compact and usable with the weights training had reached; the exception
    then propagates (it is never suppressed).  If fusing itself fails (a factor edited to another
    shape, out of memory), every layer gets back the weight it had before the block and
    :class:`FusionError` is raised.  The model is never left half expanded.

    Optimizers: one built inside the block (on the factors) is stale after it: its parameters are
    no longer part of ``model``; build a new one for the compact model.  One built before the block
    holds the original weights, which are not part of ``model`` inside it (they get no gradient and
    are not trained there) and hold the fused weights again after it.

    Not nested: a model that already holds expanded layers (from an enclosing block, a block on one
    of its submodules or parents, or ``fxlop.expand(..., trace=False)``) is refused with
    :class:`ExpansionError`, and so is entering the same block object twice; a block can be entered
    again after it exited (a fresh expansion).

    The options (``expansion``, ``pointwise_expansion``, ``mode``, ``include``, ``exclude``, ``depth``,
    ``seed``, ``init``, ``max_params``, ``max_bytes``, ``max_seconds``, ``max_layer_params``) are those of
    :func:`expand`; they are checked here, before any work.

    Args:
        model: an ``nn.Module`` (not a layer itself: its layers are swapped inside it).

    Raises:
        ExpansionError: invalid options, an expansion over a limit, a model already expanded.
    """

    @raises_fxlop_errors
    def __init__(self, model: nn.Module, *, expansion: float = 4.0,
                 pointwise_expansion: float | None = POINTWISE_EXPANSION, mode: str = "online", depth: int = 3,
                 init: str = "orthogonal", seed: int = 0, include: Patterns = None, exclude: Patterns = None,
                 max_params: int | None = None, max_bytes: int | None = MAX_BYTES,
                 max_seconds: float | None = MAX_SECONDS, max_layer_params: int | None = MAX_LAYER_PARAMS):
        if not isinstance(model, nn.Module):
            raise FxlopError(f"overparameterized expands an nn.Module in place, got {type(model).__name__}")
        if is_expandable(model):
            raise ExpansionError(f"overparameterized swaps the layers inside a model; the model itself is a "
                                 f"{type(model).__name__}: wrap it in a module (nn.Sequential(layer))")
        self.model = model
        #: the expansion (checked here, before any work); a module swap, so never traced
        self.options = ExpandOptions(expansion=expansion, pointwise_expansion=pointwise_expansion, mode=mode,
                                     depth=depth, init=init, seed=seed, include=include, exclude=exclude,
                                     trace=False, max_params=max_params, max_bytes=max_bytes,
                                     max_seconds=max_seconds, max_layer_params=max_layer_params)
        # while active: (expanded layer, the module it replaced, the names it sits at)
        self._records: list[tuple[ExpandedLayer, nn.Module, list[str]]] | None = None
        self._report: tuple[bool, object] = (False, None)

    @raises_fxlop_errors
    def __enter__(self) -> nn.Module:
        model = self.model
        if self._records is not None:
            raise ExpansionError("this fxlop.overparameterized block is already active: it cannot be "
                                 "entered twice")
        present = [n for n, m in model.named_modules() if isinstance(m, ExpandedLayer)]
        if present:
            raise ExpansionError(
                f"{type(model).__name__} already holds expanded layers ({', '.join(present[:3])}"
                f"{', ...' if len(present) > 3 else ''}): fxlop.overparameterized does not nest; exit the enclosing "
                f"block first (or fuse a model expanded with trace=False: fxlop.fuse)")
        before = dict(model.named_modules(remove_duplicate=False))
        self._report = ("fxlop_report" in model.__dict__, model.__dict__.get("fxlop_report"))
        passes.expand_modules(model, self.options, in_place=True)
        try:
            records: dict[int, tuple[ExpandedLayer, nn.Module, list[str]]] = {}
            for name, module in model.named_modules(remove_duplicate=False):
                if isinstance(module, ExpandedLayer):
                    records.setdefault(id(module), (module, before[name], []))[2].append(name)
            self._records = list(records.values())
        except BaseException:
            for name, module in before.items():
                if name and isinstance(_submodule(model, name), ExpandedLayer):
                    set_attr(model, name, module)
            self._restore_report()
            raise
        return model

    @raises_fxlop_errors
    def __exit__(self, exc_type, exc, traceback) -> bool:
        records, self._records = self._records, None
        try:
            self._fuse_back(records or [])
        finally:
            self._restore_report()
        return False  # an exception from the block propagates

    def _fuse_back(self, records) -> None:
        """The one way back (:func:`passes.fuse_modules`), into the original modules; if it fails, every
        layer gets its original module back with the weight it had before the block."""
        model = self.model
        try:
            passes.fuse_modules(model, in_place=True, into={layer: original for layer, original, _ in records})
        except Exception as error:
            for layer, original, names in records:
                for name in names:
                    if _submodule(model, name) is layer:
                        set_attr(model, name, original)
            raise FusionError(f"fxlop.overparameterized could not fuse the expanded layers back ({error}); "
                              f"the model has its layers back with their weights from before the block, "
                              f"the training inside it is lost") from error

    def _restore_report(self) -> None:
        had, previous = self._report
        if had:
            self.model.fxlop_report = previous
        else:
            self.model.__dict__.pop("fxlop_report", None)


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
