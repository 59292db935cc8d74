"""How gradient descent on a chain's factors moves the chain's product, to first order.

A chain ``W = F_{d-1} ... F_1 F_0`` (per group and tap, see :mod:`passes.linalg`) trained by SGD with
a learning rate ``lr_k`` on each factor moves ``W`` by ``-P(G)``, ``G`` the gradient with respect to
``W`` (what plain fine-tuning would apply), where

    P(G) = sum_k lr_k J_k J_k^T G,   J_k X = L_k X R_k

is linear and positive semi-definite; ``L_k``/``R_k`` are the products of the factors after/before
``F_k`` (the one holding the kernel spans its taps).  With orthonormal outer factors (the default
initialization) and depth 3 this is ``lr_B G + lr_C G W^T W + lr_A W W^T G`` — a preconditioner whose
gain runs from about ``lr_B`` along ``W``'s weak directions to ``lr_B + (lr_A + lr_C) sigma_max^2``
along its strongest.  ``sigma_max`` depends on the scale of ``W``, which for a layer followed by
BatchNorm is arbitrary.  :func:`factor_gains` gives, per factor, the largest gain of its own term,
``||L_k||^2 ||R_k||^2``; dividing each factor's learning rate by it makes the preconditioner
independent of that scale.  The functions here only read the factors; they hold no state.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import linalg


def _as_matrices(weight: Tensor, groups: int, taps_on_rows: bool) -> Tensor:
    """``(g, O/g, I/g, T)`` blocks as ``(g, O T, I)`` (taps stacked on the rows) or ``(g, O, I T)``."""
    blocks = linalg.grouped(weight, groups)
    g, o, i, t = blocks.shape
    if taps_on_rows:
        return blocks.permute(0, 1, 3, 2).reshape(g, o * t, i)
    return blocks.reshape(g, o, i * t)


def _spectral_norm_squared(matrices: Tensor) -> float:
    """Largest squared singular value over a batch of matrices, from the smaller Gram matrix (float64)."""
    m = matrices.to(torch.float64)
    gram = m.transpose(1, 2) @ m if m.shape[1] >= m.shape[2] else m @ m.transpose(1, 2)
    return float(torch.linalg.eigvalsh(gram)[..., -1].max().clamp(min=0))


def _sub_chain(factors: Sequence[Tensor], groups: int, kernel_index: int, start: int, stop: int) -> Tensor | None:
    """The product of ``factors[start:stop]`` as a conv/linear weight, or None for an empty range."""
    part = list(factors[start:stop])
    if not part:
        return None
    index = kernel_index - start if start <= kernel_index < stop else 0
    return linalg.compose(part, groups, index)


@torch.no_grad()
def factor_gains(factors: Sequence[Tensor], groups: int, kernel_index: int) -> list[float]:
    """Per factor ``k``, the largest factor by which one SGD step on ``F_k`` alone (learning rate 1)
    moves the chain's product per unit of its gradient: ``||L_k||^2 ||R_k||^2`` (max over groups).

    With orthonormal outer factors the kernel factor's gain is 1 and an outer factor's is the
    squared spectral norm of the layer's weight (taps laid out on the side the factor does not touch).
    Computed in float64; costs about one composition of the chain per factor.
    """
    factors = [f.detach() for f in factors]
    gains = []
    for k in range(len(factors)):
        gain = 1.0
        # L_k spans the kernel when k precedes it: its taps are rows of the map X -> L X R
        after = _sub_chain(factors, groups, kernel_index, k + 1, len(factors))
        if after is not None:
            gain *= _spectral_norm_squared(_as_matrices(after, groups, taps_on_rows=True))
        before = _sub_chain(factors, groups, kernel_index, 0, k)
        if before is not None:
            gain *= _spectral_norm_squared(_as_matrices(before, groups, taps_on_rows=False))
        gains.append(gain)
    return gains


def preconditioner(factors: Sequence[Tensor], learning_rates: Sequence[float], groups: int,
                   kernel_index: int) -> Callable[[Tensor], Tensor]:
    """The map ``G -> P(G)``: the first-order change of the chain's product under one SGD step of the
    given per-factor learning rates, for a gradient ``G`` with respect to the product (negated).

    Built from autograd (a vector-Jacobian product, then a Jacobian-vector product), so it holds
    for any depth, groups and kernel size.  Computed in float64.
    """
    exact = [f.detach().to(torch.float64) for f in factors]

    def compose(*fs):
        return linalg.compose(fs, groups, kernel_index)

    def apply(gradient: Tensor) -> Tensor:
        _, pullback = torch.func.vjp(compose, *exact)
        factor_gradients = pullback(gradient.to(torch.float64))
        steps = tuple(lr * g for lr, g in zip(learning_rates, factor_gradients))
        return torch.func.jvp(compose, tuple(exact), steps)[1]

    return apply


def gain_range(operator: Callable[[Tensor], Tensor], shape: Sequence[int], *, iterations: int = 100,
               seed: int = 0, device: torch.device | str | None = None) -> tuple[float, float]:
    """Smallest and largest eigenvalue of a symmetric positive semi-definite linear ``operator`` on
    float64 tensors of ``shape`` on ``device``: power iteration on it, then on ``2 lambda_max - operator``
    (positive definite however close the estimate of ``lambda_max`` is, so its top is ``2 lambda_max -
    lambda_min``).  Estimates: both converge from inside the spectrum."""
    generator = torch.Generator().manual_seed(seed)

    def top(op) -> float:
        x = torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(device)
        value = 0.0
        for _ in range(iterations):
            x = x / x.norm()
            y = op(x)
            value = float((x * y).sum())
            x = y
        return value

    largest = top(operator)
    shift = 2 * largest
    smallest = shift - top(lambda x: shift * x - operator(x))
    return min(smallest, largest), largest


__all__ = ["factor_gains", "preconditioner", "gain_range"]
