"""Errors raised by the passes; `fxlop` re-exports them.

They live here, not in `fxlop`, because the passes never import `fxlop`.
"""


class FxlopError(Exception):
    """Base class of every error fxlop raises on purpose."""


class TraceError(FxlopError):
    """The model could not be traced into an FX graph."""


class ExpansionError(FxlopError):
    """The expansion pass was given settings or a graph it cannot honour."""


class FusionError(FxlopError):
    """An expanded subgraph cannot be fused back into one layer."""


class SelectionError(FxlopError, TypeError):
    """A layer pattern (include, exclude, leaf_modules) that is neither a glob nor a module type."""
