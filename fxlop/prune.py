"""Structured pruning through torch-pruning, with the facts a user needs afterwards."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from .errors import FxlopError
from .passes import warn_caller

__all__ = ["prune", "prune_steps", "PruneResult", "PruneError", "IMPORTANCES"]

IMPORTANCES = ("l1", "l2", "taylor", "lamp", "fpgm", "random")


class PruneError(FxlopError):
    """Pruning settings that cannot be honoured, or pruning that would change the model's outputs."""


@dataclasses.dataclass
class PruneResult:
    """A pruned copy of a model and what pruning did to it.

    ``widths_before``/``widths_after`` map the qualified name of every conv/linear layer to its
    output width (``out_channels``/``out_features``). ``unpruned`` lists the layers that should
    have shrunk but kept their width (see :func:`prune`); ``ignored`` the layers kept on purpose.
    MACs are counted by ``torch_pruning.utils.count_ops_and_params`` on the example inputs.
    """

    model: nn.Module
    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    unpruned: list[str]
    ignored: list[str] = dataclasses.field(default_factory=list)


def prune(model: nn.Module, example_inputs, *, ratio: float, importance: str = "l2", global_pruning: bool = False,
          ignored_layers: Iterable[nn.Module | str] | None = None, iterative_steps: int = 1,
          round_to: int | None = None, data: Iterable | None = None,
          loss_fn: Callable | None = None) -> PruneResult:
    """Prune the channels of a copy of ``model`` (``model`` itself is never changed) with torch-pruning.

    Args:
        example_inputs: what ``model`` is called with (a tensor, or a tuple/dict of them), used
            to trace the layer dependencies and to count MACs.
        ratio: the share of channels to remove, in (0, 1). torch-pruning keeps
            ``floor(C * (1 - ratio))`` of a layer's ``C`` channels (per layer, or across layers
            with ``global_pruning``) in ``iterative_steps`` steps.
        importance: ``l1``/``l2`` (group magnitude), ``taylor`` (first-order Taylor; needs
            ``data``, batches of ``(x, y)``, whose ``loss_fn`` gradients are accumulated before
            each step; cross-entropy by default), ``lamp``, ``fpgm`` or ``random``.
        ignored_layers: modules or qualified names to keep at full width, in addition to the
            classifier (the last ``nn.Linear``, or the last conv of a model without one), which is
            always kept because pruning it would change the number of classes.
        round_to: keep channel counts multiples of this.

    torch-pruning silently leaves a group unpruned when ``floor(C * (1 - ratio))`` would be 0
    channels (e.g. ResNet-20's 16-wide stage at ``ratio`` 0.95). Such layers, and others that kept
    their width although the ratio asked them to shrink, are listed in ``PruneResult.unpruned``
    and warned about.  To fine-tune between the steps, use :func:`prune_steps`.

    Raises:
        PruneError: bad settings, or a pruned model whose output shapes differ from the original's.
    """
    for result in prune_steps(model, example_inputs, ratio=ratio, steps=iterative_steps, importance=importance,
                              global_pruning=global_pruning, ignored_layers=ignored_layers, round_to=round_to,
                              data=data, loss_fn=loss_fn):
        pass
    return result


def prune_steps(model: nn.Module, example_inputs, *, ratio: float, steps: int, importance: str = "l2",
                global_pruning: bool = False, ignored_layers: Iterable[nn.Module | str] | None = None,
                round_to: int | None = None, data: Iterable | None = None,
                loss_fn: Callable | None = None) -> Iterator[PruneResult]:
    """:func:`prune` in ``steps`` steps of torch-pruning's iterative schedule, yielding after each.

    Step ``k`` prunes the copy to ``k / steps`` of ``ratio`` of the original widths, so the last step
    gives exactly the widths of a one-shot :func:`prune`.  Every result holds the same model object:
    between steps the caller may change its weights (fine-tune a copy, then
    ``result.model.load_state_dict(...)``; a fused LOP model's state_dict fits) and the next step
    ranks channels by the new weights.  Do not replace its modules: torch-pruning holds them.
    Counts and widths compare with the original model; unpruned layers are warned about at the end.
    """
    importance_fn = _check_settings(ratio, importance, steps, round_to, data)
    was_training = model.training
    ignored_names = _ignored_names(model, ignored_layers)
    # eval: BatchNorm statistics must not move during tracing, MAC counting or Taylor's passes
    model = copy.deepcopy(model).eval()
    names = {module: name for name, module in model.named_modules()}
    ignored = [model.get_submodule(name) for name in ignored_names]
    with torch.enable_grad():  # torch-pruning traces dependencies through autograd
        macs_before, params_before = tp.utils.count_ops_and_params(model, example_inputs)
        widths_before = _widths(model)
        shapes_before = _output_shapes(model, example_inputs)
        heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        pruner = tp.pruner.BasePruner(model, example_inputs, importance=importance_fn, pruning_ratio=ratio,
                                      global_pruning=global_pruning, ignored_layers=ignored,
                                      iterative_steps=steps, round_to=round_to, num_heads=heads)
    refused = _record_refused_groups(pruner, names)
    batches = list(data) if importance == "taylor" else []
    if importance == "taylor" and not batches:
        raise PruneError("taylor importance got no data batches to compute gradients with")
    for step in range(steps):
        model.eval()
        with torch.enable_grad():
            if batches:
                _accumulate_gradients(model, batches, loss_fn or F.cross_entropy)
            pruner.step()
            model.zero_grad(set_to_none=True)
            macs_after, params_after = tp.utils.count_ops_and_params(model, example_inputs)
        shapes_after = _output_shapes(model, example_inputs)
        if shapes_after != shapes_before:
            raise PruneError(f"pruning changed the model's output shapes from {shapes_before} to {shapes_after}: "
                             f"pass the layers that produce the outputs in ignored_layers")
        widths_after = _widths(model)
        unpruned = _unpruned(widths_before, widths_after, ignored_names, refused, global_pruning)
        if unpruned and step == steps - 1:
            listed = ", ".join(unpruned[:8]) + (f" and {len(unpruned) - 8} more" if len(unpruned) > 8 else "")
            warn_caller(f"torch-pruning left {len(unpruned)} layers wider than ratio {ratio} asks: {listed} (it "
                        f"skips a group when floor(width * (1 - ratio)) would be 0 channels, and layers coupled to "
                        f"ignored ones or that it cannot prune); see PruneResult.unpruned")
        model.train(was_training)
        yield PruneResult(model=model, params_before=int(params_before), params_after=int(params_after),
                          macs_before=float(macs_before), macs_after=float(macs_after), widths_before=widths_before,
                          widths_after=widths_after, unpruned=unpruned, ignored=ignored_names)


