"""Errors raised by the passes.

They derive from :class:`PassError`, not from anything in :mod:`fxlop`, because the passes never
import the rest of fxlop.  ``fxlop``'s own entry points re-raise them as :class:`fxlop.FxlopError`
subclasses of the same kind (``fxlop.ExpansionError`` is both a ``FxlopError`` and an
``ExpansionError`` of this module), so ``except fxlop.FxlopError`` catches everything fxlop raises.
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
