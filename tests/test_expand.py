import copy
import pickle

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxlop
from fxlop.verify import relative_error
from fxlop.passes import ExpandedLayer, SkippedRecord, linalg

from conftest import FP32_RTOL, FP64_RTOL, FunctionalLayer

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_F = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
SPATIAL = {1: (11,), 2: (9, 10), 3: (5, 6, 7)}

BASE = dict(in_channels=4, out_channels=6, kernel_size=3)
# each entry changes the base conv in one respect (hypothesis covers the combinations)
CONV_OPTIONS = [
    {}, {"stride": 2}, {"padding": 1}, {"padding": "same"}, {"padding": "valid"},
    {"dilation": 2, "padding": 2}, {"groups": 2}, {"in_channels": 6, "out_channels": 12, "groups": 6},
    {"in_channels": 5, "out_channels": 5, "groups": 5, "padding": 1}, {"bias": False},
    {"kernel_size": 1}, {"kernel_size": 2, "padding": "same"},
    {"padding": 1, "padding_mode": "reflect"}, {"padding": 2, "padding_mode": "replicate", "stride": 2},
    {"padding": 1, "padding_mode": "circular", "groups": 2}, {"padding": "same", "padding_mode": "reflect"},
]


def _conv(dims, options):
    kwargs = {**BASE, **options}
    if dims > 1 and "stride" in options:
        kwargs["stride"] = (2,) + (1,) * (dims - 1)  # tuple strides too
    return CONV[dims](**kwargs)


def _input(module, batch=3):
    channels = module.in_channels if hasattr(module, "in_channels") else module.in_features
    spatial = SPATIAL[len(module.kernel_size)] if hasattr(module, "kernel_size") else ()
    return torch.randn(batch, channels, *spatial)


def _expanded_error(model, x, measured, name, origin="module", **options):
    gm = fxlop.expand(model, **options)
    report = fxlop.report(gm).expand
    assert [e.origin for e in report.expanded] == [origin], report
    with torch.no_grad():
        error = relative_error(gm(x), model(x))
    measured(name, error)
    return gm, error


@pytest.mark.parametrize("mode", ["online", "chain"])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("options", CONV_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "base")
def test_conv_module_expansion_is_exact(dims, options, mode, measured):
    conv = _conv(dims, options)
    _, error = _expanded_error(nn.Sequential(conv), _input(conv), measured, "expand fp32", mode=mode)
    assert error <= FP32_RTOL


@pytest.mark.parametrize("mode", ["online", "chain"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 5), (7, 2), (4, 4)])
def test_linear_module_expansion_is_exact(shape, bias, mode, measured):
    linear = nn.Linear(*shape, bias=bias)
    for x in (torch.randn(5, shape[0]), torch.randn(2, 3, shape[0])):  # any leading dims
        _, error = _expanded_error(nn.Sequential(linear), x, measured, "expand fp32", mode=mode)
        assert error <= FP32_RTOL


FUNCTIONAL_CASES = [
    (F.linear, (6, 4), {}),
    (F.conv1d, (6, 4, 3), {"stride": 2, "padding": 1}),
    (F.conv2d, (6, 2, 3, 3), {"groups": 2, "dilation": 2, "padding": "same"}),
    (F.conv2d, (6, 4, 3, 3), {}),
    (F.conv2d, (8, 1, 3, 3), {"groups": 4, "padding": (1, 0)}),
    (F.conv3d, (6, 4, 3, 3, 3), {"padding": "valid", "stride": (1, 2, 1)}),
]


