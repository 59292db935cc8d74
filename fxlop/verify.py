"""Numerical equivalence of two models on example inputs."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from .errors import EquivalenceError, FxlopError

#: default relative tolerance by dtype: rounding of a deep net's outputs, tens of units of roundoff
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def default_rtol(dtype: torch.dtype) -> float:
    return RTOL.get(dtype, 0.0)


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |candidate - reference| / max |reference|`` computed in float64.

    Normalizing by the reference's largest magnitude, not elementwise, keeps the measure meaningful
    for activations that cross zero.  0 when both are all zero, inf when only the reference is.
    """
    diff = (candidate.detach().double() - reference.detach().double()).abs()
    if diff.numel() == 0:
        return 0.0
    worst = diff.nan_to_num(nan=float("inf")).max().item()
    scale = reference.detach().double().abs().max().item()
    if worst == 0:
        return 0.0
    return worst / scale if scale > 0 else float("inf")


def verify(reference: nn.Module, candidate: nn.Module, example_inputs, *, rtol: float | None = None,
           atol: float | None = None) -> float:
    """Check that ``candidate`` computes what ``reference`` computes on ``example_inputs``.

    Both models run in eval mode under ``no_grad`` (their train/eval flags are restored after), so
    BatchNorm statistics are not touched.  ``example_inputs`` is one tensor, a tuple of positional
    arguments, or a dict of keyword arguments.  Outputs may be tensors or nested tuples, lists,
    dicts and named tuples of them; other leaves must be equal.  A tensor passes when
    ``max |candidate - reference| <= atol + rtol * max |reference|``; ``rtol`` defaults by the
    reference's dtype (fp32 ``1e-5``, fp64 ``1e-10``, fp16 ``1e-2``, bf16 ``5e-2``), ``atol`` to 0.

    Returns:
        The largest relative error (see :func:`relative_error`) over all output tensors.

    Raises:
        EquivalenceError: naming the output, the element and the deviation that fails.
    """
    args, kwargs = _split_inputs(example_inputs)
    with torch.no_grad(), _eval_mode(reference), _eval_mode(candidate):
        expected = _call(reference, "reference", args, kwargs)
        got = _call(candidate, "candidate", args, kwargs)
    worst = 0.0
    for path, exp, out in _paired_leaves(expected, got, "output"):
        if not isinstance(exp, torch.Tensor):
            if exp != out:
                raise EquivalenceError(f"{path} differs: expected {exp!r}, got {out!r}")
            continue
        if not isinstance(out, torch.Tensor) or out.shape != exp.shape:
            raise EquivalenceError(f"{path}: expected a tensor of shape {tuple(exp.shape)}, got "
                                   f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        if not exp.is_floating_point() and not exp.is_complex():
            if not torch.equal(exp, out):
                raise EquivalenceError(f"{path}: {exp.dtype} outputs differ")
            continue
        error = relative_error(out, exp)
        worst = max(worst, error)
        tolerance_rel = default_rtol(exp.dtype) if rtol is None else rtol
        scale = exp.detach().double().abs().max().item() if exp.numel() else 0.0
        allowed = (0.0 if atol is None else atol) + tolerance_rel * scale
        diff = (out.detach().double() - exp.detach().double()).abs().nan_to_num(nan=float("inf"))
        if diff.numel() and not diff.max().item() <= allowed:
            index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
            raise EquivalenceError(
                f"{path}{list(index)}: expected {exp[index].item():.7g}, got {out[index].item():.7g}; "
                f"max abs deviation {diff.max().item():.3g} > allowed {allowed:.3g} "
                f"(relative {error:.3g}, rtol {tolerance_rel:g}, atol {atol or 0:g}, dtype {exp.dtype})")
    return worst


def _call(model, role: str, args, kwargs):
    try:
        return model(*args, **kwargs)
    except Exception as error:  # the inputs do not fit the model: say so, not as an equivalence failure
        raise FxlopError(f"verify: the {role} model ({type(model).__name__}) fails on example_inputs: "
                         f"{type(error).__name__}: {error}") from error


def _split_inputs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _paired_leaves(expected: Any, got: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    if isinstance(expected, Mapping):
        if not isinstance(got, Mapping) or set(expected) != set(got):
            raise EquivalenceError(f"{path}: expected a mapping with keys {sorted(map(str, expected))}, "
                                   f"got {type(got).__name__}")
        for key in expected:
            yield from _paired_leaves(expected[key], got[key], f"{path}[{key!r}]")
    elif isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            raise EquivalenceError(f"{path}: expected a sequence of {len(expected)}, got {type(got).__name__}")
        for i, (exp, out) in enumerate(zip(expected, got)):
            yield from _paired_leaves(exp, out, f"{path}[{i}]")
    else:
        yield path, expected, got


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
    except NotImplementedError:  # torch.export's modules keep the mode they were exported in
        pass
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag
