"""The errors fxlop raises on purpose.

The passes (:mod:`fxlop.passes`) never import the rest of fxlop, so they raise their own
:class:`~fxlop.passes.PassError` kinds, which fxlop re-exports (``fxlop.ExpansionError is
fxlop.passes.ExpansionError``).  fxlop's functions and the CLI re-raise a pass error as an instance of
both its kind and :class:`FxlopError` (:func:`fxlop_errors`): ``except fxlop.ExpansionError`` catches
an expansion refused anywhere, ``except fxlop.FxlopError`` every error that leaves fxlop's functions.
The passes' own objects that fxlop re-exports (``ExpandOptions``, ``ExpandedLayer``) raise the passes'
kinds when used directly.
"""
import contextlib
import functools
import sys
from typing import Callable, Iterator, TypeVar

from . import passes
from .passes import ExpansionError, FusionError, SelectionError, TraceError


class FxlopError(passes.PassError):
    """Base class of every error fxlop raises on purpose."""


class EquivalenceError(FxlopError):
    """Two models that should compute the same function do not (see :func:`fxlop.verify`)."""


def _crossing(kind: type[passes.PassError]) -> type[FxlopError]:
    """The class a pass error of ``kind`` leaves fxlop as: both that kind and a FxlopError, under its name."""
    def __reduce__(self):  # the class is made here, not found by name: pickle rebuilds it from its kind
        return _crossed, (kind, self.args, self.__dict__)
    return type(kind.__name__, (FxlopError, kind), {"__module__": __name__, "__doc__": kind.__doc__,
                                                    "__reduce__": __reduce__})


def _crossed(kind: type[passes.PassError], args: tuple, attributes: dict) -> FxlopError:
    error = kind(*args)
    error.__dict__.update(attributes)
    return as_fxlop_error(error)


# Most specific first: each pass error leaves fxlop as the first kind it is an instance of.
_CROSSINGS: tuple[tuple[type[passes.PassError], type[FxlopError]], ...] = tuple(
    (kind, _crossing(kind)) for kind in (SelectionError, TraceError, ExpansionError, FusionError)) + (
    (passes.PassError, FxlopError),)


def as_fxlop_error(error: passes.PassError) -> FxlopError:
    """The :class:`FxlopError` of ``error``'s kind, with its message, attributes and traceback."""
    if isinstance(error, FxlopError):
        return error
    kind = next(crossing for pass_kind, crossing in _CROSSINGS if isinstance(error, pass_kind))
    translated = kind(*error.args)
    translated.__dict__.update(error.__dict__)  # attributes and notes a caller may read
    return translated.with_traceback(error.__traceback__)


@contextlib.contextmanager
def fxlop_errors() -> Iterator[None]:
    """Re-raise a :class:`~fxlop.passes.PassError` raised inside the block as its :class:`FxlopError`."""
    outer = sys.exc_info()[1]  # an error the caller is handling around the block is not the pass error's cause
    try:
        yield
    except passes.PassError as error:
        if isinstance(error, FxlopError):
            raise
        # the same message, frames and cause (or the error it was raised while handling): one traceback,
        # not the pass error's printed above it
        context = error.__context__ if error.__context__ is not outer else None
        cause = error.__cause__ if error.__cause__ is not None or error.__suppress_context__ else context
        raise as_fxlop_error(error) from cause


Function = TypeVar("Function", bound=Callable)


def raises_fxlop_errors(function: Function) -> Function:
    """Decorate an entry point of fxlop so that errors of the passes leave it as :class:`FxlopError` s."""
    @functools.wraps(function)
    def entry_point(*args, **kwargs):
        with fxlop_errors():
            return function(*args, **kwargs)
    return entry_point  # type: ignore[return-value]


__all__ = ["FxlopError", "TraceError", "ExpansionError", "FusionError", "SelectionError", "EquivalenceError",
           "fxlop_errors", "raises_fxlop_errors", "as_fxlop_error"]