@pytest.mark.parametrize("mode", ["online", "chain"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("function,shape,options", FUNCTIONAL_CASES)
def test_functional_expansion_is_exact(function, shape, options, bias, mode, measured):
    layer = FunctionalLayer(function, torch.randn(shape), torch.randn(shape[0]) if bias else None, **options)
    in_channels = shape[1] * options.get("groups", 1)
    spatial = SPATIAL[len(shape) - 2] if len(shape) > 2 else ()
    x = torch.randn(3, in_channels, *spatial)
    gm, error = _expanded_error(layer, x, measured, "expand fp32", origin="functional", mode=mode)
    assert error <= FP32_RTOL
    report = fxlop.report(gm).expand
    assert [e.name for e in report.expanded] == ["weight"]
    # the bias parameter of a functional call stays where it was
    assert ("bias" in dict(gm.named_parameters())) == bias


class TwoUses(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(4, 4, 1, 1))

    def forward(self, x):
        x = self.shared(torch.relu(self.shared(x)))
        return F.conv2d(x, self.weight) + F.conv2d(x.flip(-1), self.weight, stride=1)


@pytest.mark.parametrize("mode", ["online", "chain"])
def test_shared_module_and_weight_expanded_once_and_stay_shared(mode):
    model = TwoUses()
    x = torch.randn(2, 4, 6, 6)
    gm = fxlop.expand(model, mode=mode)
    report = fxlop.report(gm).expand
    assert {(e.name, e.call_sites) for e in report.expanded} == {("shared", 2), ("weight", 2)}
    assert sum(isinstance(m, ExpandedLayer) for m in gm.modules()) == 2
    with torch.no_grad():
        assert relative_error(gm(x), model(x)) <= FP32_RTOL
    # one set of factors: a change to them shows at both call sites
    fused = fxlop.fuse(gm)
    with torch.no_grad():
        gm.shared.factors[1].add_(0.1)
        assert relative_error(fxlop.fuse(gm)(x), gm(x)) <= FP32_RTOL
        assert relative_error(fused(x), gm(x)) > 1e-3


def test_modes_give_same_outputs_and_gradients():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    grads, outputs = {}, {}
    for mode in ("online", "chain"):
        gm = fxlop.expand(model, mode=mode, seed=3)
        out = gm(x)
        out.square().sum().backward()
        outputs[mode] = out.detach()
        grads[mode] = {n: p.grad for n, p in gm.named_parameters()}
    assert relative_error(outputs["chain"], outputs["online"]) <= FP64_RTOL
    assert grads["chain"].keys() == grads["online"].keys()
    for name in grads["online"]:
        assert relative_error(grads["chain"][name], grads["online"][name]) <= FP64_RTOL, name


@pytest.mark.parametrize("mode", ["online", "chain"])
def test_every_added_parameter_gets_gradient(mode):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    gm = fxlop.expand(model, mode=mode)
    gm(torch.randn(8, 3, 6, 6)).logsumexp(1).sum().backward()
    for name, param in gm.named_parameters():
        assert param.grad is not None, name
        # every entry moves: no dead rows or columns as with zero-padded identity factors
        assert (param.grad != 0).float().mean() > 0.95, name


def test_online_training_with_odd_batch_sizes():
    """A partial last batch (here 105, 7, 1) through the composed kernel's conv backward."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    gm = fxlop.expand(model, mode="online")
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    for batch in (128, 105, 7, 1):
        x, y = torch.randn(batch, 3, 16, 16), torch.randint(0, 10, (batch,))
        loss = F.cross_entropy(gm(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    for name, param in gm.named_parameters():
        assert torch.isfinite(param).all(), name


def test_composed_kernel_is_contiguous():
    gm = fxlop.expand(nn.Conv2d(4, 6, 3, groups=2))
    container = next(m for m in gm.modules() if isinstance(m, ExpandedLayer))
    assert container.compose(*container.factors).is_contiguous()


def test_report_and_parameter_counts():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 4, 2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 6, 6))  # materialize the lazy linear
    gm = fxlop.expand(model, expansion=2)
    report = fxlop.report(gm).expand
    assert [e.name for e in report.expanded] == ["0", "4"]
    assert report.skipped == (SkippedRecord(name="2", reason=report.skipped[0].reason),)
    assert "ConvTranspose2d" in report.skipped[0].reason
    assert report.params_before == sum(p.numel() for p in model.parameters())
    assert report.params_after == sum(p.numel() for p in gm.parameters())
    conv = report.expanded[0]
    # 1x1 (3 -> 6), 3x3 (6 -> 8), 1x1 (8 -> 4)
    assert conv.factor_shapes == ((6, 3, 1, 1), (8, 6, 3, 3), (4, 8, 1, 1))
    assert conv.params_after == 6 * 3 + 8 * 6 * 9 + 4 * 8


def test_include_exclude_by_glob_and_type():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3)), nn.Flatten(), nn.Linear(3, 2))
    names = lambda gm: [e.name for e in fxlop.report(gm).expand.expanded]  # noqa: E731
    assert names(fxlop.expand(model, include="0.*")) == ["0.0", "0.1"]
    assert names(fxlop.expand(model, include=[nn.Linear])) == ["2"]
    assert names(fxlop.expand(model, exclude=["0.0", nn.Linear])) == ["0.1"]
    skipped = fxlop.report(fxlop.expand(model, include=nn.Linear, exclude="2")).expand.skipped
    assert {s.name: s.reason for s in skipped}["2"] == "matched by exclude"
    with pytest.raises(fxlop.SelectionError, match="glob string or a module type"):
        fxlop.expand(model, include=[3])


def test_caller_model_is_not_mutated():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 4))
    before = copy.deepcopy(model.state_dict())
    modules_before = [type(m) for m in model.modules()]
    gm = fxlop.expand(model)
    fxlop.fuse(gm, fold_bn=True)
    assert [type(m) for m in model.modules()] == modules_before
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    traced = fx.symbolic_trace(model)
    fxlop.expand(traced)
    assert type(traced.get_submodule("0")) is nn.Conv2d


class _TensorConstant(nn.Module):
    """Makes a tensor in its forward: torch.fx stores it as a ``_tensor_constant`` attribute."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(x) * torch.tensor([1.0, 2.0, 3.0])


def test_tracing_adds_no_attribute_to_the_caller_model():
    model = _TensorConstant()
    attributes = set(vars(model))
    gm = fxlop.expand(model)
    assert set(vars(model)) == attributes
    # so a later trace of the caller's model names its constants as the expanded graph does
    assert fxlop.fuse(gm).state_dict().keys() == fx.symbolic_trace(model).state_dict().keys()


def test_expanding_twice_changes_nothing_more():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    for mode in ("online", "chain"):
        once = fxlop.expand(model, mode=mode)
        twice = fxlop.expand(once, mode=mode)
        assert fxlop.report(twice).expand.expanded == ()
        assert {s.reason for s in fxlop.report(twice).expand.skipped} == {"already expanded"}
        assert twice.state_dict().keys() == once.state_dict().keys()
        x = torch.randn(2, 3, 4, 4)
        with torch.no_grad():
            assert torch.equal(twice(x), once(x))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(self.gate(x))


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.proj(x)
        return x


def test_untraceable_module_is_named_and_can_be_made_a_leaf():
    model = Branchy()
    with pytest.raises(fxlop.TraceError, match=r"module 'gate' \(Gate\).*leaf_modules=\['gate'\]"):
        fxlop.expand(model)
    gm = fxlop.expand(model, leaf_modules=["gate"])
    assert [e.name for e in fxlop.report(gm).expand.expanded] == ["conv"]
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert relative_error(gm(x), model(x)) <= FP32_RTOL
    assert [e.name for e in fxlop.report(fxlop.expand(model, leaf_modules=[Gate])).expand.expanded] == ["conv"]


def test_max_params_guard():
    model = nn.Linear(64, 64)
    with pytest.raises(fxlop.ExpansionError, match=r"over max_params=10,000 .*'weight'"):
        fxlop.expand(model, max_params=10_000)
    assert fxlop.report(fxlop.expand(model, max_params=10**7)).expand.params_after <= 10**7


@pytest.mark.parametrize("bad", [dict(init="zeros"), dict(mode="fast"), dict(expansion=0.5), dict(expansion="4"), dict(depth=1),
                                 dict(depth=2.0), dict(max_params=-1), dict(pointwise_expansion=0.5),
                                 dict(pointwise_expansion=float("inf")), dict(pointwise_expansion=True),
                                 dict(pointwise_expansion="1")])
def test_bad_options_are_clear_errors(bad):
    with pytest.raises(fxlop.ExpansionError, match=next(iter(bad))):
        fxlop.expand(nn.Linear(2, 2), **bad)


class Widths(nn.Module):
    """A layer of each kind: spatial kernels (3x3, 1x3, depthwise) and single-tap ones (1x1 conv,
    kernel-1 Conv1d, linear, a product on a parameter)."""

    def __init__(self):
        super().__init__()
        self.kxk = nn.Conv2d(3, 4, 3, padding=1)
        self.one_by_three = nn.Conv2d(4, 4, (1, 3), padding=(0, 1))
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pointwise = nn.Conv2d(4, 6, 1)
        self.kernel_one = nn.Conv1d(6, 5, 1)
        self.linear = nn.Linear(5, 3)
        self.product = nn.Parameter(torch.randn(3, 2))

    def forward(self, x):
        x = self.pointwise(self.depthwise(self.one_by_three(self.kxk(x))))
        x = self.kernel_one(x.flatten(2)).mean(-1)
        return self.linear(x) @ self.product


SPATIAL_LAYERS = ["kxk", "one_by_three", "depthwise"]
POINTWISE_LAYERS = ["pointwise", "kernel_one", "linear", "product"]


@pytest.mark.parametrize("trace", [True, False])
@pytest.mark.parametrize("pointwise,expected", [("default", 1.0), (None, 4), (2, 2)])
def test_pointwise_layers_get_their_own_width(trace, pointwise, expected):
    torch.manual_seed(0)
    model = Widths()
    options = {} if pointwise == "default" else dict(pointwise_expansion=pointwise)
    gm = fxlop.expand(model, trace=trace, **options)
    report = fxlop.report(gm).expand
    widths = {e.name: e.expansion for e in report.expanded}
    pointwise_layers = POINTWISE_LAYERS if trace else POINTWISE_LAYERS[:-1]  # products need a graph
    assert widths == {**dict.fromkeys(SPATIAL_LAYERS, 4), **dict.fromkeys(pointwise_layers, expected)}
    assert report.options.pointwise_expansion == (1.0 if pointwise == "default" else pointwise)
    shapes = {e.name: e.factor_shapes for e in report.expanded}
    # hidden widths are r times the layer's own: (6, 4, 1, 1) -> 4r wide before, 6r wide after the middle factor
    assert [s[:2] for s in shapes["pointwise"]] == [(4 * expected, 4), (6 * expected, 4 * expected),
                                                    (6, 6 * expected)]
    assert shapes["kxk"][1][:2] == (16, 12)
    assert report.estimate.params == report.params_after == sum(p.numel() for p in gm.parameters())
    x = torch.randn(2, 3, 5, 5)
    assert fxlop.verify(model, gm, x) <= FP32_RTOL


def test_pointwise_width_one_trains_and_fuses_back_exactly():
    torch.manual_seed(0)
    model = Widths()
    gm = fxlop.expand(model)
    x = torch.randn(4, 3, 5, 5)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        gm(x).square().mean().backward()
        optimizer.step()
    fused = fxlop.fuse(gm)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert fxlop.verify(gm, fused, x) <= FP32_RTOL


@pytest.mark.parametrize("init", ["orthogonal", "balanced"])
@pytest.mark.parametrize("depth", [2, 3, 4])
@pytest.mark.parametrize("expansion", [1, 2.5])
def test_depth_width_and_init(depth, expansion, init, measured):
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    gm, error = _expanded_error(nn.Sequential(conv), _input(conv), measured, "expand fp32", depth=depth,
                                expansion=expansion, init=init)
    assert error <= FP32_RTOL
    assert len(fxlop.report(gm).expand.expanded[0].factor_shapes) == depth


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, FP64_RTOL), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_other_dtypes(dtype, rtol):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)).to(dtype)
    x = torch.randn(2, 3, 4, 4, dtype=dtype)
    gm = fxlop.expand(model)
    assert all(p.dtype == dtype for p in gm.parameters())
    with torch.no_grad():
        assert relative_error(gm(x), model(x)) <= rtol


