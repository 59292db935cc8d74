"""Linear algebra of linear over-parameterization, apart from any graph surgery.

A conv weight ``(O, I/g, *k)`` is handled as ``g`` blocks of shape ``(O/g, I/g, T)`` with
``T = prod(k)`` taps; a linear weight ``(O, I)`` is one block with ``T = 1``.  A *chain* is a list of
factor weights, applied first to last, in which only the factor at ``kernel_index`` may have a
spatial kernel; every other factor is a 1x1 (or linear) map.  The chain's end-to-end weight is,
per group and per tap, ``post @ kernel[tap] @ pre`` with ``pre``/``post`` the products of the 1x1
factors before/after the kernel.

Everything runs on the weight's device: random factors are drawn there with a generator that lives
there (:func:`generator`), and weights are combined in :func:`compute_dtype` (float64 where the
device has it).  What the work costs is estimated in :mod:`passes.cost`.
"""
from __future__ import annotations

import contextlib
import math
import zlib
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


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype in which weights are combined on ``device``: float64, or float32 on Apple's MPS, which
    has no float64.  There a chain's end-to-end weight matches to float32 roundoff of the combination
    (about ``1e-6`` relative for layers a few thousand wide) instead of ``1e-7``."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def draw_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which the random outer factors are drawn for a weight of ``dtype``: float64 for
    float64 weights, float32 otherwise (8x cheaper to draw than float64 on a CPU, and exactness does not
    depend on it: the kernel factor is solved from the factors as they are stored)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def generator(seed: int, device: torch.device | str, key: str = "") -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` seeded from ``seed`` and ``key`` (a layer's qualified name).

    Seeding per layer makes a layer's factors depend only on the seed, its name, its shapes and the
    device, not on which other layers are expanded.  The same seed gives the same factors on the same
    device type (CPU and CUDA generators differ, so a CUDA expansion is reproducible on CUDA, not equal
    to the CPU one).  ``None`` on the meta device, where nothing is drawn.
    """
    device = torch.device(device)
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)


def orthonormal(rows: int, cols: int, generator: torch.Generator | None = None, batch: int = 1, *,
                dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """``batch`` ``rows x cols`` matrices with orthonormal columns (rows >= cols) or rows.

    Drawn from the Haar measure, on ``device`` (default: the generator's, else torch's default device)
    in ``dtype``: the Q of the QR decomposition of Gaussian matrices whose R has a positive diagonal.
    ``generator`` must live on ``device``.  Returns shape ``(batch, rows, cols)``.

    Matrices at least twice as tall as wide (and 64 wide) take Cholesky QR, ``Q = G R^-1`` with
    ``R^T R = G^T G``: the same Q, from matrix products, about twice as fast on a CPU as Householder
    QR.  It is orthonormal to ``cond(G)^2`` units of roundoff, and such a Gaussian is well conditioned
    (``cond(G) <~ (sqrt(m) + sqrt(n)) / (sqrt(m) - sqrt(n)) <= 6``); others take Householder QR.
    """
    if device is None and generator is not None:
        device = generator.device
    tall, wide = max(rows, cols), min(rows, cols)
    gaussian = torch.randn(batch, tall, wide, generator=generator, dtype=dtype, device=device)
    q = None
    if tall >= 2 * wide and wide >= 64:
        factor, info = torch.linalg.cholesky_ex(gaussian.mT @ gaussian)
        if gaussian.device.type == "meta" or not info.any():
            q = torch.linalg.solve_triangular(factor.mT, gaussian, upper=True, left=False)
    if q is None:
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)
    return q if rows >= cols else q.transpose(-2, -1)


def factorize(weight: Tensor, groups: int, shapes: Sequence[Sequence[int]], kernel_index: int,
              generator: torch.Generator | None = None, balanced: bool = False) -> list[Tensor]:
    """Factors of the given shapes whose chain product equals ``weight``, on its device and in its dtype.

    The 1x1 factors are random orthonormal (columns before the kernel, rows after it; drawn in
    :func:`draw_dtype` on the weight's device with ``generator``, which must live there) and are cast to
    the weight's dtype: those are the factors the model holds.  With ``P``, ``Q`` the products of the
    held factors before and after the kernel, the kernel factor is, per tap,
    ``Q^+ W P^+ = Q^T (Q Q^T)^-1 W (P^T P)^-1 P^T``, computed in :func:`compute_dtype` (float64), so that
    ``Q K P = W`` holds to that precision whatever roundoff the cast left in the outer factors
    (``Q^+ = Q^T`` for exactly orthonormal ones); ``K`` is then rounded once to the weight's dtype.
    Every factor is dense and random, so every one of them receives gradient (zero-padded identities
    would leave most entries dead).  On the meta device the same computation yields meta factors.

    ``balanced``: scale the outer factors to the spectral norm ``s^(1/d)`` of a ``d``-factor chain,
    ``s`` the spectral norm of ``W`` (as ``O x I*T`` per group), so that every factor has it, instead
    of 1 for the outer factors and ``s`` for the kernel (the scale balance of Arora et al. 2018).
    """
    device, dtype = weight.device, weight.dtype
    if generator is not None and (generator.device.type, generator.device.index or 0) != (device.type, device.index or 0):
        raise ValueError(f"factorize was given a generator on {generator.device} for a weight on {device}: the "
                         f"factors are drawn where the weight lives (see passes.linalg.generator)")
    with _full_precision(device):
        return _factorize(weight, groups, shapes, kernel_index, generator, balanced)


def _factorize(weight: Tensor, groups: int, shapes: Sequence[Sequence[int]], kernel_index: int,
               generator: torch.Generator | None, balanced: bool) -> list[Tensor]:
    device, dtype = weight.device, weight.dtype
    precise = compute_dtype(device)
    blocks = grouped(weight.detach().to(precise), groups)  # (g, O, I, T)
    scale = 1.0
    if balanced and device.type != "meta":
        norm = torch.linalg.matrix_norm(blocks.reshape(groups, blocks.shape[1], -1), ord=2).max().item()
        if norm > 0:
            scale = norm ** (1 / len(shapes))
    held = {}  # index -> the outer factor as the model will hold it, (g, rows, cols)
    for index, shape in enumerate(shapes):
        if index != kernel_index:
            drawn = orthonormal(shape[0] // groups, shape[1], generator, groups, dtype=draw_dtype(dtype), device=device)
            held[index] = (drawn * scale if scale != 1.0 else drawn).to(dtype)
    pre = _chain_product([held[i].to(precise) for i in range(kernel_index)])  # (g, E1, I)
    post = _chain_product([held[i].to(precise) for i in range(kernel_index + 1, len(shapes))])  # (g, O, E2)

    # W' = (Q Q^T)^-1 W (P^T P)^-1 per tap; then the kernel Q^T W' P^T is itself a chain (P^T, then W',
    # then Q^T): compose it like any other
    g, o, i, taps = blocks.shape
    if pre is not None:  # the Gram matrix is symmetric positive definite, and W M^-1 = (M^-1 W^T)^T
        blocks = _solve_gram(pre.mT @ pre, blocks.permute(0, 2, 1, 3).reshape(g, i, o * taps), dtype)
        blocks = blocks.reshape(g, i, o, taps).permute(0, 2, 1, 3)
    if post is not None:
        blocks = _solve_gram(post @ post.mT, blocks.reshape(g, o, i * taps), dtype).reshape(g, o, i, taps)
    ones = (1,) * (weight.dim() - 2)
    chain = [ungrouped(pre.mT.unsqueeze(-1), ones)] if pre is not None else []
    chain.append(ungrouped(blocks.contiguous(), weight.shape[2:]))
    if post is not None:
        chain.append(ungrouped(post.mT.unsqueeze(-1), ones))
    kernel = compose(chain, groups, int(pre is not None)).to(dtype)
    return [(kernel if index == kernel_index else ungrouped(held[index].unsqueeze(-1), shape[2:])).contiguous()
            for index, shape in enumerate(shapes)]


def _solve_gram(gram: Tensor, rhs: Tensor, dtype: torch.dtype) -> Tensor:
    """``gram^-1 rhs`` for the Gram matrix of factors held in ``dtype`` that are orthonormal up to a scale
    and that dtype's roundoff: ``gram = c (I + E)`` with ``||E||`` about 1e-6 (float32), 6e-4 (float16),
    5e-3 (bfloat16), so the Neumann series ``(I + E)^-1 = I - E + E^2 - ...`` converges at once.  One
    term leaves ``||E||^2`` (1e-12 in float32), two ``||E||^3`` for bfloat16: far below the roundoff of
    the kernel in that dtype.  Matrix products only (no factorization), and no value leaves the device."""
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1)[:, None, None]
    deviation = gram / scale
    deviation.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    result = term = rhs
    for _ in range(2 if torch.finfo(dtype).eps > 1e-3 else 1):
        term = -(deviation @ term)
        result = result + term
    return result / scale


def _chain_product(matrices: Sequence[Tensor]) -> Tensor | None:
    """``m[-1] @ ... @ m[0]`` for batched ``(g, rows, cols)`` matrices applied first to last."""
    product = None
    for matrix in matrices:
        product = matrix if product is None else matrix @ product
    return product


@contextlib.contextmanager
def _full_precision(device: torch.device):
    """float32 matrix products at full precision (no TF32) and no autocast on ``device``, as exact
    factors need: under a caller's bf16 autocast the float32 products would run in bf16."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        if torch.amp.is_autocast_available(device.type):
            with torch.autocast(device.type, enabled=False):
                yield
        else:
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


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


def compose_many(chains: Sequence[Sequence[Tensor]], groups: int, kernel_index: int,
                 order: str | None = None) -> tuple[Tensor, ...]:
    """:func:`compose` of several chains whose factors have the same shapes, dtype and device, with one
    set of batched matmuls: the chains' factors concatenated along their output rows are one chain of
    ``groups * len(chains)`` groups, each chain a block of it (the same products per block).  Chains
    that differ in any of those (a model split over devices after it was expanded) compose one by one."""
    first = chains[0]
    if len(chains) == 1 or any(len(chain) != len(first) or any(
            f.shape != g.shape or f.dtype != g.dtype or f.device != g.device for f, g in zip(chain, first))
            for chain in chains[1:]):
        return tuple(compose(chain, groups, kernel_index, order) for chain in chains)
    kernels = compose([torch.cat(column) for column in zip(*chains)], groups * len(chains), kernel_index, order)
    return kernels.split(kernels.shape[0] // len(chains))


def compose_exact(factors: Sequence[Tensor], groups: int, kernel_index: int) -> Tensor:
    """:func:`compose` in :func:`compute_dtype` (float64), cast back to the dtype and device of the
    factors; no autograd."""
    first = factors[0]
    with torch.no_grad(), _full_precision(first.device):
        weight = compose([f.detach().to(compute_dtype(first.device)) for f in factors], groups, kernel_index)
        return weight.to(dtype=first.dtype, device=first.device)
