import pytest
import torch
import torch.nn.functional as F

from fxlop.verify import relative_error
from fxlop.passes import linalg

from conftest import FP64_RTOL


def _chain_apply(x, factors, kernel_index, groups, conv):
    """Apply a chain op by op, the slow, obvious way."""
    for i, factor in enumerate(factors):
        x = conv(x, factor, groups=groups, padding="same" if i == kernel_index else 0)
    return x


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
@pytest.mark.parametrize("groups,cin,cout", [(1, 3, 5), (2, 4, 6), (4, 4, 8), (6, 6, 6)])
@pytest.mark.parametrize("expansion", [1, 1.5, 4])
def test_factorize_product_is_the_weight(depth, groups, cin, cout, expansion):
    weight = torch.randn(cout, cin // groups, 3, 3, dtype=torch.float64)
    shapes, kernel_index = linalg.chain_shapes(weight.shape, groups, expansion, depth)
    factors = linalg.factorize(weight, groups, shapes, kernel_index, torch.Generator().manual_seed(1))
    assert [tuple(f.shape) for f in factors] == [tuple(s) for s in shapes]
    assert relative_error(linalg.compose(factors, groups, kernel_index), weight) < FP64_RTOL
    # the chain applied op by op computes what the original weight computes
    x = torch.randn(2, cin, 7, 7, dtype=torch.float64)
    expected = F.conv2d(x, weight, groups=groups, padding="same")
    assert relative_error(_chain_apply(x, factors, kernel_index, groups, F.conv2d), expected) < FP64_RTOL


def test_chain_shapes_widths_and_kernel_position():
    shapes, kernel_index = linalg.chain_shapes((8, 3, 3, 3), 1, 4, 3)
    assert kernel_index == 1
    assert shapes == [(12, 3, 1, 1), (32, 12, 3, 3), (8, 32, 1, 1)]
    shapes, kernel_index = linalg.chain_shapes((10, 6), 1, 2, 3)
    assert shapes == [(12, 6), (20, 12), (10, 20)]
    # depthwise: per-group widths
    shapes, _ = linalg.chain_shapes((16, 1, 3, 3), 8, 4, 3)
    assert shapes == [(32, 1, 1, 1), (64, 4, 3, 3), (16, 8, 1, 1)]


@pytest.mark.parametrize("rows,cols", [(8, 3), (3, 8), (5, 5)])
def test_orthonormal(rows, cols):
    q = linalg.orthonormal(rows, cols, torch.Generator().manual_seed(0), batch=3)
    assert q.shape == (3, rows, cols)
    gram = q.mT @ q if rows >= cols else q @ q.mT
    assert torch.allclose(gram, torch.eye(min(rows, cols), dtype=torch.float64).expand(3, -1, -1), atol=1e-12)
    assert not torch.allclose(q[0], q[1])  # independent draws


def test_outer_factors_are_dense_not_padded_identities():
    weight = torch.randn(4, 4, 3, 3)
    shapes, kernel_index = linalg.chain_shapes(weight.shape, 1, 4, 3)
    factors = linalg.factorize(weight, 1, shapes, kernel_index)
    for factor in factors:
        # an identity padded with zeros would leave whole rows of zeros
        assert (factor.abs().flatten(1).sum(1) > 0).all()
        assert (factor != 0).float().mean() > 0.99


@pytest.mark.parametrize("order", ["post_first", "pre_first"])
def test_contraction_orders_agree(order):
    factors = [torch.randn(12, 3, 1, 1, dtype=torch.float64), torch.randn(20, 6, 5, 5, dtype=torch.float64),
               torch.randn(10, 10, 1, 1, dtype=torch.float64)]
    reference = torch.einsum("goe,gefk,gfi->goik", linalg.grouped(factors[2], 2)[..., 0],
                             linalg.grouped(factors[1], 2), linalg.grouped(factors[0], 2)[..., 0])
    composed = linalg.compose(factors, 2, 1, order)
    assert composed.is_contiguous()
    assert relative_error(composed, linalg.ungrouped(reference, (5, 5))) < FP64_RTOL


@pytest.mark.parametrize("order", ["post_first", "pre_first"])
@pytest.mark.parametrize("kernel", [1, 3])
def test_composed_kernel_has_standard_strides(order, kernel):
    # conv picks its output memory format from the weight's strides, size-1 dims included: a 1x1
    # kernel with channels-last-looking strides made the whole downstream graph channels-last
    shapes, kernel_index = linalg.chain_shapes((6, 4, kernel, kernel), 2, 4, 3)
    factors = [torch.randn(shape) for shape in shapes]
    composed = linalg.compose(factors, 2, kernel_index, order)
    assert composed.stride() == torch.empty(composed.shape).stride()
    assert F.conv2d(torch.randn(2, 8, 5, 5), composed, groups=2).is_contiguous()


def test_contraction_order_counts_multiply_adds():
    # composing the kernel with the narrow end first is cheaper: 16,384 vs 270,336 multiply-adds
    narrow_in = [(64, 2, 1, 1), (64, 64, 3, 3), (64, 64, 1, 1)]
    assert linalg.contraction_order(narrow_in, 1, 1) == "pre_first"
    narrow_out = [(64, 64, 1, 1), (64, 64, 3, 3), (2, 64, 1, 1)]
    assert linalg.contraction_order(narrow_out, 1, 1) == "post_first"


def test_compose_exact_is_float64_and_cast_back():
    weight = torch.randn(6, 5, 3, dtype=torch.float32)
    shapes, kernel_index = linalg.chain_shapes(weight.shape, 1, 4, 3)
    factors = linalg.factorize(weight, 1, shapes, kernel_index)
    assert all(f.dtype == torch.float32 for f in factors)
    exact = linalg.compose_exact(factors, 1, kernel_index)
    assert exact.dtype == torch.float32
    in_float64 = linalg.compose([f.double() for f in factors], 1, kernel_index)
    assert torch.equal(exact, in_float64.float())


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_balanced_factors_share_one_spectral_norm(depth):
    weight = 0.2 * torch.randn(6, 2, 3, 3, dtype=torch.float64)
    shapes, kernel_index = linalg.chain_shapes(weight.shape, 2, 4, depth)
    factors = linalg.factorize(weight, 2, shapes, kernel_index, torch.Generator().manual_seed(0), balanced=True)
    assert relative_error(linalg.compose(factors, 2, kernel_index), weight) < FP64_RTOL
    s = torch.linalg.matrix_norm(linalg.grouped(weight, 2).flatten(2), ord=2).max()
    for factor in factors:
        norm = torch.linalg.matrix_norm(linalg.grouped(factor, 2).flatten(2), ord=2).max()
        assert norm.item() == pytest.approx(s.item() ** (1 / depth), rel=1e-9)
