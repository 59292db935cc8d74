"""Errors raised by the passes.

They derive from :class:`PassError`, not from anything in :mod:`fxlop`, because the passes never
import the rest of fxlop.  fxlop re-exports these kinds, and its functions re-raise a pass error as an
instance of both its kind and ``fxlop.FxlopError``, so either ``except`` catches it there.
"""


class PassError(Exception):
    """Base class of every error the passes raise on purpose."""


class TraceError(PassError):
    """The model could not be traced into an FX graph."""


class ExpansionError(PassError):
    """The expansion pass was given settings or a graph it cannot honour."""


class FusionError(PassError):
    """An expanded subgraph cannot be fused back into one layer."""


class SelectionError(PassError, TypeError):
    """A layer pattern (include, exclude, leaf_modules) that is neither a glob nor a module type."""
