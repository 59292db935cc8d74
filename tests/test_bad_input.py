"""Bad or unusual input: each case ends in a clear FxlopError subclass or a correct result.

Never a silent wrong output, never a changed caller model.  (More cases live next to their
features: data, models, pruning, training, CLI.)
"""
import copy
import errno
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxlop
from fxlop.verify import relative_error
from fxlop.passes import ExpandedLayer, SkippedRecord

from conftest import FP32_RTOL, FP64_RTOL


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x) if x.mean() > 0 else x


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))


def _edited(kind):
    gm = fxlop.expand(_small(), mode="chain")
    graph = gm.graph
    ops = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.conv2d]
    if kind == "between":
        with graph.inserting_after(ops[0]):
            scaled = graph.call_function(torch.mul, (ops[0], 2.0))
        ops[0].replace_all_uses_with(scaled)
        scaled.args = (ops[0], 2.0)
    elif kind == "reader":
        factor = next(n for n in graph.nodes if n.op == "get_attr" and n.target == "0.factors.0")
        output = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(output):
            total = graph.call_function(torch.add, (output.args[0], graph.call_method("sum", (factor,))))
        output.args = (total,)
    else:
        ops[1].kwargs = {**ops[1].kwargs, "dilation": (2, 2)}
    gm.recompile()
    return gm


def _raises_on_reference():
    fxlop.verify(nn.Linear(3, 2), nn.Linear(3, 2), torch.randn(2, 5))


ERRORS = [
    ("untraceable model names the module and the fix", lambda: fxlop.expand(nn.Sequential(Untraceable())),
     fxlop.TraceError, r"module '0' \(Untraceable\).*leaf_modules=\['0'\].*trace=False"),
    ("unknown mode", lambda: fxlop.expand(_small(), mode="fast"), fxlop.ExpansionError, "mode"),
    ("expansion below 1", lambda: fxlop.expand(_small(), expansion=0.5), fxlop.ExpansionError, "expansion"),
    ("expansion not a number", lambda: fxlop.expand(_small(), expansion="4"), fxlop.ExpansionError, "expansion"),
    ("depth 1", lambda: fxlop.expand(_small(), depth=1), fxlop.ExpansionError, "depth"),
    ("unknown init", lambda: fxlop.expand(_small(), init="zeros"), fxlop.ExpansionError, "init"),
    ("negative max_params", lambda: fxlop.expand(_small(), max_params=-1), fxlop.ExpansionError, "max_params"),
    ("memory budget", lambda: fxlop.expand(_small(), max_params=500), fxlop.ExpansionError,
     r"would give [\d,]+ parameters, over max_params=500.*largest expanded layer is '0'"),
    ("memory budget without tracing", lambda: fxlop.expand(_small(), max_params=500, trace=False),
     fxlop.ExpansionError, "over max_params=500"),
    ("not a module", lambda: fxlop.expand(torch.zeros(3)), fxlop.FxlopError, "nn.Module"),
    ("include of the wrong type", lambda: fxlop.expand(_small(), include=[3]), fxlop.SelectionError, "glob"),
    ("leaf_modules of the wrong type", lambda: fxlop.expand(_small(), leaf_modules=[1.5]), fxlop.SelectionError,
     "glob"),
    ("foreign node between factors", lambda: fxlop.fuse(_edited("between")), fxlop.FusionError,
     "layer '0'.*found node 'mul'"),
    ("foreign reader of a factor", lambda: fxlop.fuse(_edited("reader")), fxlop.FusionError,
     "layer '0'.*reads '_0_factors_0'"),
    ("edited kernel options", lambda: fxlop.fuse(_edited("options")), fxlop.FusionError, "options"),
    ("fuse of a tensor", lambda: fxlop.fuse(torch.zeros(2)), fxlop.FxlopError, "fxlop.expand"),
    ("fold_bn without a graph", lambda: fxlop.fuse(_small(), fold_bn=True), fxlop.FxlopError, "traced model"),
    ("timm-style fuse of a graph's layer", lambda: fxlop.expand(_small()).get_submodule("0").fuse(),
     fxlop.FusionError, r"passes\.fuse\(gm\)"),
    ("outputs differ", lambda: fxlop.verify(_small(), nn.Sequential(*list(_small())[:2], nn.Conv2d(4, 4, 1)),
                                            torch.randn(2, 3, 5, 5)), fxlop.EquivalenceError, r"output\[0, "),
    ("inputs that do not fit", _raises_on_reference, fxlop.FxlopError, "reference model .* fails on example_inputs"),
    ("unknown tap", lambda: fxlop.distiller(_small(), _small(), ["nope"]), fxlop.FxlopError, "nope"),
    ("SP without a teacher", lambda: fxlop.finetune(_small(), [], gamma=1.0), fxlop.FxlopError, "teacher"),
    ("SP batch mismatch", lambda: fxlop.similarity_loss(torch.randn(2, 3), torch.randn(4, 3)), fxlop.FxlopError,
     "batch"),
]


