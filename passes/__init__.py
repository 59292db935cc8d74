"""Pure torch.fx passes of fxlop: GraphModule in, new GraphModule out, and their linear algebra.

This package never imports the rest of :mod:`fxlop`; it knows nothing of training.  Each pass has its
module (``expand``, ``fuse``, ``batch``, ``fold_bn``), takes its options as an :class:`ExpandOptions`
or its fields, and records what it did in the model's :class:`Report` (:func:`report_of`).
"""
from .batch import batch_compositions, unbatch_compositions
from .errors import ExpansionError, FusionError, FxlopError, SelectionError, TraceError
from .expand import expand, expand_modules
from .expanded import BatchComposer, ExpandedLayer, KernelComposer, WeightRead
from .fold_bn import fold_batchnorm
from .fuse import fuse, fuse_modules
from .graph import set_attr
from .ops import is_expandable
from .options import ExpandOptions
from .report import (META_KEY, BatchRecord, Estimate, ExpandedRecord, ExpandReport, FoldedRecord, FoldReport,
                     FusedRecord, FuseReport, ReducedRecord, Report, SkippedRecord, as_dict, report_of)
from .trace import trace

__all__ = ["expand", "expand_modules", "fuse", "fuse_modules", "fold_batchnorm", "trace", "batch_compositions",
           "unbatch_compositions", "ExpandOptions", "ExpandedLayer", "KernelComposer", "BatchComposer", "WeightRead",
           "Report", "ExpandReport", "ExpandedRecord", "ReducedRecord", "SkippedRecord", "Estimate", "BatchRecord",
           "FuseReport", "FusedRecord", "FoldReport", "FoldedRecord", "report_of", "as_dict", "META_KEY", "is_expandable", "set_attr",
           "FxlopError", "TraceError", "ExpansionError", "FusionError", "SelectionError"]