def test_eval_mode_caches_the_composed_kernel_until_a_factor_changes():
    gm = fxlop.expand(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)))
    composer = gm.get_submodule("0.compose")
    factors = list(gm.get_submodule("0").factors)
    x = torch.randn(2, 3, 6, 6)
    gm.eval()
    with torch.no_grad():
        first = composer(*factors)
        assert composer(*factors) is first
        reference = gm(x)
        factors[1].mul_(2.0)  # what an optimizer step or load_state_dict does: in place
        assert composer(*factors) is not first
        assert relative_error(composer(*factors), 2 * first) <= FP32_RTOL
        assert not torch.equal(gm(x), reference)
    gm.train()
    with torch.no_grad():
        assert composer(*factors) is not composer(*factors)  # training: always composed afresh
    assert composer(*factors).requires_grad  # with autograd on, never a stale detached kernel
    gm.eval()
    with torch.no_grad():
        composer(*factors)
    assert composer.__getstate__()["_cache"] is None


def _cached_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    return fxlop.expand(model, mode="online", seed=seed).eval()


def _write_through_data(gm):
    factor = gm.get_submodule("0").factors[1]
    factor.data.copy_(factor.data * -2.0)  # writes through .data do not bump factor._version


def _assign_at_the_same_address(gm):
    # what a recycled allocation looks like to a cache keyed on (data_ptr, _version): the factor's
    # tensor is replaced (p.data = other keeps p's version counter) by one at the same address that
    # holds other values; made deterministic here by a second alias of the original storage
    factor = gm.get_submodule("0").factors[1]
    original = factor.data
    factor.data = original.clone()
    original.mul_(-2.0)  # bumps the alias's version counter, not the parameter's
    factor.data = original
    assert factor.data_ptr() == original.data_ptr()


