"""The errors fxlop raises on purpose; all derive from :class:`FxlopError`."""
from .passes.errors import ExpansionError, FusionError, FxlopError, SelectionError, TraceError


class EquivalenceError(FxlopError):
    """Two models that should compute the same function do not (see :func:`fxlop.verify`)."""


__all__ = ["FxlopError", "TraceError", "ExpansionError", "FusionError", "SelectionError", "EquivalenceError"]
