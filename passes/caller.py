"""Warnings that point at the line of the user's code, not at the library's own frames."""
from __future__ import annotations

import sys
import warnings

#: the package these passes are installed in (``fxlop``): its frames are the library's
_LIBRARY = __name__.split(".")[0]
#: frames that only pass a call through: a context manager's ``__enter__``
_TRANSPARENT = ("contextlib",)


def _inside(frame) -> bool:
    name = frame.f_globals.get("__name__", "")
    return name == _LIBRARY or name.startswith(_LIBRARY + ".") or name in _TRANSPARENT


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` at the first frame outside the library.

    However many of the library's frames stand between (entry points, their wrappers, helpers), the
    warning names the user's line that called in, so ``-W error`` and warning filters see the
    caller's module.

    Args:
        message: the warning's text.
        category: its class.
    """
    frame, level = sys._getframe(1), 2  # level 2: the frame that called warn_caller
    while frame is not None and _inside(frame):
        frame, level = frame.f_back, level + 1
    if frame is None:  # called from nowhere outside (a callback): the outermost frame
        level -= 1
    warnings.warn(message, category, stacklevel=level)