def _load_state_dict(gm):
    gm.load_state_dict(_cached_model(seed=1).state_dict())


def _load_state_dict_assign(gm):
    gm.load_state_dict(_cached_model(seed=1).state_dict(), assign=True)


def _round_trip_through_half(gm):
    gm.half()
    gm.float()  # the factors now hold fp16-rounded values, in new (possibly recycled) storage


def _composed_afresh(layer):
    return linalg.compose(list(layer.factors), layer.groups, layer.kernel_index, layer.compose.order)


@pytest.mark.parametrize("update", [_write_through_data, _assign_at_the_same_address, _load_state_dict,
                                    _load_state_dict_assign, _round_trip_through_half])
def test_cached_kernel_is_never_stale(update):
    """Eval inference reuses the composed kernel only while the factors hold the bits it came from."""
    gm = _cached_model()
    layer = gm.get_submodule("0")
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        before = gm(x)
        kernel = layer.compose(*layer.factors)
        assert layer.compose(*layer.factors) is kernel  # cached
        update(gm)
        expected = _composed_afresh(layer)
        assert not torch.equal(expected, kernel)  # the update changed the layer
        assert torch.equal(layer.compose(*layer.factors), expected)
        after = gm(x)
    with torch.enable_grad():  # composed afresh, as in training
        fresh = gm(x).detach()
    assert torch.equal(after, fresh) and not torch.equal(after, before)


def test_kernel_cache_is_dropped_by_train_and_to():
    gm = _cached_model()
    composer = gm.get_submodule("0.compose")
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        gm(x)
    assert composer._cache is not None
    gm.train()
    assert composer._cache is None  # the copy of the factors is not held through training
    gm.eval()
    with torch.no_grad():
        gm(x)
    gm.to(torch.float64)
    assert composer._cache is None
    with torch.no_grad():
        assert gm(x.double()).dtype == torch.float64


def test_kernel_cache_holds_no_copy_of_large_factors(monkeypatch):
    from fxlop.passes import expanded

    gm = _cached_model()
    composer = gm.get_submodule("0.compose")
    size = sum(f.numel() * f.element_size() for f in gm.get_submodule("0").factors)
    x = torch.randn(1, 3, 6, 6)
    monkeypatch.setattr(expanded, "CACHE_MAX_BYTES", size - 1)
    with torch.no_grad():
        first = gm(x)
        assert composer._cache is None and torch.equal(gm(x), first)  # composed again, same result
    monkeypatch.setattr(expanded, "CACHE_MAX_BYTES", size)
    with torch.no_grad():
        gm(x)
    assert composer._cache is not None


def test_kernel_cache_under_inference_mode():
    gm = _cached_model()
    layer = gm.get_submodule("0")
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        first = gm(x)
    with torch.no_grad():
        assert torch.equal(gm(x), first)
        layer.factors[0].data.mul_(3.0)
        changed = gm(x)
    assert not torch.equal(changed, first)
    with torch.inference_mode():
        assert torch.equal(gm(x), changed)


