"""What expanding and fusing a layer costs, counted from shapes before anything is allocated, and the
speeds of a device (measured once per process) that turn the counts into seconds.

The budget (:mod:`passes.budget`) plans an expansion with these; the linear algebra they count is in
:mod:`passes.linalg`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch

from .linalg import _full_precision, compute_dtype, draw_dtype, generator


@dataclasses.dataclass(frozen=True)
class Cost:
    """What factorizing one layer, and later fusing it back, takes; counted from shapes alone."""
    params: int  #: entries of the factors
    drawn: int  #: Gaussian entries drawn for the outer factors
    draw_macs: int  #: multiply-adds that orthonormalize them, in :func:`draw_dtype` (Householder QR counts double)
    combine: int  #: multiply-adds in :func:`compute_dtype` of the rest of :func:`factorize`
    fuse: int  #: multiply-adds in :func:`compute_dtype` of composing the factors back (:func:`compose_exact`)
    temporary: int  #: bytes of the largest temporaries of either, on the weight's device
    moved: tuple[int, int] = (0, 0)  #: entries converted or copied to a new layout: factorize, fuse
def _kernel_contraction(out: int, rows: int, cols: int, inp: int, taps: int, post: bool, pre: bool) -> tuple[int, int]:
    """Multiply-adds and intermediate entries of ``post (out x rows) @ kernel (rows x cols x taps) @ pre
    (cols x inp)`` in the cheaper order (see :func:`contraction_order`); either side may be absent."""
    if not pre:
        return (out * rows * taps * cols if post else 0), 0
    if not post:
        return rows * taps * cols * inp, 0
    post_first = (out * rows * taps * cols + out * taps * cols * inp, out * taps * cols)
    pre_first = (rows * taps * cols * inp + out * rows * taps * inp, rows * taps * inp)
    return min(post_first, pre_first)
def _product_macs(dims: Sequence[tuple[int, int]]) -> int:
    """Multiply-adds of the product of matrices of ``(rows, cols)`` applied first to last."""
    return sum(rows * cols * dims[0][1] for rows, cols in dims[1:])
def _orthonormal_macs(rows: int, cols: int) -> int:
    """GEMM-equivalent multiply-adds of :func:`orthonormal`: Cholesky QR's Gram matrix, factor and
    triangular solve, or Householder QR and forming Q, counted double (it runs at about half the speed)."""
    tall, wide = max(rows, cols), min(rows, cols)
    if tall >= 2 * wide and wide >= 64:
        return tall * wide * wide + wide ** 3 // 3 + tall * wide * wide // 2
    return 2 * 2 * (tall * wide * wide - wide ** 3 // 3)
def _compose_macs(dims: Sequence[tuple[int, int]], kernel_index: int, taps: int) -> tuple[int, int]:
    """Multiply-adds and largest intermediate of :func:`compose` for per-group factor sizes ``dims``: the
    products of the 1x1 factors, then post (O x E2) @ kernel (E2 x E1 x T) @ pre (E1 x I)."""
    pre, post = dims[:kernel_index], dims[kernel_index + 1:]
    rows, cols = dims[kernel_index]
    macs, middle = _kernel_contraction(post[-1][0] if post else rows, rows, cols, pre[0][1] if pre else cols, taps,
                                       bool(post), bool(pre))
    return macs + _product_macs(pre) + _product_macs(post), middle
def compose_cost(shapes: Sequence[Sequence[int]], groups: int, kernel_index: int) -> int:
    """Multiply-adds of :func:`compose` (and :func:`compose_exact`) for factors of these shapes."""
    dims = [(s[0] // groups, s[1]) for s in shapes]
    return groups * _compose_macs(dims, kernel_index, math.prod(shapes[kernel_index][2:]))[0]
def factorize_cost(weight_shape: Sequence[int], groups: int, shapes: Sequence[Sequence[int]], kernel_index: int,
                   dtype: torch.dtype, device: torch.device | str) -> Cost:
    """The :class:`Cost` of :func:`factorize` and of fusing the result, before anything is allocated."""
    o, i, taps = weight_shape[0] // groups, weight_shape[1], math.prod(weight_shape[2:])
    dims = [(s[0] // groups, s[1]) for s in shapes]
    pre, post = dims[:kernel_index], dims[kernel_index + 1:]
    e1 = pre[-1][0] if pre else i
    e2 = dims[kernel_index][0]
    outer = [d for j, d in enumerate(dims) if j != kernel_index]
    drawn = sum(r * c for r, c in outer)
    # held factors multiplied out, their Gram matrices, the Neumann terms, then the kernel Q^T W' P^T
    combine = _product_macs(pre) + _product_macs(post)
    terms = 2 if torch.finfo(dtype).eps > 1e-3 else 1  # as in _solve_gram
    if pre:
        combine += e1 * i * i + terms * i * i * o * taps
    if post:
        combine += o * o * e2 + terms * o * o * i * taps
    macs, middle = _kernel_contraction(e2, o, i, e1, taps, bool(post), bool(pre))
    combine += macs
    fuse, fuse_middle = _compose_macs(dims, kernel_index, taps)
    precise = compute_dtype(device).itemsize
    params = sum(math.prod(s) for s in shapes) // groups  # per group, like the rest
    factorize_bytes = (2 * draw_dtype(dtype).itemsize * max((r * c for r, c in outer), default=0)
                       + precise * (drawn + 2 * o * i * taps + i * i + o * o + middle + e2 * e1 * taps)
                       + dtype.itemsize * e2 * e1 * taps)
    fuse_bytes = precise * (params + fuse_middle + o * i * taps)
    # casts to and from the compute dtype, and the kernel's two changes of layout in compose
    kernel = e2 * e1 * taps
    moved = (drawn + 2 * o * i * taps + 3 * kernel + middle, params + kernel + fuse_middle + 2 * o * i * taps)
    return Cost(params=groups * params, drawn=groups * drawn,
                draw_macs=groups * sum(_orthonormal_macs(r, c) for r, c in outer),
                combine=groups * combine, fuse=groups * fuse, temporary=groups * max(factorize_bytes, fuse_bytes),
                moved=(groups * moved[0], groups * moved[1]))
@dataclasses.dataclass(frozen=True)
class Rates:
    """Speeds of one device, measured by :func:`rates`: Gaussian entries drawn per second, and matrix
    product multiply-adds per second in the draw dtype and in the compute dtype."""
    draw: float
    draw_macs: float
    combine: float
    move: float = math.inf  #: entries per second copied to a new layout, in the compute dtype
    #: seconds per layer besides the arithmetic (graph rewrite, small tensors, Python): expand, fuse
    overhead: tuple[float, float] = (6e-3, 2e-3)

    def seconds(self, cost: Cost) -> tuple[float, float]:
        """Estimated seconds to factorize a layer of this cost, and to fuse it back."""
        return (cost.drawn / self.draw + cost.draw_macs / self.draw_macs + cost.combine / self.combine
                + cost.moved[0] / self.move + self.overhead[0],
                cost.fuse / self.combine + cost.moved[1] / self.move + self.overhead[1])
def rates_for(device: torch.device | str, dtype: torch.dtype, work: float) -> Rates:
    """:func:`rates`, or :data:`NOMINAL_RATES` when ``work`` multiply-adds are too few (under 2e9, a
    fraction of a second) to be worth measuring the device."""
    return rates(device, dtype) if work >= 2e9 or torch.device(device).type == "meta" else NOMINAL_RATES
#: what :func:`rates` assumes without measuring: a slow CPU core (for work too small to be worth a measurement)
NOMINAL_RATES = Rates(draw=5e7, draw_macs=5e9, combine=2.5e9, move=2e8)
_RATES: dict[tuple, Rates] = {}
def rates(device: torch.device | str, dtype: torch.dtype = torch.float32) -> Rates:
    """The :class:`Rates` of ``device`` for weights of ``dtype``, measured once per process (and CPU
    thread count) in a few hundredths of a second: Gaussian draws, one matrix product in each dtype
    (512 wide on a CPU, 2048 on an accelerator: below the speed of the largest layers, so estimates err
    long), and a transposing copy.  The meta device computes nothing: only the overhead counts there."""
    device = torch.device(device)
    if device.type == "meta":
        return Rates(math.inf, math.inf, math.inf)
    if device.index is None and device.type != "cpu":
        device = torch.empty(0, device=device).device  # the current device's index
    draw, precise = draw_dtype(dtype), compute_dtype(device)
    key = (device, draw, precise, torch.get_num_threads() if device.type == "cpu" else 0)
    if key not in _RATES:
        module = getattr(torch, device.type, None)
        sync = (lambda: module.synchronize(device)) if hasattr(module, "synchronize") else (lambda: None)

        def best(fn) -> float:
            times = []
            for _ in range(3):  # the first call also pays for any lazy initialization
                sync()
                began = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - began)
            return max(min(times), 1e-9)

        with torch.no_grad(), _full_precision(device):
            source = generator(0, device)
            count, width = 2 ** 20, 512 if device.type == "cpu" else 2048
            drawn = count / best(lambda: torch.randn(count, generator=source, dtype=draw, device=device))
            square = torch.randn(width, width, generator=source, dtype=draw, device=device)
            draw_macs = width ** 3 / best(lambda: square @ square)
            square = square.to(precise)
            combine = width ** 3 / best(lambda: square @ square)
            block = torch.randn(count, generator=source, dtype=draw, device=device).to(precise).view(-1, 1024)
            move = count / best(lambda: block.mT.contiguous())
        _RATES[key] = Rates(drawn, draw_macs, combine, move)
    return _RATES[key]
