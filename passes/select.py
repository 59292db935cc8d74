"""Selecting layers by qualified-name globs or by module type."""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from .errors import SelectionError

Patterns = Iterable[str | type] | str | type | None
"""Layers to select: qualified-name globs (``"layer1.*"``), module types (``nn.Linear``), or an iterable of
both; ``None`` selects every layer."""


def selector(patterns: Patterns) -> Callable[[str, type], bool] | None:
    """A predicate ``(qualified_name, module_type) -> bool`` true when any pattern matches.

    A string is an ``fnmatch`` glob on the qualified name (``"layer1.*"``); a type matches
    instances of it (subclasses included).  ``None`` gives ``None`` (no filter).

    Raises:
        SelectionError: ``patterns`` is not a pattern or an iterable of them, or holds something else.
    """
    if patterns is None:
        return None
    if isinstance(patterns, (str, type)):
        patterns = [patterns]
    if not isinstance(patterns, Iterable):
        raise SelectionError(f"layer patterns are a glob string, a module type or a list of them, got {patterns!r}")
    patterns = list(patterns)
    for pattern in patterns:
        if not isinstance(pattern, (str, type)):
            raise SelectionError(f"a layer pattern is a glob string or a module type, got {pattern!r}")
    globs = [p for p in patterns if isinstance(p, str)]
    types = tuple(p for p in patterns if isinstance(p, type))

    def matches(name: str, module_type: type) -> bool:
        return issubclass(module_type, types) or any(fnmatch.fnmatchcase(name, g) for g in globs)

    return matches