class Untraceable(Branchy):
    def __init__(self):
        super().__init__()
        self.alias = self.conv
        self.tail = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 3, 1))

    def forward(self, x):
        return self.tail(self.alias(self.conv(self.gate(x))))


@pytest.mark.parametrize("mode", ["online", "chain"])
def test_expansion_without_tracing(mode, measured):
    """trace=False: control flow is fine, shared modules stay shared, Sequential order is kept."""
    model = Untraceable().eval()
    x = torch.randn(2, 3, 5, 5).abs()  # the gate's branch with its conv
    gm = fxlop.expand(model, trace=False, mode=mode)
    assert isinstance(gm.conv, ExpandedLayer) and gm.conv is gm.alias
    assert [type(m) for m in gm.tail] == [ExpandedLayer, nn.ReLU, ExpandedLayer]
    with torch.no_grad():
        assert measured("expand fp32", relative_error(gm(x), model(x))) <= FP32_RTOL
        for param in gm.parameters():
            param.add_(0.05 * torch.randn_like(param))
    fused = fxlop.fuse(gm)
    assert fused.conv is fused.alias and type(fused.conv) is nn.Conv2d
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        assert relative_error(fused(x), gm(x)) <= FP32_RTOL
    names = [e.name for e in fxlop.report(gm).expand.expanded]
    assert names == ["gate.proj", "conv", "tail.0", "tail.2"]


# --- one expansion driver (issue 14) ----------------------------------------------------------------