def _check_settings(ratio, importance, iterative_steps, round_to, data):
    """Validate the options; return torch-pruning's importance criterion."""
    if not 0 < ratio < 1:
        raise PruneError(f"pruning ratio must be in (0, 1), got {ratio}")
    if not isinstance(iterative_steps, int) or iterative_steps < 1:
        raise PruneError(f"iterative_steps must be a positive integer, got {iterative_steps!r}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise PruneError(f"round_to must be a positive integer or None, got {round_to!r}")
    criteria = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": tp.importance.GroupTaylorImportance, "lamp": tp.importance.LAMPImportance,
        "fpgm": tp.importance.FPGMImportance, "random": tp.importance.RandomImportance,
    }
    if importance not in criteria:
        raise PruneError(f"unknown importance {importance!r}; known: {', '.join(IMPORTANCES)}")
    if importance == "taylor" and data is None:
        raise PruneError("taylor importance needs data: an iterable of (inputs, labels) batches for the gradients")
    return criteria[importance]()


def _ignored_names(model: nn.Module, ignored_layers) -> list[str]:
    """Qualified names of the classifier plus the user's layers (modules of ``model`` or names);
    names, because pruning works on a deep copy whose modules are other objects."""
    names = {module: name for name, module in model.named_modules()}
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    result = (linears or convs)[-1:]
    if isinstance(ignored_layers, (str, nn.Module)):
        ignored_layers = [ignored_layers]
    for item in ignored_layers or ():
        if isinstance(item, str):
            try:
                model.get_submodule(item)
            except AttributeError as error:
                raise PruneError(f"ignored layer {item!r} is not a module of the model") from error
            name = item
        elif isinstance(item, nn.Module):
            if item not in names:
                raise PruneError(f"ignored layer {type(item).__name__} is not a module of the model")
            name = names[item]
        else:
            raise PruneError(f"ignored_layers takes modules or qualified names, got {type(item).__name__}")
        if name not in result:
            result.append(name)
    return result


def _record_refused_groups(pruner, names: dict[nn.Module, str]) -> set[str]:
    """Note the layers of every group torch-pruning refuses because it would remove all of a
    layer's channels (it drops such groups without a word)."""
    refused: set[str] = set()
    graph = pruner.DG
    check = getattr(graph, "check_pruning_group", None)
    if check is None:  # another torch-pruning version: the width comparison still reports them
        return refused

    def recording_check(group) -> bool:
        accepted = check(group)
        if not accepted:
            refused.update(names[dep.target.module] for dep, _ in group
                           if graph.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names)
        return accepted

    graph.check_pruning_group = recording_check
    return refused


def _accumulate_gradients(model: nn.Module, batches, loss_fn: Callable) -> None:
    """Sum the loss gradients over ``batches`` into ``.grad`` (what Taylor importance reads)."""
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    for inputs, labels in batches:
        loss_fn(model(inputs.to(device)), labels.to(device)).backward()


def _unpruned(before: dict[str, int], after: dict[str, int], ignored: list[str], refused: set[str],
              global_pruning: bool) -> list[str]:
    """Conv/linear layers that should have shrunk further, in module order.

    Local pruning shrinks every layer it is not told to ignore, so a layer that kept its width is
    reported, and so is one of a group torch-pruning refused in a later iterative step. Global
    pruning may keep a layer whole on purpose (all its channels ranked high), so only refused
    groups count there.
    """
    def short(name: str) -> bool:
        return name in refused or (not global_pruning and after[name] == before[name])

    return [name for name in after if name not in ignored and short(name)]


def _widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv/linear layer, by qualified name."""
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            widths[name] = module.out_channels
        elif isinstance(module, nn.Linear):
            widths[name] = module.out_features
    return widths


@torch.no_grad()
def _output_shapes(model: nn.Module, example_inputs):
    """The shapes of the model's outputs (nested tuples/lists/dicts of tensors)."""
    if isinstance(example_inputs, dict):
        output = model(**example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        output = model(*example_inputs)
    else:
        output = model(example_inputs)
    return _shapes(output)


def _shapes(output):
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (tuple, list)):
        return [_shapes(item) for item in output]
    if isinstance(output, dict):
        return {key: _shapes(value) for key, value in output.items()}
    return type(output).__name__
