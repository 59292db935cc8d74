"""In-place use: ``with fxlop.overparameterized(model) as model:`` expands the layers of the model object
itself and fuses them back into the same modules on exit, normally or by an exception."""
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxlop
from fxlop.passes import ExpandedLayer, Report

from conftest import FP32_RTOL


class Net(nn.Module):
    """Conv, BatchNorm, a depthwise conv, a module used at two names, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.shared = nn.Conv2d(6, 6, 1)
        self.alias = self.shared
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.alias(F.relu(self.shared(self.depthwise(x))))
        return self.head(x.mean((2, 3)))


LAYERS = ["stem", "depthwise", "shared", "head"]


def _data(step=0):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 3, 6, 6, generator=generator), torch.randint(0, 4, (8,), generator=generator)


def _train(model, optimizer, steps=3):
    model.train()
    for step in range(steps):
        x, y = _data(step)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _shapes(model):
    return {key: value.shape for key, value in model.state_dict().items()}


def test_the_block_trains_the_factors_and_leaves_the_same_model_compact_with_the_fused_weights():
    model = Net()
    modules = dict(model.named_modules(remove_duplicate=False))
    weights = {name: model.get_submodule(name).weight for name in LAYERS}
    shapes = _shapes(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with fxlop.overparameterized(model, expansion=2) as expanded:
        assert expanded is model
        assert all(isinstance(model.get_submodule(n), ExpandedLayer) for n in LAYERS)
        assert model.alias is model.shared  # a shared module stays shared
        assert [e.name for e in fxlop.report(model).expand.expanded] == LAYERS
        optimizer = torch.optim.SGD(fxlop.param_groups(model, lr=0.1, weight_decay=1e-3), momentum=0.9)
        _train(model, optimizer)
        model.eval()
        x, _ = _data(10)
        with torch.no_grad():
            trained_output = model(x)
        fused = {name: model.get_submodule(name).fused_weight() for name in LAYERS}
    # the same module objects at every name, the same weight Parameters, the original state_dict
    assert dict(model.named_modules(remove_duplicate=False)) == modules
    assert all(model.get_submodule(n).weight is weights[n] for n in LAYERS)
    assert _shapes(model) == shapes
    assert fxlop.report(model) == Report()
    # the weights are the float64 product of the trained factors, bit for bit
    for name in LAYERS:
        assert torch.equal(model.get_submodule(name).weight, fused[name]), name
        assert not torch.equal(fused[name], before[f"{name}.weight"]), name  # training moved them
    assert not torch.equal(model.bn.running_mean, before["bn.running_mean"])  # trained in place, kept
    with torch.no_grad():
        assert fxlop.verify(model, model, x) == 0
        error = (model(x) - trained_output).abs().max() / trained_output.abs().max()
    assert error <= FP32_RTOL
    # the optimizer built inside holds the factors, which are no longer part of the model: stale
    inside = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not inside & {id(p) for n in LAYERS for p in [model.get_submodule(n).weight]}


def test_inside_the_block_the_state_dict_is_that_of_expand_either_way():
    """The checkpoint of a block loads into fxlop.expand(model, same options), traced or not: the same
    keys, shapes and (seeded per layer by the seed and its name) values."""
    model = Net()
    options = dict(expansion=1.5, seed=7, depth=4)
    graph = fxlop.expand(model, **options).state_dict()
    eager = fxlop.expand(model, trace=False, **options).state_dict()
    with fxlop.overparameterized(model, **options):
        inside = model.state_dict()
        assert list(inside) == list(eager)
        # a GraphModule keeps one name of a module that a model holds at two (fx copies what its graph calls)
        assert set(graph) == {key for key in inside if not key.startswith("alias.")}
        for key, value in inside.items():
            assert torch.equal(value, eager[key]), key
            assert key.startswith("alias.") or torch.equal(value, graph[key]), key


@pytest.mark.parametrize("error", [RuntimeError("diverged"), KeyboardInterrupt()])
def test_an_exception_inside_fuses_back_and_propagates(error):
    model = Net()
    modules = dict(model.named_modules(remove_duplicate=False))
    shapes = _shapes(model)
    fused = {}
    with pytest.raises(type(error)):
        with fxlop.overparameterized(model, expansion=2):
            _train(model, torch.optim.SGD(fxlop.param_groups(model, lr=0.1, weight_decay=0), momentum=0.9), 2)
            fused = {name: model.get_submodule(name).fused_weight() for name in LAYERS}
            raise error
    assert dict(model.named_modules(remove_duplicate=False)) == modules
    assert not any(isinstance(m, ExpandedLayer) for m in model.modules())
    assert _shapes(model) == shapes
    for name in LAYERS:  # compact, with the weights training had reached
        assert torch.equal(model.get_submodule(name).weight, fused[name]), name
    model(_data()[0]).sum().backward()  # and usable
    with fxlop.overparameterized(model):  # the model can be over-parameterized again
        pass


def test_nested_use_and_double_entry_are_refused_and_leave_the_block_working():
    model = Net()
    block = fxlop.overparameterized(model, expansion=2)
    with block:
        factors = [p.clone() for p in model.stem.factors]
        with pytest.raises(fxlop.ExpansionError, match="already active"):
            block.__enter__()
        with pytest.raises(fxlop.ExpansionError, match=r"already holds expanded layers \(stem, depthwise, shared"):
            fxlop.overparameterized(model).__enter__()
        with pytest.raises(fxlop.ExpansionError, match="does not nest"):
            with fxlop.overparameterized(nn.Sequential(model)):
                pass
        with pytest.raises(fxlop.ExpansionError, match="does not nest"):
            with fxlop.overparameterized(nn.Sequential(model.head)):
                pass
        # nothing of the refused entries touched the model
        assert all(torch.equal(a, b) for a, b in zip(model.stem.factors, factors))
        assert isinstance(model.stem, ExpandedLayer) and isinstance(model.head, ExpandedLayer)
    assert not any(isinstance(m, ExpandedLayer) for m in model.modules())
    with block:  # a block that exited can be entered again
        assert isinstance(model.stem, ExpandedLayer)
    assert not any(isinstance(m, ExpandedLayer) for m in model.modules())
    # a model already expanded with trace=False is refused as well
    with pytest.raises(fxlop.ExpansionError, match="does not nest"):
        fxlop.overparameterized(fxlop.expand(Net(), trace=False)).__enter__()


def test_bad_options_are_refused_before_any_work_and_refusals_leave_the_model_as_it_was():
    model = Net()
    modules = dict(model.named_modules(remove_duplicate=False))
    with pytest.raises(fxlop.ExpansionError, match="expansion must be"):
        fxlop.overparameterized(model, expansion=0.5)
    with pytest.raises(fxlop.SelectionError):
        fxlop.overparameterized(model, include=[3])
    with pytest.raises(fxlop.ExpansionError, match="a Linear"):
        fxlop.overparameterized(nn.Linear(3, 3))
    with pytest.raises(fxlop.FxlopError, match="nn.Module"):
        fxlop.overparameterized("model")
    with pytest.raises(fxlop.ExpansionError, match="max_params"):  # over a limit: refused at entry
        with fxlop.overparameterized(model, max_params=10):
            pytest.fail("the block ran")
    assert dict(model.named_modules(remove_duplicate=False)) == modules
    assert fxlop.report(model) == Report()


def test_a_failed_fuse_gives_back_the_weights_from_before_the_block():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules(remove_duplicate=False))
    with pytest.raises(fxlop.FusionError, match=r"'head' composes to a weight of shape \(4, 5\)"):
        with fxlop.overparameterized(model, expansion=2):
            _train(model, torch.optim.SGD(model.parameters(), lr=0.1), 1)
            with torch.no_grad():  # a factor edited to another shape: the product is no longer the layer's
                model.head.factors[2] = nn.Parameter(torch.randn(4, model.head.factors[2].shape[1]))
                model.head.factors[0] = nn.Parameter(torch.randn(model.head.factors[0].shape[0], 5))
    assert dict(model.named_modules(remove_duplicate=False)) == modules
    for name in LAYERS:
        assert torch.equal(model.get_submodule(name).weight, before[f"{name}.weight"]), name


def test_device_and_dtype_changes_inside_the_block_carry_over():
    model = Net()
    with fxlop.overparameterized(model, expansion=2):
        model.double()
        x = _data()[0].double()
        expected = model.eval()(x)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert (model(x) - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_an_optimizer_built_before_the_block_holds_the_fused_weights_after_it():
    model = Net()
    before = torch.optim.SGD(model.parameters(), lr=0.1)
    with fxlop.overparameterized(model, expansion=2):
        _train(model, torch.optim.SGD(fxlop.param_groups(model, lr=0.1, weight_decay=0)), 2)
    assert [id(p) for p in before.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    weight = model.stem.weight.clone()
    _train(model, before, 1)  # the old optimizer trains the compact model again
    assert not torch.equal(model.stem.weight, weight)


def test_an_error_while_expanding_leaves_the_model_as_it_was(monkeypatch):
    """Never half expanded: every layer is built before the first one is swapped in."""
    driver = importlib.import_module("fxlop.passes.expand")  # the module (the package exports the function `expand`)
    model = Net()
    modules = dict(model.named_modules(remove_duplicate=False))
    built = []
    original = driver.new_expanded_layer

    def failing(*args, **kwargs):
        if len(built) == 2:
            raise KeyboardInterrupt
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(driver, "new_expanded_layer", failing)
    with pytest.raises(KeyboardInterrupt):
        with fxlop.overparameterized(model, expansion=2):
            pytest.fail("the block ran")
    assert len(built) == 2
    assert dict(model.named_modules(remove_duplicate=False)) == modules
    assert fxlop.report(model) == Report()
