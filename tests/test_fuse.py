import copy
import io

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxlop
from fxlop import passes
from fxlop.verify import relative_error
from fxlop.passes import ExpandedLayer, FoldedRecord

from conftest import FunctionalLayer


class Net(nn.Module):
    """Every kind of layer the passes handle, in one model."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")
        self.pw = nn.Conv2d(8, 12, 1, stride=2)
        self.seq = nn.Conv1d(12, 6, 3, padding="same", dilation=2)
        self.head_weight = nn.Parameter(torch.randn(5, 6) * 0.3)
        self.head_bias = nn.Parameter(torch.randn(5))
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.pw(self.dw(x)))
        x = self.seq(x.flatten(2))
        x = F.linear(x.mean(-1), self.head_weight, self.head_bias)
        return {"logits": self.fc(torch.tanh(x)), "features": (x,)}


def _perturb(gm, scale=0.05):
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".factors." in name:
                param.add_(torch.randn_like(param) * scale * param.std())


def _assert_structure_equal(fused, reference):
    assert {k: tuple(v.shape) for k, v in fused.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {n: type(m) for n, m in fused.named_modules() if n} == {n: type(m) for n, m in reference.named_modules() if n}
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("mode", ["online", "chain"])
def test_fuse_of_expand_is_the_original(mode, measured):
    model = Net().eval()
    traced = fx.symbolic_trace(model)
    x = torch.randn(4, 3, 8, 8)
    gm = fxlop.expand(model, mode=mode)
    assert len(fxlop.report(gm).expand.expanded) == 6
    fused = fxlop.fuse(gm)
    _assert_structure_equal(fused, traced)
    assert not any(isinstance(m, ExpandedLayer) for m in fused.modules())
    measured("fuse(expand(m)) vs m fp32", fxlop.verify(traced, fused, x))
    assert fxlop.report(fused).fuse.params == sum(p.numel() for p in traced.parameters())


@pytest.mark.parametrize("mode", ["online", "chain"])
def test_fuse_after_training_equals_trained_expanded_model(mode, measured):
    model = Net()
    gm = fxlop.expand(model, mode=mode)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
        loss = F.cross_entropy(gm(x)["logits"], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x = torch.randn(8, 3, 8, 8)
    gm.eval()  # from here on BatchNorm statistics stay as training left them
    fused = fxlop.fuse(gm)
    with torch.no_grad():
        changed = relative_error(fused(x)["logits"], fx.symbolic_trace(model).eval()(x)["logits"])
    assert changed > 1e-3  # training moved the function: the comparison below is not vacuous
    measured("fuse(trained) vs trained fp32", fxlop.verify(gm, fused, x))


@pytest.mark.parametrize("mode", ["online", "chain"])
def test_fuse_after_random_factor_updates(mode, measured):
    layer = FunctionalLayer(F.conv2d, torch.randn(6, 2, 3, 3), torch.randn(6), groups=2, padding=1)
    gm = fxlop.expand(layer, mode=mode)
    _perturb(gm, 0.5)
    fused = fxlop.fuse(gm)
    assert set(fused.state_dict()) == {"weight", "bias"}
    measured("fuse(perturbed) vs perturbed fp32", fxlop.verify(gm, fused, torch.randn(2, 4, 7, 7)))


def test_fused_state_dict_loads_into_the_pruned_module():
    model = Net().eval()
    fused = fxlop.fuse(fxlop.expand(model))
    fresh = Net().eval()
    fresh.load_state_dict(fused.state_dict())
    fxlop.verify(fused, fresh, torch.randn(2, 3, 8, 8))


def test_fuse_with_nothing_to_fuse_returns_an_equivalent_copy():
    traced = fx.symbolic_trace(Net())
    fused = fxlop.fuse(traced)
    assert fused is not traced
    assert fxlop.report(fused).fuse.fused == ()
    fxlop.verify(traced, fused, torch.randn(2, 3, 8, 8), rtol=0)
    assert fused.get_parameter("stem.weight") is not traced.get_parameter("stem.weight")


def test_fuse_of_a_plain_module_is_a_copy_and_of_anything_else_an_error():
    linear = nn.Linear(2, 2)
    fused = fxlop.fuse(linear)
    assert fused is not linear and torch.equal(fused.weight, linear.weight)
    with pytest.raises(fxlop.FxlopError, match="model returned by fxlop.expand"):
        fxlop.fuse(torch.zeros(2))
    with pytest.raises(fxlop.FxlopError, match="fold_bn needs a traced model"):
        fxlop.fuse(linear, fold_bn=True)


def test_fold_batchnorm():
    model = Net()
    with torch.no_grad():  # give BatchNorm statistics that matter
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
    model.eval()
    folded = fxlop.fuse(fxlop.expand(model), fold_bn=True)
    assert "bn.running_mean" not in folded.state_dict()
    assert folded.get_submodule("stem").bias is not None
    assert fxlop.report(folded).fold_bn.folded == (FoldedRecord(name="stem", batchnorm="bn"),)
    fxlop.verify(model, folded, torch.randn(4, 3, 8, 8))


def test_fold_linear_batchnorm_needs_2d_evidence():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(5, 4)
    unknown = fxlop.fuse(fxlop.expand(model), fold_bn=True)
    assert fxlop.report(unknown).fold_bn.folded == ()
    assert "2-D" in fxlop.report(unknown).fold_bn.skipped[0].reason
    folded = fxlop.fuse(fxlop.expand(model), fold_bn=True, example_inputs=x)
    assert fxlop.report(folded).fold_bn.folded == (FoldedRecord(name="0", batchnorm="1"),)
    fxlop.verify(model, folded, x)


def test_fold_leaves_shared_outputs_alone():
    class Tap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    folded = passes.fold_batchnorm(fx.symbolic_trace(Tap().eval()))
    assert fxlop.report(folded).fold_bn.folded == ()
    assert "also used" in fxlop.report(folded).fold_bn.skipped[0].reason


def _expanded_chain(mode):
    return fxlop.expand(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3)), mode=mode)


def test_foreign_node_between_factors_is_refused():
    gm = _expanded_chain("chain")
    first_op = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.conv2d)
    with gm.graph.inserting_after(first_op):
        scaled = gm.graph.call_function(torch.mul, (first_op, 2.0))
    first_op.replace_all_uses_with(scaled)
    scaled.args = (first_op, 2.0)
    gm.recompile()
    with pytest.raises(fxlop.FusionError, match=r"layer '0'.*found node 'mul'"):
        fxlop.fuse(gm)


@pytest.mark.parametrize("mode", ["online", "chain"])
def test_foreign_reader_inside_the_subgraph_is_refused(mode):
    gm = _expanded_chain(mode)
    graph = gm.graph
    inner = next(n for n in graph.nodes if n.op == "get_attr" and n.target == "2.factors.1")
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        norm = graph.call_method("norm", (inner,))
        total = graph.call_function(torch.add, (output.args[0], norm))
    output.args = (total,)
    gm.recompile()
    with pytest.raises(fxlop.FusionError, match=r"layer '2'.*node 'norm'"):
        fxlop.fuse(gm)


def test_edited_options_are_refused():
    gm = _expanded_chain("chain")
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.conv2d)
    node.kwargs = {**node.kwargs, "stride": 2}  # a 1x1 factor that suddenly strides
    gm.recompile()
    with pytest.raises(fxlop.FusionError, match="options"):
        fxlop.fuse(gm)


@pytest.mark.parametrize("mode", ["online", "chain"])
def test_saved_expanded_model_loads_and_fuses(mode):
    model = Net().eval()
    gm = fxlop.expand(model, mode=mode)
    _perturb(gm)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    fxlop.verify(gm, loaded, x, rtol=0)
    fxlop.verify(gm, fxlop.fuse(loaded), x)
    # and through a state_dict into a fresh expansion of the same model
    again = fxlop.expand(model, mode=mode, seed=123)
    again.load_state_dict(gm.state_dict())
    fxlop.verify(gm, again, x, rtol=0)


def _snapshot(gm):
    """Everything of a GraphModule that fuse must not change, copied."""
    return {
        "code": gm.code,
        "graph": [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs), sorted(n.meta)) for n in gm.graph.nodes],
        "modules": [(name, type(m), m.training) for name, m in gm.named_modules()],
        "parameters": {name: (id(p), p.detach().clone(), p.requires_grad) for name, p in gm.named_parameters()},
        "buffers": {name: (id(b), b.clone()) for name, b in gm.named_buffers()},
        "meta": copy.deepcopy(gm.meta),
    }


def _assert_same_snapshot(after, before):
    assert after["code"] == before["code"]
    assert after["graph"] == before["graph"]
    assert after["modules"] == before["modules"]
    assert after["meta"] == before["meta"]
    for kind in ("parameters", "buffers"):
        assert after[kind].keys() == before[kind].keys()
        for name, (identity, value, *flags) in after[kind].items():
            old_identity, old_value, *old_flags = before[kind][name]
            assert identity == old_identity and flags == old_flags, name
            torch.testing.assert_close(value, old_value, rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("fold_bn", [False, True])
@pytest.mark.parametrize("mode", ["online", "chain"])
def test_fuse_leaves_its_input_untouched(mode, fold_bn):
    model = Net()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    gm = fxlop.expand(model.eval(), mode=mode)
    _perturb(gm)
    gm.train()  # a model fresh from fine-tuning
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        output = gm.eval()(x)["logits"]
    gm.train()
    before = _snapshot(gm)
    fused = fxlop.fuse(gm, fold_bn=fold_bn)
    _assert_same_snapshot(_snapshot(gm), before)
    # nothing of the result is shared with the input: changing the fused model leaves gm as it was
    with torch.no_grad():
        for tensor in list(fused.parameters()) + list(fused.buffers()):
            if tensor.is_floating_point():
                tensor.add_(1.0)
    _assert_same_snapshot(_snapshot(gm), before)
    with torch.no_grad():
        assert torch.equal(gm.eval()(x)["logits"], output)


def test_fuse_of_an_eagerly_expanded_model_leaves_it_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    expanded = fxlop.expand(model, trace=False)
    _perturb(expanded)
    modules = [(name, type(m), m.training) for name, m in expanded.named_modules()]
    state = copy.deepcopy(expanded.state_dict())
    fused = fxlop.fuse(expanded)
    with torch.no_grad():
        for tensor in fused.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(1.0)
    assert [(name, type(m), m.training) for name, m in expanded.named_modules()] == modules
    assert expanded.state_dict().keys() == state.keys()
    for key, value in expanded.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
