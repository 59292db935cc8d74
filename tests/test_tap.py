import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxlop
from fxlop.verify import relative_error
from fxlop import passes
from fxlop.passes.tap import layer_names, linear_layer_names, tap

from conftest import FP32_RTOL


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.bn(self.conv1(x)))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stage = nn.Sequential(Block(4), Block(4))
        self.proj = nn.Parameter(torch.randn(5, 4) * 0.5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = self.stage(self.stem(x)).mean((2, 3))
        return self.fc(F.linear(x, self.proj))


NAMES = ["stem", "stage.0", "stage.1.conv1", "stage", "proj", "fc"]


def _hooked(model, x, names=("stem", "stage.0", "stage.1.conv1", "stage", "fc")):
    """Outputs of the named modules by forward hooks (the functional `proj` by hand)."""
    values, handles = {}, []
    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: values.__setitem__(name, output)))
    handles.append(model.fc.register_forward_pre_hook(lambda module, args: values.__setitem__("proj", args[0])))
    out = model(x)
    for handle in handles:
        handle.remove()
    return out, values


def test_taps_equal_forward_hooks_and_output_is_unchanged():
    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    expected_out, hooked = _hooked(model, x)
    out, taps = tap(fx.symbolic_trace(model), NAMES)(x)
    assert torch.equal(out, expected_out)
    assert list(taps) == NAMES
    for name in NAMES:
        assert torch.equal(taps[name], hooked[name]), name


@pytest.mark.parametrize("mode", ["online", "chain"])
def test_taps_of_the_expanded_and_the_fused_model(mode):
    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    expected_out, hooked = _hooked(model, x)
    expanded = fxlop.expand(model, mode=mode)
    for gm in (expanded, fxlop.fuse(expanded)):
        with torch.no_grad():
            out, taps = tap(gm, NAMES)(x)
        assert relative_error(out, expected_out) <= FP32_RTOL
        for name in NAMES:
            assert relative_error(taps[name], hooked[name]) <= FP32_RTOL, name


def test_tapped_module_shares_parameters_and_leaves_the_original_alone():
    gm = fxlop.expand(Net())
    code = gm.code
    tapped = tap(gm, ["stem"])
    assert gm.code == code
    assert {id(p) for p in tapped.parameters()} == {id(p) for p in gm.parameters()}
    out, taps = tapped(torch.randn(2, 3, 6, 6))
    taps["stem"].sum().backward()
    assert gm.get_parameter("stem.factors.1").grad is not None


def test_taps_after_save_and_load_address_layers_without_metadata(tmp_path):
    gm = fxlop.expand(Net())
    torch.save(gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        _, expected = tap(gm, ["stem", "stage.1.conv1", "proj"])(x)
        _, found = tap(loaded, ["stem", "stage.1.conv1", "proj"])(x)
    for name, value in expected.items():
        assert torch.equal(found[name], value), name


def test_unknown_tap_is_an_error():
    # the passes, called directly, raise their own error base (fxlop's functions re-raise it as a FxlopError)
    with pytest.raises(passes.PassError, match=r"cannot tap \['nope'\]"):
        tap(fx.symbolic_trace(Net()), ["stem", "nope"])


def test_layer_name_listings():
    gm = fxlop.expand(Net())
    assert linear_layer_names(gm) == ["stem", "stage.0.conv1", "stage.0.conv2", "stage.1.conv1", "stage.1.conv2",
                                      "proj", "fc"]
    names = layer_names(gm)
    assert {"stage", "stage.0", "stage.0.bn", "proj"} <= set(names)
    assert not any(".factors" in n or n.endswith(".compose") for n in names)


@pytest.mark.parametrize("mode", ["online", "chain"])
def test_default_taps_of_a_model_expanded_without_tracing(mode):
    """An eagerly expanded model traces with its expanded layers as leaves: they are conv/linear layers
    under their module names, as in the dense model and its graph expansion, and tap their outputs."""
    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    _, hooked = _hooked(model, x, [n for n in LINEAR if n != "proj"])
    eager = fxlop.expand(model, trace=False, mode=mode)
    gm = passes.trace(eager)
    assert linear_layer_names(gm) == linear_layer_names(fxlop.expand(model)) == LINEAR
    with torch.no_grad():
        _, taps = tap(gm, LINEAR)(x)
    for name in LINEAR:
        assert relative_error(taps[name], hooked[name]) <= FP32_RTOL, name


class DictNet(Net):
    """Keyword inputs and a dict output, as Hugging Face models take and give them."""

    def forward(self, pixels, *, shift):
        return {"logits": super().forward(pixels + shift), "shift": shift}


@pytest.mark.parametrize("mode", ["online", "chain"])
def test_default_taps_of_the_export_graph_of_a_model_expanded_without_tracing(mode):
    """In the torch.export graph of an eagerly expanded model an expanded layer is no module but a
    stretch of the graph (composed factors, one conv); the module metadata names it, so the default
    taps list it under its module name and tap its output, and the tapped graph keeps the model's
    keyword inputs and output structure."""
    model = DictNet().eval()
    inputs = {"pixels": torch.randn(2, 3, 6, 6), "shift": torch.randn(2, 3, 6, 6)}
    plain = Net().eval()
    plain.load_state_dict(model.state_dict())
    _, hooked = _hooked(plain, inputs["pixels"] + inputs["shift"], [n for n in LINEAR if n != "proj"])
    eager = fxlop.expand(model, trace=False, mode=mode)
    student = torch.export.export(eager, (), inputs).module()
    teacher = torch.export.export(model, (), inputs).module()
    assert not any(type(m).__name__ == "ExpandedLayer" for m in student.modules())  # layers exist only as names
    # the expanded layers by module name; the functional call on `proj` by its parameter, as before
    assert linear_layer_names(student) == LINEAR
    assert linear_layer_names(teacher) == [f"{n}.weight" if n != "proj" else n for n in LINEAR]
    for gm in (student, teacher):
        with torch.no_grad():
            out, taps = tap(gm, LINEAR)(**inputs)
        assert set(out) == {"logits", "shift"} and torch.equal(out["shift"], inputs["shift"])
        assert relative_error(out["logits"], model(**inputs)["logits"]) <= FP32_RTOL
        for name in LINEAR:
            assert relative_error(taps[name], hooked[name]) <= FP32_RTOL, name


LINEAR = ["stem", "stage.0.conv1", "stage.0.conv2", "stage.1.conv1", "stage.1.conv2", "proj", "fc"]
