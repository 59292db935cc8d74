"""What each pass did, as typed records: the expansion, the batching of compositions, the fusion and
BatchNorm folding.

A pass stores its record in ``gm.meta[META_KEY]`` (a :class:`Report`, one section per pass) and, for a
model without a graph, in the model's ``fxlop_report`` attribute, which pickling keeps.
:func:`as_dict` is the one way a report becomes JSON data.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
from typing import Any

import torch.nn as nn

from .options import ExpandOptions

#: the key of a GraphModule's ``meta`` (and the name of a module's attribute, with ``_report``) under
#: which the passes keep their :class:`Report`
META_KEY = "fxlop"
ATTRIBUTE = META_KEY + "_report"


@dataclasses.dataclass(frozen=True)
class ExpandedRecord:
    """One expanded layer."""
    name: str
    type: str  #: the module type (of a functional call: the type it stands for, ``Conv2d``/``Linear``)
    origin: str  #: ``"module"`` or ``"functional"``
    weight_shape: tuple[int, ...]
    transposed_weight: bool  #: stored ``(in, out)``: ``x @ W``, Hugging Face's ``Conv1D``
    expansion: float  #: the width multiplier it got
    factor_shapes: tuple[tuple[int, ...], ...]
    call_sites: int | None  #: graph call sites (None for the module swap)
    weight_reads: int | None  #: other graph nodes reading the weight, which read the composed weight now
    params_before: int
    params_after: int


@dataclasses.dataclass(frozen=True)
class ReducedRecord:
    """A layer expanded at a lower expansion than asked, because its factors would be over the limit."""
    name: str
    expansion: float
    params: int
    reason: str


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
    """A layer left as it was, and why."""
    name: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What an expansion was estimated to add before anything was allocated."""
    params: int  #: parameters of the expanded model
    bytes: int  #: memory: the factors, a copy of the parameters, the largest float64 temporaries
    expand_seconds: float
    fuse_seconds: float  #: of the fuse it will need
    device: str | None

    @property
    def seconds(self) -> float:
        return self.expand_seconds + self.fuse_seconds


@dataclasses.dataclass(frozen=True)
class ExpandReport:
    """What :func:`passes.expand` (or :func:`passes.expand_modules`) did."""
    options: ExpandOptions
    traced: bool  #: a graph was rewritten (False: modules were swapped)
    expanded: tuple[ExpandedRecord, ...]
    reduced: tuple[ReducedRecord, ...]
    skipped: tuple[SkippedRecord, ...]
    params_before: int
    params_after: int
    estimate: Estimate
    seconds: float  #: measured

    def layer(self, name: str) -> ExpandedRecord:
        """The record of the expanded layer ``name``; KeyError if it was not expanded."""
        for record in self.expanded:
            if record.name == name:
                return record
        raise KeyError(name)

    @property
    def skipped_reasons(self) -> dict[str, str]:
        """Why each skipped layer was left alone, by name."""
        return {record.name: record.reason for record in self.skipped}


@dataclasses.dataclass(frozen=True)
class BatchRecord:
    """Layers whose kernels one ``BatchComposer`` composes together."""
    module: str
    layers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class FusedRecord:
    """One layer fused back."""
    name: str
    call_sites: int | None  #: None for the module swap
    type: str  #: the module type it is again, or ``"functional weight"``


@dataclasses.dataclass(frozen=True)
class FuseReport:
    """What :func:`passes.fuse` (or the module swap's way back) did."""
    fused: tuple[FusedRecord, ...]
    params: int  #: parameters of the fused model


@dataclasses.dataclass(frozen=True)
class FoldedRecord:
    """A conv/linear -> BatchNorm pair: folded, or skipped with the reason."""
    name: str
    batchnorm: str
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class FoldReport:
    """What :func:`passes.fold_batchnorm` did."""
    folded: tuple[FoldedRecord, ...]
    skipped: tuple[FoldedRecord, ...]
    params: int


@dataclasses.dataclass(frozen=True)
class Report:
    """Every pass's record for one model; a section is None where its pass did not run."""
    expand: ExpandReport | None = None
    batch: tuple[BatchRecord, ...] | None = None
    fuse: FuseReport | None = None
    fold_bn: FoldReport | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) is not None for f in dataclasses.fields(self))

    def merged(self, earlier: Report) -> Report:
        """This report with the sections it lacks taken from ``earlier``."""
        return Report(**{f.name: getattr(self, f.name) if getattr(self, f.name) is not None else getattr(earlier, f.name)
                         for f in dataclasses.fields(self)})


def report_of(model: nn.Module) -> Report:
    """The passes' :class:`Report` of ``model``: its graph's ``meta`` or, for a loaded model (whose
    ``meta`` is empty) or one expanded without a graph, its ``fxlop_report`` attribute; empty if none."""
    meta = getattr(model, "meta", None)
    found = meta.get(META_KEY) if isinstance(meta, dict) else None
    if isinstance(found, Report) and found:
        return found
    found = getattr(model, ATTRIBUTE, None)
    return found if isinstance(found, Report) else Report()


def with_section(model: nn.Module, **sections) -> None:
    """Record ``sections`` (``expand=...``) in ``model``'s report, in ``meta`` for a graph and in the
    attribute pickling keeps; other sections stay."""
    report = dataclasses.replace(report_of(model), **sections)
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict):
        meta[META_KEY] = report
    object.__setattr__(model, ATTRIBUTE, report)


def copy_with_report(model: nn.Module, memo: dict | None = None) -> nn.Module:
    """``copy.deepcopy(model)`` with its report: a GraphModule's copy keeps ``meta`` but not the
    attribute a loaded model's report lives in (its ``meta`` is empty after ``torch.load``)."""
    copied = copy.deepcopy(model, memo)
    report = report_of(model)
    if report:
        meta = getattr(copied, "meta", None)
        if isinstance(meta, dict):
            meta[META_KEY] = report
        object.__setattr__(copied, ATTRIBUTE, report)
    return copied


def as_dict(value: Any) -> Any:
    """A report (or any of its records) as plain JSON data: dataclasses as dicts, tuples as lists,
    module types as their qualified names; ``Estimate`` and ``ExpandOptions`` included."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # fields marked json=False stay out
        return {f.name: as_dict(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.metadata.get("json", True)}
    if isinstance(value, (list, tuple)):
        return [as_dict(v) for v in value]
    if isinstance(value, dict):
        return {str(k): as_dict(v) for k, v in value.items()}
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, enum.Enum):
        return value.value
    return value


__all__ = ["META_KEY", "Report", "ExpandReport", "ExpandedRecord", "ReducedRecord", "SkippedRecord", "Estimate",
           "BatchRecord", "FuseReport", "FusedRecord", "FoldReport", "FoldedRecord", "report_of", "with_section",
           "as_dict"]