@pytest.mark.parametrize("call,error,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _assert_untouched(model, before, modules_before):
    """``model`` holds exactly the ``before`` state_dict (NaN for NaN, bit for bit otherwise) and modules."""
    state = model.state_dict()
    assert state.keys() == before.keys()
    for key, value in state.items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert [(name, type(m)) for name, m in model.named_modules()] == modules_before


def _check(model, x, *, expanded, skipped=(), rtol=FP32_RTOL, **options):
    """Expand (and fuse) ``model``: the outputs must not change, the report must say what happened."""
    before = copy.deepcopy(model.state_dict())
    modules_before = [(name, type(m)) for name, m in model.named_modules()]
    gm = fxlop.expand(model, **options)
    report = fxlop.report(gm).expand
    assert [e.name for e in report.expanded] == expanded
    reasons = {s.name: s.reason for s in report.skipped}
    for name, text in skipped:
        assert text in reasons[name], reasons
    with torch.no_grad():
        reference = model(x)
        assert relative_error(gm(x), reference) <= rtol
        assert relative_error(fxlop.fuse(gm)(x), reference) <= rtol
    _assert_untouched(model, before, modules_before)  # the caller's model is untouched
    return gm


class Functional(nn.Module):
    def __init__(self, transform=None, stride=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.transform, self.stride = transform, stride

    def forward(self, x):
        weight = self.weight * 2 if self.transform else self.weight
        stride = x.shape[-1] // 5 if self.stride else 1
        return F.conv2d(x, weight, stride=stride)


class Subclassed(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 0.5


X = torch.randn(2, 3, 6, 6)


def _nan(value):
    model = _small()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = value
    return model


def _hooked():
    model = _small()
    model[2].register_forward_hook(lambda module, args, out: out + 1)
    return model


def _tied():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    model[2].weight = model[0].weight
    return model


CASES = [
    ("ConvTranspose", nn.Sequential(nn.ConvTranspose2d(3, 3, 2), nn.Conv2d(3, 2, 1)), X, ["1"],
     [("0", "ConvTranspose2d is not expandable")]),
    ("padding_mode reflect", nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect")), X, ["0"], []),
    ("padding_mode replicate", nn.Sequential(nn.Conv2d(3, 2, 3, padding=2, padding_mode="replicate")), X, ["0"], []),
    ("padding_mode circular", nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular")), X, ["0"], []),
    ("zero-size layer", nn.Sequential(nn.Linear(0, 3), nn.Linear(3, 2)), torch.randn(2, 0), ["1"], [("0", "empty")]),
    ("1-channel layers", nn.Sequential(nn.Conv2d(3, 1, 3), nn.Conv2d(1, 1, 3)), X, ["0", "1"], []),
    ("groups == in_channels", nn.Sequential(nn.Conv2d(3, 6, 3, groups=3)), X, ["0"], []),
    ("forward hooks", _hooked(), X, ["0"], [("2", "forward hooks")]),
    ("tied weights", _tied(), torch.randn(2, 3), [], [("0", "tied"), ("2", "tied")]),
    ("computed weight", Functional(transform=True), X, [], [("conv2d", "not a parameter")]),
    ("options computed in the graph", Functional(stride=True), X, [], [("weight", "computes its conv options")]),
    ("conv subclass traced through", nn.Sequential(Subclassed(3, 2, 3)), X, ["0.weight"], []),
    ("no conv at all", nn.Sequential(nn.ReLU()), X, [], []),
    ("include matching nothing", _small(), X, [], [("0", "not matched by include")]),
]


@pytest.mark.parametrize("model,x,expanded,skipped", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_correct_results(model, x, expanded, skipped):
    options = {"include": "nothing*"} if skipped and skipped[0][1] == "not matched by include" else {}
    _check(model.eval(), x, expanded=expanded, skipped=skipped, **options)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_weights_are_left_alone(value):
    model = _nan(value)
    before = copy.deepcopy(model.state_dict())
    modules_before = [(name, type(m)) for name, m in model.named_modules()]
    gm = fxlop.expand(model)
    assert fxlop.report(gm).expand.skipped_reasons["0"] == "weight has NaN or Inf entries"
    assert type(gm.get_submodule("0")) is nn.Conv2d and isinstance(gm.get_submodule("2"), ExpandedLayer)
    # the skipped layer keeps its weight and bias exactly (the NaN or inf where it was), in a copy
    for name in ("weight", "bias"):
        torch.testing.assert_close(gm.get_parameter(f"0.{name}"), before[f"0.{name}"], rtol=0, atol=0,
                                   equal_nan=True)
    assert gm.get_parameter("0.weight").data_ptr() != model[0].weight.data_ptr()
    _assert_untouched(model, before, modules_before)


def test_uninitialized_lazy_module():
    gm = fxlop.expand(nn.Sequential(nn.LazyConv2d(4, 3), nn.Conv2d(4, 4, 1)))
    report = fxlop.report(gm).expand
    assert "run one forward pass first" in report.skipped[0].reason
    assert [e.name for e in report.expanded] == ["1"]
    gm(X)  # the lazy layer initializes itself as usual
    assert gm.get_submodule("0").weight.shape == (4, 3, 3, 3)


def test_meta_device_model_expands_and_fuses_shapes():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Linear(8, 4))
    gm = fxlop.expand(model)
    assert all(p.device.type == "meta" for p in gm.parameters())
    assert [list(f.shape) for f in gm.get_submodule("0").factors] == [[12, 3, 1, 1], [32, 12, 3, 3], [8, 32, 1, 1]]
    fused = fxlop.fuse(gm)
    assert {k: (v.shape, v.device.type) for k, v in fused.state_dict().items()} == \
        {k: (v.shape, "meta") for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, FP64_RTOL), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_half_and_double_models(dtype, rtol):
    model = _small().to(dtype)
    gm = _check(model, X.to(dtype), expanded=["0", "2"], rtol=rtol)
    assert all(p.dtype == dtype for p in fxlop.fuse(gm).parameters())


def test_expanded_model_cast_to_half_fuses_in_half():
    gm = fxlop.expand(_small()).half()
    fused = fxlop.fuse(gm)
    assert all(p.dtype == torch.float16 for p in fused.parameters())
    with torch.no_grad():
        assert relative_error(fused(X.half()), gm(X.half())) <= 1e-2


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_devices(device):
    model = _small().to(device)
    gm = _check(model, X.to(device), expanded=["0", "2"])
    assert {p.device.type for p in fxlop.fuse(gm).parameters()} == {device}


def test_frozen_layers_stay_frozen():
    model = _small()
    model[0].requires_grad_(False)
    gm = fxlop.expand(model)
    assert not any(p.requires_grad for p in gm.get_submodule("0").factors)
    assert all(p.requires_grad for p in gm.get_submodule("2").factors)
    assert not fxlop.fuse(gm).get_parameter("0.weight").requires_grad


def test_shared_module_and_reexpansion():
    shared = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    gm = _check(model, X, expanded=["0"])
    assert fxlop.report(gm).expand.expanded[0].call_sites == 2
    again = fxlop.expand(gm)
    assert fxlop.report(again).expand.expanded == ()
    assert fxlop.report(again).expand.skipped == (SkippedRecord(name="0", reason="already expanded"),)


# --- issue 26: adversarial inputs that did not give a clear error --------------------------------------------


@pytest.fixture
def planning(monkeypatch):
    """Counts of the expansion's planning calls (whole plans and single layer plans): work measured by
    what is done, not by a clock a loaded machine slows down."""
    import sys

    budget = sys.modules["fxlop.passes.budget"]
    calls = {"plan": 0, "layer": 0}
    real_plan, real_of = budget.plan, budget.Planned.of.__func__

    def plan(*args, **kwargs):
        calls["plan"] += 1
        return real_plan(*args, **kwargs)

    def of(cls, *args, **kwargs):
        calls["layer"] += 1
        return real_of(cls, *args, **kwargs)

    for module in (budget, sys.modules["fxlop.passes.expand"]):  # the budget's own calls, and the expansion's
        monkeypatch.setattr(module, "plan", plan)
    monkeypatch.setattr(budget.Planned, "of", classmethod(of))
    return calls


@pytest.mark.parametrize("options", [dict(expansion=1e9), dict(expansion=1e9, max_layer_params=None),
                                     dict(expansion=1e5), dict(pointwise_expansion=1e9, max_layer_params=None)])
def test_absurd_expansion_is_refused_at_once(options, planning):
    with pytest.raises(fxlop.ExpansionError, match="at most 1024"):
        fxlop.expand(_small(), **options)
    assert planning == {"plan": 0, "layer": 0}  # refused before anything is planned


def test_refusal_at_the_largest_expansion_plans_a_bounded_number_of_options(planning):
    import sys

    candidates = sys.modules["fxlop.passes.budget"]._MAX_CANDIDATES
    with pytest.raises(fxlop.ExpansionError, match="Options that fit"):
        fxlop.expand(_small(), expansion=1024, max_layer_params=None, max_bytes=10**6)
    # a binary search over at most _MAX_CANDIDATES candidates per option, each layer sized once per candidate
    assert 0 < planning["plan"] <= 4 * (candidates.bit_length() + 2)
    assert planning["layer"] <= 2 * 2 * (candidates + 2)  # two layers


def test_graph_fuse_checks_the_factor_shapes():
    gm = fxlop.expand(_small(), mode="chain")
    layer = gm.get_submodule("0")
    middle = layer.factors[1]
    layer.factors[1] = nn.Parameter(torch.randn(middle.shape[0], middle.shape[1], 1, 1))  # a 1x1 for the 3x3
    with pytest.raises(fxlop.FusionError, match=r"expanded layer '0'.*\(4, 3, 1, 1\), not the \(4, 3, 3, 3\)"):
        fxlop.fuse(gm)
    layer.factors[1] = nn.Parameter(torch.randn(middle.shape[0] + 1, middle.shape[1], 3, 3))  # does not chain
    with pytest.raises(fxlop.FusionError, match="expanded layer '0'.*do not compose"):
        fxlop.fuse(gm)


class _CalledTwice(nn.Module):
    """One module applied to its own output: two call sites in series, the second reading the first."""

    def __init__(self, functional=False):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.functional = functional

    def forward(self, x):
        if self.functional:
            return F.linear(F.linear(x, self.l.weight), self.l.weight, self.l.bias)
        return self.l(self.l(x))


@pytest.mark.parametrize("how", ["online", "chain", "export", "functional"])
def test_module_called_twice_in_series_fuses(how):
    model = _CalledTwice(functional=how == "functional")
    x = torch.randn(3, 4)
    source = torch.export.export(model, (x,)) if how == "export" else model
    gm = fxlop.expand(source, mode="chain" if how == "chain" else "online")
    assert fxlop.report(gm).expand.expanded[0].call_sites == 2
    fused = fxlop.fuse(gm)
    assert relative_error(model(x), fused(x)) < FP32_RTOL
    assert fused.get_parameter("l.weight").shape == (4, 4)
    if how in ("online", "chain"):
        assert isinstance(fused.get_submodule("l"), nn.Linear)
        assert sum(n.op == "call_module" for n in fused.graph.nodes) == 2  # still shared, called twice


@pytest.mark.parametrize("options,error,match", [
    (dict(seed="a"), fxlop.ExpansionError, "seed must be an integer, got 'a'"),
    (dict(seed=1.5), fxlop.ExpansionError, "seed must be an integer, got 1.5"),
    (dict(include=5), fxlop.SelectionError, "got 5"),
    (dict(exclude=2.0), fxlop.SelectionError, "got 2.0"),
    (dict(seed="a", trace=False), fxlop.ExpansionError, "seed must be an integer"),
])
def test_option_types_give_fxlop_errors(options, error, match):
    with pytest.raises(error, match=match):
        fxlop.expand(_small(), **options)


def test_numpy_integer_seed_is_an_integer():
    import numpy as np

    expanded = fxlop.expand(_small(), seed=np.int64(3))
    assert torch.equal(expanded.state_dict()[next(iter(expanded.state_dict()))],
                       fxlop.expand(_small(), seed=3).state_dict()[next(iter(expanded.state_dict()))])
    assert type(fxlop.report(expanded).expand.options.seed) is int
    with pytest.raises(fxlop.ExpansionError, match="seed must be an integer, got True"):
        fxlop.expand(_small(), seed=True)
    with pytest.raises(fxlop.ExpansionError, match="seed must be an integer"):
        fxlop.expand(_small(), seed=np.float64(3.0))


def test_overparameterized_checks_the_seed():
    with pytest.raises(fxlop.ExpansionError, match="seed must be an integer"):
        fxlop.overparameterized(_small(), seed="a")


def test_include_matching_nothing_warns_naming_the_patterns():
    with pytest.warns(UserWarning, match=r"include=\['nothing\*', 'neither'\] matches none of the 2"):
        gm = fxlop.expand(_small(), include=["nothing*", "neither"])
    assert fxlop.report(gm).expand.expanded == ()


def _loader(*batches):
    return list(batches)


def _pairs(n=2, classes=4, labels=None):
    x = torch.randn(n, 3, 5, 5)
    return x, torch.arange(n) % classes if labels is None else labels


def _classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # 4 classes


BAD_LOADERS = [
    ("empty loader", [], "train_loader is empty"),
    ("empty iterable", iter([]), "yielded no samples"),
    ("bare tensors", [torch.randn(2, 3, 5, 5)], r"batch 1: a batch must be a pair .* got a Tensor"),
    ("a 1-tuple", [(torch.randn(2, 3, 5, 5),)], "got a 1-tuple"),
    ("a 3-tuple", [(*_pairs(), torch.zeros(2))], "got a 3-tuple"),
    ("numpy inputs", [(torch.randn(2, 3, 5, 5).numpy(), torch.tensor([0, 1]))], "torch.from_numpy"),
    ("numpy labels", [(torch.randn(2, 3, 5, 5), torch.tensor([0, 1]).numpy())], "labels must be a tensor"),
    ("float labels", [(torch.randn(2, 3, 5, 5), torch.tensor([0.0, 1.0]))], "integer class indices, got dtype"),
    ("labels out of range", [_pairs(labels=torch.tensor([0, 4]))], r"batch 1: labels range over \[0, 4\]"),
    ("negative labels", [_pairs(labels=torch.tensor([-1, 0]))], r"labels range over \[-1, 0\]"),
    ("labels of another count", [_pairs(labels=torch.tensor([0, 1, 2]))], r"\(3,\) labels for model outputs"),
    ("(N, 1) labels", [_pairs(labels=torch.tensor([[0], [1]]))],
     r"\(2, 1\) labels for model outputs of shape \(2, 4\); expected .* labels of shape \(2,\)"),
    ("a tensor as the loader", torch.randn(4, 3), "must be an iterable of"),
]


@pytest.mark.parametrize("loader,match", [c[1:] for c in BAD_LOADERS], ids=[c[0] for c in BAD_LOADERS])
def test_finetune_refuses_bad_loaders_before_a_step(loader, match):
    model = _classifier()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(fxlop.FxlopError, match=match):
        fxlop.finetune(model, loader, epochs=1, lr=0.1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # no step was taken


def test_finetune_stops_on_a_bad_second_batch_before_its_step():
    model = _classifier()
    good = _pairs()
    after_one = copy.deepcopy(model)
    fxlop.finetune(after_one, [good], epochs=1, lr=0.1, seed=0)
    with pytest.raises(fxlop.FxlopError, match=r"epoch 1, batch 2: labels range over \[0, 7\]"):
        fxlop.finetune(model, [good, _pairs(labels=torch.tensor([7, 0]))], epochs=1, lr=0.1, seed=0)
    for key, value in model.state_dict().items():  # batch 1's step, not batch 2's
        assert torch.equal(value, after_one.state_dict()[key]), key


def test_finetune_accepts_integer_labels_of_any_width():
    fxlop.finetune(_classifier(), [(_pairs()[0], torch.tensor([0, 3], dtype=torch.int32))], epochs=1)


def test_finetune_unknown_option_and_config():
    with pytest.raises(fxlop.FxlopError, match="unknown option lr_max; the options are"):
        fxlop.finetune(_classifier(), [_pairs()], lr_max=0.1)
    with pytest.raises(fxlop.FxlopError, match="config must be a fxlop.TrainOptions"):
        fxlop.finetune(_classifier(), [_pairs()], config={"lr": 0.1})


def test_check_device_does_not_allocate(monkeypatch):
    from fxlop.pipeline import resolve_device
    from fxlop.train import check_device

    def no_allocation(*args, **kwargs):
        raise AssertionError("a tensor was allocated to check the device")

    monkeypatch.setattr(torch, "empty", no_allocation)
    assert check_device("cpu") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda:1") and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(fxlop.FxlopError, match="--device 'cuda:2' is not available on this machine: it has 2 CUDA"):
        resolve_device("cuda:2")
    with pytest.raises(fxlop.FxlopError, match="'cpu:1': there is one CPU device"):
        check_device("cpu:1")
    with pytest.raises(fxlop.FxlopError, match="--device 'gpu0' is not a device"):
        resolve_device("gpu0")


@pytest.mark.parametrize("device,match", [
    ("meta", "meta device holds no data"),
    ("gpu0", "'gpu0' is not a device"),
    pytest.param("cuda", "'cuda' is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
    pytest.param("cuda:99", "'cuda:99' is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.device_count() >= 100, reason="a hundred GPUs")),
])
def test_finetune_device_not_available(device, match):
    model = _classifier()
    with pytest.raises(fxlop.FxlopError, match=match):
        fxlop.finetune(model, [_pairs()], epochs=1, device=device)
    assert next(model.parameters()).device.type == "cpu"


def test_directory_given_as_a_model_or_a_checkpoint(tmp_path):
    from fxlop.models import load_model
    from fxlop.train import load_checkpoint
    with pytest.raises(fxlop.FxlopError, match="is a directory"):
        load_model(tmp_path)
    with pytest.raises(fxlop.FxlopError, match="is a directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(fxlop.FxlopError, match="checkpoint_path .* is a directory"):
        fxlop.finetune(_classifier(), [_pairs()], epochs=1, checkpoint_path=tmp_path, resume=True)


@pytest.mark.parametrize("where", ["read-only directory", pytest.param("/proc", marks=pytest.mark.skipif(
    not os.path.isdir("/proc/self"), reason="/proc is Linux's"))])
@pytest.mark.parametrize("option", ["log_path", "checkpoint_path"])
def test_unwritable_training_outputs_are_refused_before_training(tmp_path, monkeypatch, option, where):
    import tempfile

    if where == "/proc":
        path = "/proc/fxlop-x/x.pt"
    else:  # no file can be created there: the writability probe's mkstemp is refused
        path = str(tmp_path / "x.pt")

        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    model = _classifier()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(fxlop.FxlopError, match=f"{option} {re.escape(path)} cannot be written"):
        fxlop.finetune(model, [_pairs()], epochs=1, lr=0.1, **{option: path})
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("trace", [True, False])
def test_report_survives_save_and_load(tmp_path, trace):
    gm = fxlop.expand(_small(), trace=trace)
    torch.save(gm, tmp_path / "expanded.pt")
    loaded = torch.load(tmp_path / "expanded.pt", weights_only=False)
    assert fxlop.report(loaded).expand.expanded == fxlop.report(gm).expand.expanded
    assert fxlop.report(loaded) == fxlop.report(gm)  # the whole typed report, equal after the round trip
    fused = fxlop.fuse(loaded)
    assert fxlop.report(fused).expand is not None and fxlop.report(fused).fuse is not None


def test_evaluate_checks_device_and_batches():
    with pytest.raises(fxlop.FxlopError, match="'gpu0' is not a device"):
        fxlop.evaluate(_classifier(), [_pairs()], device="gpu0")
    with pytest.raises(fxlop.FxlopError, match=r"evaluate, batch 1: labels range over \[0, 9\]"):
        fxlop.evaluate(_classifier(), [_pairs(labels=torch.tensor([0, 9]))])
    with pytest.raises(fxlop.FxlopError, match="a batch must be a pair"):
        fxlop.evaluate(_classifier(), [torch.randn(2, 3, 5, 5)])
    with pytest.raises(fxlop.FxlopError, match=r"evaluate, batch 1: \(2, 1\) labels for model outputs of shape"):
        fxlop.evaluate(_classifier(), [_pairs(labels=torch.tensor([[0], [1]]))])


def test_labels_per_position_for_dense_outputs():
    model = nn.Conv2d(3, 4, 1)  # (N, 4, 5, 5) outputs: a class per position
    x = torch.randn(2, 3, 5, 5)
    result = fxlop.evaluate(model, [(x, torch.zeros(2, 5, 5, dtype=torch.long))])
    assert result["samples"] == 2 and 0 <= result["accuracy"] <= 1
    with pytest.raises(fxlop.FxlopError, match=r"labels of shape \(2, 5, 5\)"):
        fxlop.evaluate(model, [(x, torch.zeros(2, dtype=torch.long))])
