"""Pure torch.fx passes of fxlop: GraphModule in, new GraphModule out, and their linear algebra.

This package never imports the rest of :mod:`fxlop`; it knows nothing of training.  Each pass has its
module (``expand``, ``fuse``, ``batch``, ``fold_bn``), takes its options as an :class:`ExpandOptions`
or its fields, and records what it did in the model's :class:`Report` (:func:`report_of`).
"""
from .batch import batch_compositions, unbatch_compositions
from .caller import warn_caller
from .dynamics import factor_gains, gain_range, preconditioner
from .errors import ExpansionError, FusionError, PassError, SelectionError, TraceError
from .expand import expand, expand_modules
from .expanded import BatchComposer, ExpandedLayer, KernelComposer, WeightRead
from .fold_bn import fold_batchnorm
from .fuse import fuse, fuse_modules
from .graph import set_attr
from .linalg import compose
from .ops import is_expandable, module_function
from .options import (MAX_BYTES, MAX_LAYER_PARAMS, MAX_SECONDS, POINTWISE_EXPANSION, ExpandOptions, option,
                      replaced)
from .report import (META_KEY, BatchRecord, Estimate, ExpandedRecord, ExpandReport, FoldedRecord, FoldReport,
                     FusedRecord, FuseReport, ReducedRecord, Report, SkippedRecord, as_dict, report_of)
from .select import Patterns
from .tap import layer_names, layer_sites, linear_layer_names, match_names, tap, tapped_node
from .trace import trace

__all__ = ["expand", "expand_modules", "fuse", "fuse_modules", "fold_batchnorm", "trace", "batch_compositions",
           "unbatch_compositions", "ExpandOptions", "ExpandedLayer", "KernelComposer", "BatchComposer", "WeightRead",
           "Report", "ExpandReport", "ExpandedRecord", "ReducedRecord", "SkippedRecord", "Estimate", "BatchRecord",
           "FuseReport", "FusedRecord", "FoldReport", "FoldedRecord", "report_of", "as_dict", "META_KEY",
           "is_expandable", "module_function", "set_attr", "compose", "factor_gains", "preconditioner", "gain_range",
           "tap", "tapped_node", "layer_names", "linear_layer_names", "layer_sites", "match_names", "Patterns",
           "option", "replaced", "warn_caller", "POINTWISE_EXPANSION", "MAX_BYTES", "MAX_LAYER_PARAMS", "MAX_SECONDS", "PassError", "TraceError", "ExpansionError", "FusionError", "SelectionError"]