class Reads(nn.Module):
    """Model code that reads layers' weights besides calling them (dtype, a value, the bias)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2, bias=False)

    def forward(self, x):
        x = self.proj(x.to(self.proj.weight.dtype)).mean((2, 3))
        return self.head(self.fc(x) + self.fc.bias) + (self.fc.weight ** 2).sum()


def _hooked_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.LazyLinear(3))
    model[2].register_forward_hook(lambda module, args, out: out + 1)
    return model


def _tied_model():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    model[2].weight = model[0].weight
    return model


def _decisions(report):
    """What the driver decided, without what only one back end can know (call sites, timings)."""
    keys = ("name", "type", "origin", "weight_shape", "transposed_weight", "expansion", "factor_shapes",
            "params_before", "params_after")
    return {"expanded": [{k: getattr(e, k) for k in keys} for e in report.expanded],
            "skipped": {s.name: s.reason for s in report.skipped}, "reduced": report.reduced,
            "params": (report.params_before, report.params_after), "estimate": report.estimate.params}


SAME_REPORT = [
    ("convs, BatchNorm, linear", lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2, padding="same"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)), {}),
    ("hooks, lazy and subclassed layers", lambda: nn.Sequential(_hooked_model(), nn.ConvTranspose2d(3, 3, 1)), {}),
    ("tied weights", _tied_model, {}),
    ("weight reads", Reads, {}),
    ("include, exclude", Reads, {"include": ["proj", nn.Linear], "exclude": "head"}),
    ("wide-layer policy", lambda: nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4)),
     {"max_layer_params": 3000}),
    ("already expanded", lambda: fxlop.expand(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
                                              include="0", trace=False), {}),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("build,options", [c[1:] for c in SAME_REPORT], ids=[c[0] for c in SAME_REPORT])
def test_graph_and_module_back_ends_decide_the_same(build, options):
    """One driver decides what is expanded and why; traced or not, the same model gets the same report."""
    torch.manual_seed(0)
    model = build().eval()
    traced = fxlop.expand(model, **options)
    eager = fxlop.expand(model, trace=False, **options)
    assert isinstance(traced, fx.GraphModule) and not isinstance(eager, fx.GraphModule)
    reports = [fxlop.report(m).expand for m in (traced, eager)]
    assert _decisions(reports[0]) == _decisions(reports[1])
    assert [r.traced for r in reports] == [True, False]
    assert reports[0].expanded or reports[0].skipped


def test_the_same_report_names_what_each_layer_is_not():
    model = nn.Sequential(_hooked_model(), nn.ConvTranspose2d(3, 3, 1))
    reasons = {s.name: s.reason for s in fxlop.report(fxlop.expand(model, trace=False)).expand.skipped}
    assert reasons.keys() == {"0.2", "0.4", "1"}
    assert "forward hooks" in reasons["0.2"] and "not initialized" in reasons["0.4"]
    assert "ConvTranspose2d is not expandable" in reasons["1"]
    report = fxlop.report(fxlop.expand(_tied_model(), trace=False)).expand
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons == {"0": "its weight is tied to '2.weight'", "2": "its weight is tied to '0.weight'"}


def test_layers_inside_a_leaf_module_are_reported():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Branchy())
    report = fxlop.report(fxlop.expand(model, leaf_modules=["1"])).expand
    assert [e.name for e in report.expanded] == ["0"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons == {n: "inside leaf module '1', which is not traced" for n in ("1.gate.proj", "1.conv")}


@pytest.mark.parametrize("kind,options,attributes", [
    ("linear", dict(in_features=5, out_features=3), ("in_features", "out_features")),
    ("conv", dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=1, dilation=(1, 2), groups=2,
                  padding_mode="reflect"),
     ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")),
])
@pytest.mark.parametrize("trace", [True, False])
def test_an_expanded_layer_still_answers_weight_bias_and_its_constructor_attributes(kind, options, attributes, trace):
    torch.manual_seed(0)
    layer = (nn.Linear if kind == "linear" else nn.Conv2d)(**options).double()
    expanded = fxlop.expand(nn.Sequential(layer), trace=trace).get_submodule("0")
    assert isinstance(expanded, ExpandedLayer)
    # isinstance sees an ExpandedLayer, not the layer type (writes through a composed weight would be lost)
    assert not isinstance(expanded, (nn.Linear, nn.Conv2d))
    assert expanded.source[0] is type(layer)
    for name in attributes:
        assert getattr(expanded, name) == getattr(layer, name), name
    weight = expanded.weight
    assert (weight.dtype, weight.device, weight.shape) == (layer.weight.dtype, layer.weight.device, layer.weight.shape)
    assert relative_error(weight, layer.weight) <= FP64_RTOL
    assert torch.equal(expanded.bias, layer.bias)
    weight.square().sum().backward()  # differentiable: the gradient reaches every factor
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in expanded.factors)
    with pytest.raises(fxlop.ExpansionError, match="composed from its factors"):
        expanded.weight = torch.zeros_like(layer.weight)


@pytest.mark.parametrize("mode", ["online", "chain"])
def test_graph_weight_reads_read_the_composed_weight_and_fuse_back(mode):
    torch.manual_seed(0)
    model = Reads().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = fxlop.expand(model, mode=mode)
    report = fxlop.report(gm).expand
    assert {e.name: e.weight_reads for e in report.expanded} == {"proj": 1, "fc": 1, "head": 0}
    assert report.skipped == ()
    assert not any(n.op == "get_attr" and n.target.endswith(".weight") for n in gm.graph.nodes)
    assert fxlop.verify(model, gm, x) <= FP32_RTOL
    # the read is the composed weight: its gradient (2 w from the sum of squares) reaches fc's factors
    gm.train()
    gm(x).sum().backward()
    assert all(f.grad is not None for f in gm.get_submodule("fc").factors)
    gm.eval()
    with torch.no_grad():
        for param in gm.parameters():
            param.add_(0.05 * torch.randn_like(param))
    fused = fxlop.fuse(gm)
    assert fused.state_dict().keys() == model.state_dict().keys()
    assert {n.target for n in fused.graph.nodes if n.op == "get_attr"} == {"proj.weight", "fc.weight", "fc.bias"}
    assert fxlop.verify(gm, fused, x) <= FP32_RTOL


class WritesWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        self.fc.weight.mul_(1.0)
        return self.fc(x)


def test_a_graph_that_writes_a_weight_in_place_keeps_the_layer_dense():
    with torch.no_grad():
        report = fxlop.report(fxlop.expand(WritesWeight())).expand
    assert report.expanded == ()
    assert {s.name: s.reason for s in report.skipped} == {"fc": "node 'mul_' writes to 'fc.weight' in place"}


class Products(nn.Module):
    """Linear layers written as matrix products, in both orientations, and products that are not layers."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 5))  # (in, out): used as x @ w
        self.b = nn.Parameter(torch.randn(5))
        self.v = nn.Parameter(torch.randn(5, 4))  # (out, in): used as x @ v.T
        self.left = nn.Parameter(torch.randn(3, 3))
        self.scaled = nn.Parameter(torch.randn(4, 5))

    def forward(self, x):
        y = torch.addmm(self.b, x, self.w) + x @ self.w + torch.mm(x, self.v.t()) + torch.matmul(x, self.v.T)
        y = y + torch.addmm(self.b, x, self.scaled, beta=0.5)
        z = self.left @ x[:3]  # the parameter on the left: not a linear layer
        attention = x @ x.T  # a product of activations: not a layer at all
        return y, z, attention


