"""``fxlop.expand`` and ``fxlop.fuse``: the passes, with tracing and BatchNorm folding around them."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from . import passes
from .passes.expand import MAX_BYTES, MAX_LAYER_PARAMS, MAX_SECONDS, POINTWISE_EXPANSION, check_options
from .passes.expanded import ExpandedLayer, parameter_count
from .passes.graph import set_attr
from .passes.ops import module_function
from .passes.select import Patterns, selector


def expand(model: nn.Module | torch.export.ExportedProgram, *, expansion: float = 4,
           pointwise_expansion: float | None = POINTWISE_EXPANSION, mode: str = "online",
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
    original weight: orthonormal outer factors, the middle one solved exactly in float64.  Hidden
    widths are ``expansion`` times the layer's for layers with a spatial kernel and
    ``pointwise_expansion`` (1) times for 1x1 convs and linears, whose middle factor would otherwise
    grow as the square of it (see docs/results/speed.md).  Modules
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
        expansion: width multiplier of the hidden widths of layers with a spatial kernel, ``>= 1``.
        pointwise_expansion: width multiplier of 1x1 convs, linears and products (``>= 1``, default 1:
            square outer factors); ``None``: ``expansion``.
        mode: ``"online"`` (factors composed into one kernel in the graph, the kernels of layers
            with factors of the same shapes together: :func:`passes.batch_compositions`; about the
            compact model's training cost) or ``"chain"`` (one op per factor, the paper's literal form).
        include: qualified-name globs (``"layer1.*"``) or module types to expand.
        exclude: qualified-name globs or module types to keep as they are.
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
    options = dict(expansion=expansion, pointwise_expansion=pointwise_expansion, mode=mode, include=include,
                   exclude=exclude, depth=depth, seed=seed, init=init, max_params=max_params, max_bytes=max_bytes,
                   max_seconds=max_seconds, max_layer_params=max_layer_params)
    check_options(expansion, mode, depth, max_params, init, max_bytes=max_bytes, max_seconds=max_seconds,
                  max_layer_params=max_layer_params, pointwise_expansion=pointwise_expansion, seed=seed)
    for patterns in (include, exclude, leaf_modules):
        selector(patterns)  # a bad pattern is refused before any work
    if not trace:
        return passes.expand_modules(model, **options)
    gm = model if isinstance(model, fx.GraphModule) else passes.trace(model, leaf_modules=leaf_modules)
    return _keep_report(passes.batch_compositions(passes.expand(gm, **options), inplace=True), report(gm))


def report(model: nn.Module) -> dict:
    """What :func:`expand`, :func:`fuse` and BatchNorm folding did to ``model``.

    The report survives ``torch.save``/``torch.load`` of the model (and pickling): a GraphModule's
    ``meta`` does not, so it is also kept in the model's ``fxlop_report`` attribute.

    Args:
        model: a model that :func:`expand` or :func:`fuse` returned (or any other module).

    Returns:
        The report, a dict with a section per pass (``"expand"``, ``"fuse"``, ...); empty if no pass
        ran on ``model``.
    """
    if isinstance(model, fx.GraphModule) and model.meta.get("fxlop"):
        return model.meta["fxlop"]
    return getattr(model, "fxlop_report", {})


def _keep_report(gm: fx.GraphModule, earlier: dict) -> fx.GraphModule:
    """``gm``'s report with the sections of ``earlier`` it lacks (a loaded model's ``meta`` is empty), in
    ``meta["fxlop"]`` and, the same dict, in the ``fxlop_report`` attribute, which pickling keeps."""
    merged = {**earlier, **gm.meta.get("fxlop", {})}
    gm.meta["fxlop"] = merged
    gm.fxlop_report = merged
    return gm


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
    return _keep_report(passes.fold_batchnorm(fused, example_inputs) if fold_bn else fused, report(gm))


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

    def __init__(self, model: nn.Module, *, expansion: float = 4,
                 pointwise_expansion: float | None = POINTWISE_EXPANSION, mode: str = "online", include: Patterns = None,
                 exclude: Patterns = None, depth: int = 3, seed: int = 0, init: str = "orthogonal",
                 max_params: int | None = None, max_bytes: int | None = MAX_BYTES,
                 max_seconds: float | None = MAX_SECONDS, max_layer_params: int | None = MAX_LAYER_PARAMS):
        if not isinstance(model, nn.Module):
            raise passes.FxlopError(f"overparameterized expands an nn.Module in place, got {type(model).__name__}")
        if module_function(model) is not None:
            raise passes.ExpansionError(f"overparameterized swaps the layers inside a model; the model itself is a "
                                        f"{type(model).__name__}: wrap it in a module (nn.Sequential(layer))")
        check_options(expansion, mode, depth, max_params, init, max_bytes=max_bytes, max_seconds=max_seconds,
                      max_layer_params=max_layer_params, pointwise_expansion=pointwise_expansion, seed=seed)
        for patterns in (include, exclude):
            selector(patterns)
        self.model = model
        self.options = dict(expansion=expansion, pointwise_expansion=pointwise_expansion, mode=mode, include=include,
                            exclude=exclude, depth=depth, seed=seed,
                            init=init, max_params=max_params, max_bytes=max_bytes, max_seconds=max_seconds,
                            max_layer_params=max_layer_params)
        # while active: (expanded layer, the module it replaced, the names it sits at)
        self._records: list[tuple[ExpandedLayer, nn.Module, list[str]]] | None = None
        self._report: tuple[bool, object] = (False, None)

    def __enter__(self) -> nn.Module:
        model = self.model
        if self._records is not None:
            raise passes.ExpansionError("this fxlop.overparameterized block is already active: it cannot be "
                                        "entered twice")
        present = [n for n, m in model.named_modules() if isinstance(m, ExpandedLayer)]
        if present:
            raise passes.ExpansionError(
                f"{type(model).__name__} already holds expanded layers ({', '.join(present[:3])}"
                f"{', ...' if len(present) > 3 else ''}): fxlop.overparameterized does not nest; exit the enclosing "
                f"block first (or fuse a model expanded with trace=False: fxlop.fuse)")
        before = dict(model.named_modules(remove_duplicate=False))
        self._report = ("fxlop_report" in model.__dict__, model.__dict__.get("fxlop_report"))
        passes.expand_modules(model, in_place=True, **self.options)
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

    def __exit__(self, exc_type, exc, traceback) -> bool:
        records, self._records = self._records, None
        try:
            self._fuse_back(records or [])
        finally:
            self._restore_report()
        return False  # an exception from the block propagates

    def _fuse_back(self, records) -> None:
        model = self.model
        # the layers still where the block put them (code inside may have replaced some)
        records = [(layer, original, [n for n in names if _submodule(model, n) is layer])
                   for layer, original, names in records]
        records = [record for record in records if record[2]]
        try:  # every weight is composed before any module is put back
            weights = []
            with torch.no_grad():
                for layer, original, names in records:
                    weight = layer.fused_weight()
                    if weight.shape != original.weight.shape:
                        raise passes.FusionError(f"'{names[0]}' composes to a weight of shape {tuple(weight.shape)}, "
                                                 f"not {tuple(original.weight.shape)}")
                    weights.append(weight)
        except Exception as error:
            for layer, original, names in records:
                for name in names:
                    set_attr(model, name, original)
            raise passes.FusionError(f"fxlop.overparameterized could not fuse the expanded layers back ({error}); "
                                     f"the model has its layers back with their weights from before the block, "
                                     f"the training inside it is lost") from error
        for (layer, original, names), weight in zip(records, weights):
            original.weight.data = weight  # the same Parameter, now on the factors' device and dtype
            original.weight.grad = None
            if original.bias is not layer.bias:
                original.bias = layer.bias
            original.train(layer.training)
            for name in names:
                set_attr(model, name, original)

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
