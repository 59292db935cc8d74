"""LOP's effect on the optimizer (passes.dynamics) and the optimizer groups built on it (fxlop.param_groups)."""
import pytest
import torch
import torch.nn as nn

import fxlop
from fxlop.errors import FxlopError
from fxlop.passes import linalg
from fxlop.passes.dynamics import factor_gains, gain_range, preconditioner
from fxlop.passes.expanded import ExpandedLayer


def _layer(module, **options) -> ExpandedLayer:
    return fxlop.expand(nn.Sequential(module), **options).get_submodule("0")


def _sgd_step_change(layer: ExpandedLayer, gradient: torch.Tensor, rates, step: float) -> torch.Tensor:
    """(W(factors - step * rate_k * dL/dF_k) - W) / step for the loss <gradient, W>, in float64."""
    factors = [f.detach().double().requires_grad_() for f in layer.factors]
    weight = linalg.compose(factors, layer.groups, layer.kernel_index)
    grads = torch.autograd.grad((weight * gradient).sum(), factors)
    moved = [f - step * r * g for f, r, g in zip(factors, rates, grads)]
    return (linalg.compose(moved, layer.groups, layer.kernel_index) - weight).detach() / step


def test_linear_preconditioner_is_the_closed_form():
    torch.manual_seed(3)
    linear = nn.Linear(6, 5)
    layer = _layer(linear, expansion=2)
    g = torch.randn(5, 6, dtype=torch.float64)
    # learning rates (A, B, C) = (0.3, 1, 0.7)
    got = preconditioner(list(layer.factors), [0.3, 1.0, 0.7], 1, layer.kernel_index)(g)
    # 1. The first-order change for the factors as held, A (in), B, C (out) in float64, whatever their
    #    orthonormality: lr_C G (BA)^T BA + lr_B C C^T G A^T A + lr_A CB (CB)^T G.  Both sides are a few
    #    float64 products of O(1) matrices, so they agree to float64 roundoff.
    a, b, c = (f.detach().double() for f in layer.factors)
    held = 0.7 * g @ (b @ a).T @ (b @ a) + 1.0 * c @ c.T @ g @ a.T @ a + 0.3 * (c @ b) @ (c @ b).T @ g
    assert torch.allclose(got, held, rtol=1e-12, atol=1e-12 * g.abs().max().item())
    # 2. The closed form G + 0.7 G W^T W + 0.3 W W^T G assumes exactly orthonormal outer factors and B in
    #    their ranges.  The fp32 factors miss that by a defect d of a few ulp, which depends on the BLAS
    #    kernels of the machine (1.6e-7 on AVX-512, 2.2e-7 here).  Each term then moves by at most
    #    ~(2d + d^2) lr ||G|| (the B term) or ~(3d + d^2) lr ||W||^2 ||G|| (the outer ones), spectral norms.
    w = c @ b @ a  # the weight the factors hold (fp32 rounding of the layer's weight does not enter)
    expected = g + 0.7 * g @ w.T @ w + 0.3 * w @ w.T @ g

    def norm(m):
        return torch.linalg.matrix_norm(m, ord=2).item()

    defect = max(norm(c @ c.T - torch.eye(5, dtype=w.dtype)), norm(a.T @ a - torch.eye(6, dtype=w.dtype)),
                 norm(b @ a - c.T @ w) / norm(w), norm(c @ b - w @ a.T) / norm(w))
    assert defect < 1e-5  # a few fp32 ulp
    defect = max(defect, torch.finfo(torch.float32).eps)  # the fp32 factors are never better than their ulp
    bound = 1.1 * defect * norm(g) * (2 * 1.0 + 3 * (0.7 + 0.3) * norm(w) ** 2)
    assert (got - expected).abs().max().item() <= bound
    # its spectrum in W's singular basis: 1 + 0.7 s_j^2 + 0.3 s_i^2 (s_6 = 0 for the sixth input direction)
    s = torch.linalg.svdvals(w)
    s_out, s_in = s, torch.cat([s, s.new_zeros(1)])
    spectrum = 1 + 0.7 * s_in[None, :] ** 2 + 0.3 * s_out[:, None] ** 2
    low, high = gain_range(preconditioner(list(layer.factors), [0.3, 1.0, 0.7], 1, 1), (5, 6), iterations=400)
    assert low == pytest.approx(spectrum.min().item(), rel=1e-3)
    assert high == pytest.approx(spectrum.max().item(), rel=1e-3)


@pytest.mark.parametrize("module,options", [
    (nn.Conv2d(4, 6, 3, padding=1, groups=2), {"expansion": 2}),
    (nn.Conv1d(3, 5, 5, stride=2), {"expansion": 1.5}),
    (nn.Conv2d(3, 4, 3), {"expansion": 2, "depth": 4}),
    (nn.Linear(4, 3), {"expansion": 2, "init": "balanced"}),
])
def test_preconditioner_is_the_first_order_change_of_an_sgd_step(module, options):
    layer = _layer(module, **options)
    gradient = torch.randn(module.weight.shape, dtype=torch.float64)
    rates = [0.5 + 0.25 * k for k in range(layer.depth)]
    predicted = preconditioner(list(layer.factors), rates, layer.groups, layer.kernel_index)(gradient)
    # the step's second-order terms shrink linearly with the step size
    errors = [(_sgd_step_change(layer, gradient, rates, step) + predicted).norm() / predicted.norm()
              for step in (1e-3, 1e-4)]
    assert errors[1] < 1e-3 and errors[1] < errors[0] / 5


