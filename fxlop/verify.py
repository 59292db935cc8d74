"""Numerical equivalence of two models on example inputs."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from .errors import EquivalenceError, FxlopError

#: default relative tolerance by dtype: rounding of a deep net's outputs, tens of units of roundoff
#: (a complex dtype takes the tolerance of its real and imaginary parts)
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def default_rtol(dtype: torch.dtype) -> float:
    """The default relative tolerance for outputs of ``dtype``; 0 (exact) for integer and bool dtypes."""
    if dtype.is_complex:
        dtype = dtype.to_real()
    return RTOL.get(dtype, 0.0)


@dataclasses.dataclass(frozen=True)
class _Comparison:
    """Elementwise comparison of a candidate tensor with a reference tensor of the same shape.

    ``nonfinite_mismatch``: where the NaN/inf pattern differs (a NaN against a number, an inf against
    a number, NaN or the other inf); for complex elements each of the real and imaginary parts
    counts.  ``deviation``: ``|candidate - reference|`` in float64 (the modulus of the complex
    difference), counting only parts that are finite in both, so 0 where both hold the same NaN or
    inf.  ``scale``: the largest ``|reference|`` over its finite elements (0 if there are none).
    """

    nonfinite_mismatch: torch.Tensor
    deviation: torch.Tensor
    scale: float


def _compare(candidate: torch.Tensor, reference: torch.Tensor) -> _Comparison:
    if candidate.shape != reference.shape:
        raise EquivalenceError(f"cannot compare a tensor of shape {tuple(candidate.shape)} with one of shape "
                               f"{tuple(reference.shape)}")
    is_complex = candidate.is_complex() or reference.is_complex()
    wide = torch.complex128 if is_complex else torch.float64
    expected = reference.detach().to(wide)
    got = candidate.detach().to(device=expected.device, dtype=wide)
    # real components: (..., 2) for complex tensors, so that each part's NaN/inf is checked on its own
    exp_parts = torch.view_as_real(expected) if is_complex else expected
    got_parts = torch.view_as_real(got) if is_complex else got
    both_finite = torch.isfinite(exp_parts) & torch.isfinite(got_parts)
    same = (exp_parts == got_parts) | (torch.isnan(exp_parts) & torch.isnan(got_parts))  # inf == inf, same sign
    mismatch = ~both_finite & ~same
    delta = torch.where(both_finite, got_parts - exp_parts, torch.zeros((), dtype=torch.float64))
    if is_complex:
        mismatch = mismatch.any(-1)
        deviation = torch.view_as_complex(delta.contiguous()).abs()
    else:
        deviation = delta.abs()
    finite_reference = expected[torch.isfinite(expected)]
    scale = finite_reference.abs().max().item() if finite_reference.numel() else 0.0
    return _Comparison(mismatch, deviation, scale)


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |candidate - reference| / max |reference|`` computed in float64 (complex128 for complex
    tensors: the modulus of the complex difference, not of the real parts alone).

    Normalizing by the reference's largest magnitude, not elementwise, keeps the measure meaningful
    for activations that cross zero.  Non-finite values must match exactly: a NaN where the other
    holds a number, an inf against a number or NaN, or infs of opposite sign make the error inf;
    NaNs and infs that match count as equal, and both maxima run over the finite elements only.
    0 when both are equal (all zero included), inf when only the finite part of the reference is
    all zero.  The shapes must be equal (no broadcasting), else :class:`~fxlop.EquivalenceError`.
    """
    return _relative(_compare(candidate, reference))


def _relative(comparison: _Comparison) -> float:
    if bool(comparison.nonfinite_mismatch.any()):
        return float("inf")
    if comparison.deviation.numel() == 0:
        return 0.0
    worst = comparison.deviation.max().item()
    if worst == 0:
        return 0.0
    return worst / comparison.scale if comparison.scale > 0 else float("inf")


def verify(reference: nn.Module, candidate: nn.Module, example_inputs, *, rtol: float | None = None,
           atol: float | None = None) -> float:
    """Check that ``candidate`` computes what ``reference`` computes on ``example_inputs``.

    Both models run in eval mode under ``no_grad`` (their train/eval flags are restored after), so
    BatchNorm statistics are not touched.  ``example_inputs`` is one tensor, a tuple of positional
    arguments, or a dict of keyword arguments.  Outputs may be tensors or nested tuples, lists,
    dicts and named tuples of them; other leaves must be equal, integer and bool tensors exactly.
    A floating-point or complex tensor passes when

    - its NaNs and infs sit exactly where the reference's do, with the same signs (for complex
      tensors, part by part), and
    - on the other elements ``max |candidate - reference| <= atol + rtol * max |reference|``, the
      maximum of ``|reference|`` taken over its finite elements and ``|.|`` the modulus of the
      complex difference for complex outputs (the whole number, not only its real part).

    ``rtol`` defaults by the reference's dtype (fp32 and complex64 ``1e-5``, fp64 and complex128
    ``1e-10``, fp16 ``1e-2``, bf16 ``5e-2``), ``atol`` to 0.

    Returns:
        The largest relative error (see :func:`relative_error`) over all output tensors.

    Raises:
        FxlopError: ``rtol`` or ``atol`` is negative or not finite, or a model fails on the inputs.
        EquivalenceError: naming the output path, the worst element (or the first whose NaN/inf
            pattern differs), its expected and actual values and the deviation that fails.
    """
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise FxlopError(f"verify: {name} must be a finite number >= 0, got {value!r}")
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
            if not torch.equal(exp, out.to(exp.device)):
                raise EquivalenceError(f"{path}: {exp.dtype} outputs differ")
            continue
        comparison = _compare(out, exp)
        if bool(comparison.nonfinite_mismatch.any()):
            index = _index(comparison.nonfinite_mismatch.nonzero()[0], exp.shape)
            count = int(comparison.nonfinite_mismatch.sum())
            raise EquivalenceError(
                f"{path}{list(index)}: expected {_value(exp, index)}, got {_value(out, index)}; NaN/inf "
                f"positions or signs differ at {count} of {exp.numel()} elements (dtype {exp.dtype})")
        error = _relative(comparison)
        worst = max(worst, error)
        tolerance_rel = default_rtol(exp.dtype) if rtol is None else rtol
        allowed = (0.0 if atol is None else atol) + tolerance_rel * comparison.scale
        deviation = comparison.deviation
        if deviation.numel() and not deviation.max().item() <= allowed:
            index = _index(deviation.argmax(), deviation.shape)
            over = int((deviation > allowed).sum())
            raise EquivalenceError(
                f"{path}{list(index)}: expected {_value(exp, index)}, got {_value(out, index)}; "
                f"max abs deviation {deviation.max().item():.3g} > allowed {allowed:.3g} at {over} of "
                f"{exp.numel()} elements (relative {error:.3g}, rtol {tolerance_rel:g}, atol {atol or 0:g}, "
                f"dtype {exp.dtype})")
    return worst


def _index(flat_or_full: torch.Tensor, shape: torch.Size) -> tuple[int, ...]:
    """An element's index as a tuple: from a flat index (``argmax``) or a row of ``nonzero``."""
    if flat_or_full.dim() == 0:
        return tuple(int(i) for i in torch.unravel_index(flat_or_full, shape))
    return tuple(int(i) for i in flat_or_full)


def _value(tensor: torch.Tensor, index: tuple[int, ...]) -> str:
    return f"{tensor[index].item():.7g}"


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
