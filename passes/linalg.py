"""Linear algebra of linear over-parameterization, apart from any graph surgery.

A conv weight ``(O, I/g, *k)`` is handled as ``g`` blocks of shape ``(O/g, I/g, T)`` with
``T = prod(k)`` taps; a linear weight ``(O, I)`` is one block with ``T = 1``.  A *chain* is a list of
factor weights, applied first to last, in which only the factor at ``kernel_index`` may have a
spatial kernel; every other factor is a 1x1 (or linear) map.  The chain's end-to-end weight is,
per group and per tap, ``post @ kernel[tap] @ pre`` with ``pre``/``post`` the products of the 1x1
factors before/after the kernel.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def grouped(weight: Tensor, groups: int) -> Tensor:
    """View a conv/linear weight as ``(groups, O/g, I/g, T)`` blocks."""
    return weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)


def ungrouped(blocks: Tensor, kernel_size: Sequence[int]) -> Tensor:
    """Inverse of :func:`grouped`: ``(g, O/g, I/g, T)`` back to ``(O, I/g, *kernel_size)``."""
    g, o, i, _ = blocks.shape
    return blocks.reshape(g * o, i, *kernel_size)


def chain_shapes(weight_shape: Sequence[int], groups: int, expansion: float,
                 depth: int) -> tuple[list[tuple[int, ...]], int]:
    """Shapes of the factor weights that replace a weight of ``weight_shape``, and the kernel index.

    Depth ``d`` gives ``(d - 1) // 2`` 1x1 factors before the kernel factor and the rest after it;
    hidden widths are ``ceil(expansion * C)`` per group, with ``C`` the layer's input width before
    the kernel and its output width after it, so every hidden width is at least the width it
    must carry and the initialization below can be exact.
    """
    if depth < 2:
        raise ValueError(f"depth must be at least 2, got {depth}")
    if expansion < 1:
        raise ValueError(f"expansion must be at least 1, got {expansion}")
    out_total, in_per_group, *kernel = weight_shape
    out_per_group = out_total // groups
    ones = (1,) * len(kernel)
    n_pre = (depth - 1) // 2
    n_post = depth - 1 - n_pre
    wide_in = math.ceil(expansion * in_per_group)
    wide_out = math.ceil(expansion * out_per_group)

    shapes = []
    width = in_per_group
    for _ in range(n_pre):
        shapes.append((groups * wide_in, width, *ones))
        width = wide_in
    kernel_out = wide_out if n_post else out_per_group
    shapes.append((groups * kernel_out, width, *kernel))
    width = kernel_out
    for j in range(n_post):
        out = out_per_group if j == n_post - 1 else wide_out
        shapes.append((groups * out, width, *ones))
        width = out
    return shapes, n_pre


def orthonormal(rows: int, cols: int, generator: torch.Generator | None = None, batch: int = 1) -> Tensor:
    """``batch`` float64 ``rows x cols`` matrices with orthonormal columns (rows >= cols) or rows.

    Drawn from the Haar measure: QR of Gaussian matrices with the signs of R's diagonal folded in.
    Returns shape ``(batch, rows, cols)``.
    """
    gaussian = torch.randn(batch, max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)
    return q if rows >= cols else q.transpose(-2, -1)


def factorize(weight: Tensor, groups: int, shapes: Sequence[Sequence[int]], kernel_index: int,
              generator: torch.Generator | None = None, balanced: bool = False) -> list[Tensor]:
    """Factors of the given shapes whose chain product equals ``weight``.

    The 1x1 factors are orthonormal (columns before the kernel, rows after it), so their products
    ``P`` and ``Q`` satisfy ``P^T P = I`` and ``Q Q^T = I``; the kernel factor is ``Q^T W P^T`` per tap,
    and ``Q (Q^T W P^T) P = W``.  Every factor is dense and random, so every one of them receives
    gradient (zero-padded identities would leave most entries dead).  Computed in float64 and
    returned in the weight's dtype and device.

    ``balanced``: rescale so that every factor has the spectral norm ``s^(1/d)`` of a ``d``-factor
    chain, ``s`` the spectral norm of ``W`` (as ``O x I*T`` per group), instead of 1 for the outer
    factors and ``s`` for the kernel (the scale balance of Arora et al. 2018); the product is unchanged.
    """
    blocks = grouped(weight.detach().to(torch.float64), groups)
    pre_factors, post_factors = [], []
    for index, shape in enumerate(shapes):
        if index == kernel_index:
            continue
        rows, cols = shape[0] // groups, shape[1]
        (pre_factors if index < kernel_index else post_factors).append(orthonormal(rows, cols, generator, groups))

    # Q^T W P^T is itself a chain (P^T, then W, then Q^T): compose it like any other
    ones = (1,) * (weight.dim() - 2)
    pre = _chain_product(pre_factors)
    post = _chain_product(post_factors)
    chain = [ungrouped(m.transpose(1, 2).unsqueeze(-1), ones) for m in (pre,) if m is not None]
    chain.append(ungrouped(blocks, weight.shape[2:]))
    chain += [ungrouped(m.transpose(1, 2).unsqueeze(-1), ones) for m in (post,) if m is not None]
    kernel = compose(chain, groups, int(pre is not None))
    outer_scale = 1.0
    if balanced:
        norm = torch.linalg.matrix_norm(blocks.reshape(groups, blocks.shape[1], -1), ord=2).max().item()
        if norm > 0:
            outer_scale = norm ** (1 / len(shapes))
            kernel = kernel / outer_scale ** (len(shapes) - 1)

    factors = []
    it_pre, it_post = iter(pre_factors), iter(post_factors)
    for index, shape in enumerate(shapes):
        if index == kernel_index:
            factor = kernel
        else:
            factor = outer_scale * ungrouped(next(it_pre if index < kernel_index else it_post).unsqueeze(-1), shape[2:])
        factors.append(factor.to(dtype=weight.dtype, device=weight.device).contiguous())
    return factors


def _chain_product(matrices: Sequence[Tensor]) -> Tensor | None:
    """``m[-1] @ ... @ m[0]`` for batched ``(g, rows, cols)`` matrices applied first to last."""
    product = None
    for matrix in matrices:
        product = matrix if product is None else matrix @ product
    return product


def contraction_order(shapes: Sequence[Sequence[int]], groups: int, kernel_index: int) -> str:
    """``"post_first"`` or ``"pre_first"``: the cheaper way, in multiply-adds, to contract the kernel.

    With per-group sizes ``O x E2`` (post), ``E2 x E1 x T`` (kernel), ``E1 x I`` (pre):
    post first costs ``T (O E2 E1 + O E1 I)``, pre first ``T (E2 E1 I + O E2 I)``.
    """
    o = shapes[-1][0] // groups
    i = shapes[0][1]
    e2 = shapes[kernel_index][0] // groups
    e1 = shapes[kernel_index][1]
    post_first = o * e2 * e1 + o * e1 * i
    pre_first = e2 * e1 * i + o * e2 * i
    return "post_first" if post_first <= pre_first else "pre_first"


def compose(factors: Sequence[Tensor], groups: int, kernel_index: int, order: str | None = None) -> Tensor:
    """The end-to-end weight of a chain, in the factors' dtype (differentiable).

    The result is contiguous with standard strides: a non-contiguous kernel straight from the batched
    matmuls made oneDNN's conv2d backward corrupt the heap on a partial last batch (torch 2.14.1, CPU).
    """
    kernel_size = factors[kernel_index].shape[2:]
    if order is None:
        order = contraction_order([f.shape for f in factors], groups, kernel_index)
    squeeze = [grouped(f, groups)[..., 0] for f in factors]
    pre = _chain_product(squeeze[:kernel_index])  # (g, E1, I)
    post = _chain_product(squeeze[kernel_index + 1:])  # (g, O, E2)
    # Taps-before-inputs layout (g, rows, T, E1): both contractions are then plain batched matmuls
    # on reshapes, with no broadcast copies (which dominated the per-step cost on small layers).
    kernel = grouped(factors[kernel_index], groups).transpose(2, 3)
    g, rows, taps, _ = kernel.shape
    steps = [("post", post), ("pre", pre)] if order == "post_first" else [("pre", pre), ("post", post)]
    for side, matrix in steps:
        if matrix is None:
            continue
        if side == "post":
            rows = matrix.shape[1]
            kernel = (matrix @ kernel.reshape(g, kernel.shape[1], -1)).reshape(g, rows, taps, -1)
        else:
            kernel = (kernel.reshape(g, rows * taps, -1) @ matrix).reshape(g, rows, taps, -1)
    # Flatten then view: standard strides even on size-1 dims. A 1x1 kernel whose size-1 dims kept
    # odd strides looked channels-last to conv, whose output then slowed every op downstream.
    return kernel.transpose(2, 3).reshape(-1).view(g * rows, -1, *kernel_size)


def compose_exact(factors: Sequence[Tensor], groups: int, kernel_index: int) -> Tensor:
    """:func:`compose` in float64, cast back to the dtype and device of the factors; no autograd."""
    with torch.no_grad():
        first = factors[0]
        weight = compose([f.detach().to(torch.float64) for f in factors], groups, kernel_index)
        return weight.to(dtype=first.dtype, device=first.device)