def test_factor_gains_of_orthonormal_factors_are_the_weight_norms():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    layer = _layer(conv, expansion=2)
    blocks = conv.weight.detach().double().reshape(2, 3, 2, 9)  # (groups, O/g, I/g, taps)
    horizontal = torch.linalg.matrix_norm(blocks.reshape(2, 3, 18), ord=2).max().item() ** 2
    vertical = torch.linalg.matrix_norm(blocks.permute(0, 1, 3, 2).reshape(2, 27, 2), ord=2).max().item() ** 2
    # the pre factor's term maps through the taps to the outputs, the post factor's from the inputs
    assert factor_gains(list(layer.factors), 2, layer.kernel_index) == pytest.approx([vertical, 1.0, horizontal],
                                                                                    rel=1e-5)


def test_factor_gains_bound_each_factors_own_term():
    layer = _layer(nn.Conv2d(3, 4, 3), expansion=2, init="balanced")
    gains = factor_gains(list(layer.factors), 1, layer.kernel_index)
    for k, gain in enumerate(gains):
        rates = [1.0 if j == k else 0.0 for j in range(layer.depth)]
        _, high = gain_range(preconditioner(list(layer.factors), rates, 1, layer.kernel_index),
                             layer.fused_weight().shape, iterations=300)
        assert high == pytest.approx(gain, rel=1e-3)


class _Owner(nn.Module):
    """An expanded conv next to a user parameter whose name contains 'factors'."""

    def __init__(self):
        super().__init__()
        self.body = fxlop.expand(nn.Sequential(nn.Conv2d(2, 3, 3)), trace=False)
        self.factors = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.body(x) * self.factors[:, None, None]


def test_param_groups_find_factors_by_identity():
    model = _Owner()
    layer = model.body[0]
    groups = fxlop.param_groups(model, lr=0.1, weight_decay=1e-3, factor_lr_scale=0.5, factor_weight_decay=0.0)
    by_name = {g["name"]: g for g in groups}
    assert {id(p) for p in by_name["factors"]["params"]} == {id(f) for f in layer.factors}
    assert by_name["factors"]["lr"] == pytest.approx(0.05) and by_name["factors"]["weight_decay"] == 0.0
    others = {id(p) for p in by_name["others"]["params"]}
    assert id(model.factors) in others and id(layer.bias) in others
    assert (by_name["others"]["lr"], by_name["others"]["weight_decay"]) == (0.1, 1e-3)
    torch.optim.AdamW(groups)  # any optimizer takes them
    plain = fxlop.param_groups(nn.Linear(2, 2), lr=0.1, weight_decay=0.0)
    assert [g["name"] for g in plain] == ["others"]


def test_normalized_param_groups_divide_by_the_gains():
    model = fxlop.expand(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(2, 5)), expansion=2)
    groups = fxlop.param_groups(model, lr=0.2, weight_decay=0.0, factor_lr_scale=0.3, factor_lr="normalized")
    rates = {g["name"]: g["lr"] for g in groups}
    for name in ("0", "2"):
        layer = model.get_submodule(name)
        gains = factor_gains(list(layer.factors), layer.groups, layer.kernel_index)
        for k, gain in enumerate(gains):
            scale = 1.0 if k == layer.kernel_index else 0.3  # the kernel factor moves W like plain fine-tuning
            assert rates[f"{name}.factors.{k}"] == pytest.approx(0.2 * scale / gain)
    # the first-order step of the product: gain exactly 1 from the kernel factor plus at most 0.3 per outer factor
    layer = model.get_submodule("0")
    multipliers = [rates[f"0.factors.{k}"] / 0.2 for k in range(layer.depth)]
    low, high = gain_range(preconditioner(list(layer.factors), multipliers, 1, layer.kernel_index),
                           layer.fused_weight().shape, iterations=300)
    assert 1.0 - 1e-6 <= low and high <= 1.6 + 1e-6


@pytest.mark.parametrize("options,message", [
    ({"factor_lr": "adaptive"}, "factor_lr must be one of"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"factor_lr_scale": -1.0}, "factor_lr_scale must be"),
])
def test_param_groups_refuse_bad_settings(options, message):
    settings = {"lr": 0.1, "weight_decay": 0.0, **options}
    with pytest.raises(FxlopError, match=message):
        fxlop.param_groups(nn.Linear(2, 2), **settings)


def test_gain_range_on_a_known_diagonal_operator():
    scales = torch.linspace(0.5, 3.0, 12, dtype=torch.float64).reshape(3, 4)
    low, high = gain_range(lambda x: scales * x, (3, 4), iterations=500)
    assert (low, high) == (pytest.approx(0.5, rel=1e-4), pytest.approx(3.0, rel=1e-4))
