"""The fine-tuning methods: which of LOP, SP distillation and logit distillation each one uses.

One type, shared by :func:`fxlop.pipeline.run`, the ``fxlop run`` command line and the recovery
benchmark.
"""
from __future__ import annotations

import dataclasses

from .errors import FxlopError
from .settings import TrainOptions


@dataclasses.dataclass(frozen=True)
class Method:
    """One way to fine-tune a pruned model.

    Attributes:
        name: how settings and reports name it (``"lop_sp"``).
        lop: fine-tune the expanded model (:func:`fxlop.expand`), fused back after.
        sp: add the similarity-preserving loss against the dense teacher (``TrainOptions.gamma``).
        kd: add Hinton's logit distillation from the dense teacher (``TrainOptions.kd_weight``).
        summary: one line for help texts.
    """

    name: str
    lop: bool = False
    sp: bool = False
    kd: bool = False
    summary: str = ""

    @property
    def distills(self) -> bool:
        """Whether the method needs the dense teacher."""
        return self.sp or self.kd

    def train_config(self, base: TrainOptions, **changes) -> TrainOptions:
        """``base`` with this method's losses: ``gamma`` kept only with SP, ``kd_weight`` only with KD.

        Args:
            base: the run's fine-tuning settings.
            changes: other fields to replace (``epochs``, ``seed``).

        Returns:
            The method's settings (checked by :func:`fxlop.finetune`).
        """
        return dataclasses.replace(base, gamma=base.gamma if self.sp else 0.0,
                                   kd_weight=base.kd_weight if self.kd else 0.0, **changes)


#: every method, by name
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("vanilla", summary="plain fine-tuning"),
    Method("sp", sp=True, summary="fine-tuning with SP distillation"),
    Method("lop", lop=True, summary="LOP: fine-tune the expanded model, fuse it"),
    Method("lop_sp", lop=True, sp=True, summary="LOP with SP distillation"),
    Method("kd", kd=True, summary="fine-tuning with Hinton's logit distillation"),
    Method("kd_sp", kd=True, sp=True, summary="logit and SP distillation"),
    Method("kd_lop", kd=True, lop=True, summary="LOP with logit distillation"),
)}


def method(name: str) -> Method:
    """The method called ``name``.

    Raises:
        FxlopError: no method has that name.
    """
    if name not in METHODS:
        raise FxlopError(f"unknown method {name!r}; the methods are {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["Method", "METHODS", "method"]
