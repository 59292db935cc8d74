"""Pure torch.fx passes of fxlop: GraphModule in, new GraphModule out, and their linear algebra.

This package never imports :mod:`fxlop`; it knows nothing of training.
"""
from .batch import batch_compositions, unbatch_compositions
from .errors import ExpansionError, FusionError, FxlopError, SelectionError, TraceError
from .expand import expand, expand_modules
from .expanded import BatchComposer, ExpandedLayer, KernelComposer, WeightRead
from .fold_bn import fold_batchnorm
from .fuse import fuse
from .trace import trace

__all__ = ["expand", "expand_modules", "fuse", "fold_batchnorm", "trace", "batch_compositions",
           "unbatch_compositions", "ExpandedLayer", "KernelComposer", "BatchComposer", "WeightRead",
           "FxlopError", "TraceError", "ExpansionError", "FusionError", "SelectionError"]
