"""The settings of fine-tuning: :class:`TrainOptions` (what :func:`fxlop.train.finetune` takes and checkpoints
store), :func:`setting`, the dataclass-field helper from which ``fxlop.cli`` builds its flags, and the choices of
optimizer, schedule, factor learning rate and SP weighting that the settings are checked against."""
from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any

from .errors import FxlopError
from .passes import option, warn_caller

OPTIMIZERS = ("sgd", "adamw")
#: per-epoch schedules (closed forms over the schedule's length) and torch's OneCycleLR, stepped per batch
SCHEDULES = ("cosine", "step", "multistep", "constant", "onecycle")
FACTOR_LRS = ("uniform", "normalized")
SP_WEIGHTINGS = ("absolute", "relative")


#: the one helper for a settings field with its command-line metadata: the expansion's options, the
#: fine-tuning settings and the run's settings all use it, and ``fxlop.cli`` builds every flag from it
setting = option


@dataclasses.dataclass
class TrainOptions:
    """Settings of :func:`finetune` (also stored in checkpoints).

    ``factor_weight_decay``/``factor_lr_scale``/``factor_lr`` apply to the factors of expanded layers
    (found by identity, see :func:`param_groups`): ``factor_weight_decay=0`` leaves them out of
    weight decay (decay on factors biases the product towards low rank); ``None`` means the same as
    ``weight_decay``.  ``factor_lr="uniform"`` trains every factor at ``lr * factor_lr_scale``;
    ``"normalized"`` divides each factor's rate further by the largest gain of its term in LOP's
    preconditioner (:func:`fxlop.passes.factor_gains`), so that the update of the product no
    longer depends on the arbitrary scale of the layer's weight.  The factors train at half the
    base rate by default: a chain of factors moves its product faster than one weight at the same
    rate (docs/theory.md, "How LOP changes the optimizer").
    ``gamma`` weighs the SP loss over ``taps`` (names or globs, default every conv/linear layer),
    averaged (or summed) over taps by ``tap_reduction``.  ``sp_weighting="relative"`` makes
    ``gamma`` a ratio: the SP term is scaled once, on the first training batch, to ``gamma`` times
    the cross-entropy there, so one value means the same on any model and dataset.

    ``kd_weight`` > 0 adds Hinton's logit distillation from the teacher
    (:func:`fxlop.distill.kd_loss` at ``kd_temperature``): the loss is ``(1 - kd_weight) * CE +
    kd_weight * KD (+ gamma * SP)``.  Without SP, the teacher's logits are computed once, in the first
    epoch, when the loader's dataset draws no augmentation (:func:`fixed_inputs`).

    Schedules: ``cosine`` (to 0), ``step`` (times ``step_gamma`` every ``step_size`` epochs),
    ``multistep`` (times ``step_gamma`` at each of the ``milestones``, shares of the schedule: the
    pruning papers' 60 % and 80 %), ``constant``, and ``onecycle``, torch's ``OneCycleLR`` stepped
    every batch: a warm-up over ``warmup_fraction`` of the schedule from ``lr / 25`` to ``lr`` (each
    parameter group to its own rate), then a cosine anneal to ``lr / 25e4``; momentum stays fixed.

    ``schedule_epochs`` (default ``epochs``) is the length of the learning-rate schedule and
    ``schedule_start`` the epoch of it this run begins at, so that two runs can share one schedule
    (fine-tune an expanded model for the first part, fuse it, finish the schedule on the fused model).
    """

    epochs: int = setting(10, "epochs of fine-tuning")
    optimizer: str = setting("sgd", "optimizer", choices=OPTIMIZERS)
    lr: float = setting(0.01, "base learning rate")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(5e-4, "weight decay")
    factor_weight_decay: float | None = setting(None, "weight decay of the LOP factors (default: --weight-decay)")
    factor_lr_scale: float = setting(0.5, "learning rate of the LOP factors relative to --lr (normalized: the "
                                          "outer factors' largest gain)")
    factor_lr: str = setting("uniform", "uniform: every factor at lr * scale; normalized: each divided by its gain in "
                                        "LOP's preconditioner", choices=FACTOR_LRS)
    schedule: str = setting("cosine", "learning-rate schedule", choices=SCHEDULES)
    schedule_epochs: int | None = setting(None, "length of the schedule (default: epochs)", cli=False)
    schedule_start: int = setting(0, "epoch of the schedule this run starts at", cli=False)
    step_size: int = setting(30, "epochs between the step schedule's decays")
    step_gamma: float = setting(0.1, "the decay factor of the step and multistep schedules")
    milestones: list[float] = setting([0.6, 0.8], "multistep: the shares of the schedule at which the rate decays "
                                                  "by --step-gamma")
    warmup_fraction: float = setting(0.3, "onecycle: the share of the schedule spent warming up to --lr")
    kd_weight: float = setting(0.0, "weight of Hinton's logit distillation from the teacher (the cross-entropy "
                                    "gets 1 - weight; 0: none)")
    kd_temperature: float = setting(4.0, "temperature of the logit distillation")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy")
    gamma: float = setting(0.0, "weight of the SP distillation loss")
    taps: list[str] | None = setting(None, "layer names or globs for SP (default: every conv/linear layer)")
    tap_reduction: str = setting("mean", "how the SP losses of the taps combine", choices=("sum", "mean"))
    sp_weighting: str = setting("absolute", "relative: gamma is the SP / cross-entropy ratio on the first batch",
                                choices=SP_WEIGHTINGS)
    bf16: bool = setting(False, "bf16 autocast")
    seed: int = setting(0, "seed of the run", cli=False)

    def check(self) -> None:
        problems = []
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            problems.append(f"epochs must be a positive integer, got {self.epochs!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.factor_lr not in FACTOR_LRS:
            problems.append(f"factor_lr must be one of {FACTOR_LRS}, got {self.factor_lr!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule_epochs is not None and not (isinstance(self.schedule_epochs, int) and self.schedule_epochs >= 1):
            problems.append(f"schedule_epochs must be a positive integer or None, got {self.schedule_epochs!r}")
        if not (isinstance(self.schedule_start, int) and self.schedule_start >= 0):
            problems.append(f"schedule_start must be an integer >= 0, got {self.schedule_start!r}")
        elif isinstance(self.epochs, int) and self.schedule_start + self.epochs > self.total_schedule_epochs:
            problems.append(f"schedule_start + epochs ({self.schedule_start} + {self.epochs}) runs past the end of the "
                            f"schedule ({self.total_schedule_epochs} epochs)")
        if self.sp_weighting not in SP_WEIGHTINGS:
            problems.append(f"sp_weighting must be one of {SP_WEIGHTINGS}, got {self.sp_weighting!r}")
        if not (isinstance(self.kd_weight, (int, float)) and 0 <= self.kd_weight <= 1):
            problems.append(f"kd_weight must be in [0, 1], got {self.kd_weight!r}")
        if not (isinstance(self.kd_temperature, (int, float)) and math.isfinite(self.kd_temperature)
                and self.kd_temperature > 0):
            problems.append(f"kd_temperature must be a finite number > 0, got {self.kd_temperature!r}")
        if not (isinstance(self.warmup_fraction, (int, float)) and 0 < self.warmup_fraction < 1):
            problems.append(f"warmup_fraction must be in (0, 1), got {self.warmup_fraction!r}")
        if not (isinstance(self.milestones, (list, tuple)) and all(
                isinstance(m, (int, float)) and 0 < m < 1 for m in self.milestones)
                and list(self.milestones) == sorted(self.milestones)):
            problems.append(f"milestones must be increasing shares of the schedule in (0, 1), got {self.milestones!r}")
        for name in ("lr", "weight_decay", "gamma", "factor_lr_scale", "momentum"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.tap_reduction not in ("sum", "mean"):
            problems.append(f"tap_reduction must be 'sum' or 'mean', got {self.tap_reduction!r}")
        if problems:
            raise FxlopError("; ".join(problems))

    @property
    def total_schedule_epochs(self) -> int:
        return self.epochs if self.schedule_epochs is None else self.schedule_epochs


def renamed(namespace: dict[str, Any], old_names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that still answers to the old names of renamed objects.

    Args:
        namespace: the module's ``globals()``.
        old_names: new name by old name (``{"TrainConfig": "TrainOptions"}``).

    Returns:
        The ``__getattr__``: an old name gives the object under its new name, with a ``DeprecationWarning``.
    """
    module = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name in old_names:
            warn_caller(f"{module}.{name} is now {module}.{old_names[name]}; the old name will be removed",
                        DeprecationWarning)
            return namespace[old_names[name]]
        raise AttributeError(f"module {module!r} has no attribute {name!r}", name=name, obj=sys.modules[module])
    return __getattr__


__getattr__ = renamed(globals(), {"TrainConfig": "TrainOptions"})