@pytest.mark.parametrize("source", ["symbolic", "export"])
@pytest.mark.parametrize("mode", ["online", "chain"])
def test_matrix_products_on_a_parameter_expand_like_linear(source, mode):
    torch.manual_seed(0)
    model = Products()
    x = torch.randn(3, 4)
    graph = model if source == "symbolic" else torch.export.export(model, (x,))
    gm = fxlop.expand(graph, mode=mode)
    report = fxlop.report(gm).expand
    expanded = {e.name: (e.type, e.transposed_weight, e.call_sites) for e in report.expanded}
    assert expanded == {"w": ("Linear", True, 2), "v": ("Linear", False, 2)}
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons.keys() == {"scaled", "left"}
    assert "scales its terms (beta=0.5" in reasons["scaled"]
    assert "from the left (W @ x)" in reasons["left"]
    assert fxlop.verify(model, gm, x) <= FP32_RTOL
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".factors." in name:
                param.add_(0.05 * torch.randn_like(param))
    fused = fxlop.fuse(gm)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert fxlop.verify(gm, fused, x) <= FP32_RTOL


def test_expand_takes_an_exported_program_and_returns_a_graph_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)).eval()
    x = torch.randn(2, 3, 4, 4)
    program = torch.export.export(model, (x,))
    gm = fxlop.expand(program)
    assert isinstance(gm, fx.GraphModule)
    assert [e.name for e in fxlop.report(gm).expand.expanded] == ["0.weight", "3.weight"]
    assert fxlop.verify(model, gm, x) <= FP32_RTOL
    assert fxlop.verify(model, torch.export.export(fxlop.fuse(gm), (x,)).module(), x) <= FP32_RTOL
    with pytest.raises(fxlop.ExpansionError, match="already a graph"):
        fxlop.expand(program, trace=False)
    with pytest.raises(fxlop.ExpansionError, match="trace must be True or False"):
        fxlop.expand(model, trace="no")


def test_an_expanded_layer_pickled_before_it_answered_weight_still_loads_and_fuses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4))
    expanded = fxlop.expand(model, trace=False)
    layer = expanded[0]
    del layer._modules["read"], layer.__dict__["transposed_weight"]  # what an older fxlop saved
    loaded = pickle.loads(pickle.dumps(expanded))
    assert relative_error(loaded[0].weight, model[0].weight) <= FP32_RTOL
    assert fxlop.verify(model, fxlop.fuse(loaded), torch.randn(2, 3)) <= FP32_RTOL
