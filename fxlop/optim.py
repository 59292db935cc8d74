"""The optimizer and learning-rate schedule of fine-tuning: :func:`param_groups` (the factors of expanded
layers in groups of their own), :func:`make_optimizer` (SGD or AdamW over them, torch's fused step where it
applies) and :func:`make_scheduler` (the per-epoch closed forms, or torch's ``OneCycleLR`` stepped every
batch, from any epoch of the schedule on)."""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from .passes import ExpandedLayer, factor_gains

from .errors import FxlopError, raises_fxlop_errors
from .settings import FACTOR_LRS, TrainOptions

__all__ = ["param_groups", "make_optimizer", "make_scheduler"]


@raises_fxlop_errors
def param_groups(model: nn.Module, *, lr: float, weight_decay: float, factor_lr_scale: float = 0.5,
                 factor_weight_decay: float | None = None, factor_lr: str = "uniform") -> list[dict]:
    """Optimizer parameter groups for a model that may hold expanded layers (any ``torch.optim`` optimizer).

    The factors of :class:`passes.ExpandedLayer` modules are found by identity (a parameter of your
    own named ``...factors...`` is not one); they train at ``lr * factor_lr_scale`` with
    ``factor_weight_decay`` (``None``: ``weight_decay``).  ``factor_lr="normalized"`` gives every
    factor a group of its own whose rate is further divided by its gain
    (:func:`fxlop.passes.factor_gains`, measured now on the current factors).  Every other
    trainable parameter gets ``lr`` and ``weight_decay``.  Empty groups are left out; each group
    carries a ``"name"`` (``"factors"``, ``"others"`` or ``"<layer>.factors.<k>"``).

    Example::

        optimizer = torch.optim.SGD(fxlop.param_groups(expanded, lr=0.05, weight_decay=5e-4), momentum=0.9)
    """
    if factor_lr not in FACTOR_LRS:
        raise FxlopError(f"factor_lr must be one of {FACTOR_LRS}, got {factor_lr!r}")
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("factor_lr_scale", factor_lr_scale),
                        ("factor_weight_decay", 0.0 if factor_weight_decay is None else factor_weight_decay)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise FxlopError(f"{name} must be a finite number >= 0, got {value!r}")
    factor_decay = weight_decay if factor_weight_decay is None else factor_weight_decay
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpandedLayer) and id(module) not in layers:
            layers[id(module)] = (name, module)
    factor_ids = {id(p) for _, layer in layers.values() for p in layer.factors}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in factor_ids]
    groups = []
    if factor_lr == "uniform":
        factors = [p for _, layer in layers.values() for p in layer.factors if p.requires_grad]
        groups.append({"params": factors, "lr": lr * factor_lr_scale, "weight_decay": factor_decay, "name": "factors"})
    else:
        for name, layer in layers.values():
            gains = factor_gains(list(layer.factors), layer.groups, layer.kernel_index)
            for index, (param, gain) in enumerate(zip(layer.factors, gains)):
                if param.requires_grad:
                    scale = 1.0 if index == layer.kernel_index else factor_lr_scale
                    groups.append({"params": [param], "lr": lr * scale / max(gain, 1e-12),
                                   "weight_decay": factor_decay, "name": f"{name}.factors.{index}"})
    groups.append({"params": others, "lr": lr, "weight_decay": weight_decay, "name": "others"})
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, config: TrainOptions) -> torch.optim.Optimizer:
    groups = param_groups(model, lr=config.lr, weight_decay=config.weight_decay,
                          factor_lr_scale=config.factor_lr_scale, factor_weight_decay=config.factor_weight_decay,
                          factor_lr=config.factor_lr)
    if not groups:
        raise FxlopError("the model has no trainable parameters")
    fused = _fused_supported(p for group in groups for p in group["params"])
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=config.lr, fused=fused)


#: devices with torch's fused SGD/AdamW kernels
_FUSED_DEVICES = ("cpu", "cuda")


def _fused_supported(params) -> bool | None:
    """``True`` where torch's fused SGD/AdamW step can update ``params`` (one kernel per parameter; the
    default on a CPU loops over the update's ops tensor by tensor), else ``None`` (torch's own choice).
    An expanded model holds several times the pruned model's parameters, so the per-tensor loop
    costs (docs/results/speed.md, "Measurements behind the defaults")."""
    params = list(params)
    if params and all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params):
        return True
    return None


def make_scheduler(optimizer, config: TrainOptions, steps_per_epoch: int | None = None):
    """The learning-rate schedule from epoch ``schedule_start`` of it on: torch's ``OneCycleLR`` stepped
    every batch (``steps_per_epoch`` of them), else per-epoch factors (``LambdaLR``) in closed form,
    so that a run can start part-way through a schedule."""
    total, start = config.total_schedule_epochs, config.schedule_start
    if config.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total * steps_per_epoch,
            pct_start=config.warmup_fraction, cycle_momentum=False)
        with warnings.catch_warnings():  # stepping before any optimizer step is the point here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start * steps_per_epoch):
                scheduler.step()
        return scheduler
    milestones = [round(m * total) for m in config.milestones]

    def factor(epoch: int) -> float:
        at = epoch + start
        if config.schedule == "cosine":  # CosineAnnealingLR's closed form, eta_min = 0
            return 0.5 * (1 + math.cos(math.pi * min(at, total) / total))
        if config.schedule == "step":
            return config.step_gamma ** (at // config.step_size)
        if config.schedule == "multistep":  # MultiStepLR's closed form, milestones as shares of the schedule
            return config.step_gamma ** sum(at >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _steps_per_epoch(loader) -> int:
    """The batches of one epoch, which a per-batch schedule (onecycle) needs in advance."""
    try:
        steps = len(loader)
    except TypeError:
        steps = None
    if not steps:
        raise FxlopError("schedule 'onecycle' steps every batch and needs a train_loader with a length "
                         "(len(loader)); use another schedule for an iterable without one")
    return steps
