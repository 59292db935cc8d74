"""Symbolic tracing with an error that says where tracing broke and how to get past it."""
from __future__ import annotations

import copy

import torch.fx as fx
import torch.nn as nn

from .errors import TraceError
from .expanded import ExpandedLayer
from .select import Patterns, selector


class _Tracer(fx.Tracer):
    """``fx.Tracer`` that also treats user-chosen modules and expanded layers (of ``trace=False``) as
    leaves and remembers the innermost module being traced when an exception escapes."""

    def __init__(self, leaf_modules: Patterns = None):
        super().__init__()
        self._is_user_leaf = selector(leaf_modules)
        self._stack: list[tuple[str, type]] = []
        self.failed_in: tuple[str, type] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, ExpandedLayer):
            return True
        if self._is_user_leaf is not None and self._is_user_leaf(module_qualified_name, type(m)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self._stack.append((self.path_of_module(m), type(m)))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._stack[-1]
            raise
        finally:
            self._stack.pop()


def trace(model: nn.Module, *, leaf_modules: Patterns = None) -> fx.GraphModule:
    """Trace ``model`` with ``torch.fx`` symbolic tracing; modules matched by ``leaf_modules``
    (qualified-name globs or types) are kept as opaque ``call_module`` nodes.

    The GraphModule shares parameters with ``model``; the passes copy before they change anything.
    ``model`` itself gains nothing: torch.fx stores each tensor constant of the forward on the root
    it traces (``_tensor_constant0`` ...), so the root traced here is a shallow copy.

    Raises:
        TraceError: naming the module whose forward could not be traced and how to leave it out.
    """
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(copy.copy(model))
    except Exception as error:  # tracing fails with many types; all mean the same thing here
        if tracer.failed_in is not None and tracer.failed_in[0]:
            name, module_type = tracer.failed_in
            where = f"in module '{name}' ({module_type.__name__})"
            hint = (f"Keep it as an opaque leaf with leaf_modules=['{name}'] (or "
                    f"leaf_modules=[{module_type.__name__}]); its own layers are then not expanded. Or expand "
                    f"without tracing (expand_modules, or trace=False), or expand the graph of "
                    f"torch.export.export(model, example_args).")
        else:
            where = f"in the forward of {type(model).__name__} itself"
            hint = ("Expand without tracing (expand_modules, or trace=False; Hugging Face models need this or "
                    "torch.export), expand the graph of torch.export.export(model, example_args), move the "
                    "untraceable code into a submodule and pass it as a leaf (leaf_modules=[...]), or trace the "
                    "model yourself and pass the GraphModule.")
        raise TraceError(f"torch.fx could not trace {type(model).__name__}: tracing failed {where}: "
                         f"{type(error).__name__}: {error}. {hint}") from error
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return fx.GraphModule(tracer.root, graph, name)
