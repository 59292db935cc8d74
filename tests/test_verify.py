import collections
import copy

import pytest
import torch
import torch.nn as nn

import fxlop
from fxlop.verify import relative_error

Pair = collections.namedtuple("Pair", "a b")


class Outputs(nn.Module):
    def __init__(self, shift=0.0):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.shift = shift

    def forward(self, x, scale=1.0):
        y = self.bn(x) * scale
        z = y.clone()
        z[1, 2] += self.shift
        return {"y": y, "nested": [Pair(z, torch.arange(3)), "tag"]}


def test_equal_models_pass_and_report_the_worst_relative_error():
    x = torch.randn(4, 3)
    assert fxlop.verify(Outputs(), Outputs(), x) == 0.0
    assert 0 < fxlop.verify(Outputs(), Outputs(shift=1e-6), x) < 1e-5


def test_deviation_names_the_output_and_element():
    x = torch.randn(4, 3)
    with pytest.raises(fxlop.EquivalenceError, match=r"output\['nested'\]\[0\]\[0\]\[1, 2\].*relative"):
        fxlop.verify(Outputs(), Outputs(shift=0.5), x)


def test_tolerance_follows_dtype_and_can_be_given():
    x = torch.randn(4, 3, dtype=torch.float64)
    reference, candidate = Outputs().double(), Outputs(shift=1e-7).double()
    with pytest.raises(fxlop.EquivalenceError, match="float64"):
        fxlop.verify(reference, candidate, x)  # fp64 default rtol is 1e-10
    assert fxlop.verify(reference, candidate, x, rtol=1e-5) > 0
    fxlop.verify(reference, candidate, x, rtol=0, atol=1e-6)


def test_modes_and_statistics_are_left_as_they_were():
    reference, candidate = Outputs(), Outputs()
    candidate.eval()
    fxlop.verify(reference, candidate, torch.randn(4, 3) * 5 + 3)
    assert reference.training and reference.bn.training and not candidate.training
    assert torch.equal(reference.bn.running_mean, torch.zeros(3))
    assert int(reference.bn.num_batches_tracked) == 0


class IgnoresScale(Outputs):
    def forward(self, x, scale=1.0):
        return super().forward(x)


def test_keyword_and_positional_inputs():
    x = torch.randn(4, 3)
    for inputs in ({"x": x, "scale": 2.0}, (x, 2.0)):
        assert fxlop.verify(Outputs(), Outputs(), inputs) == 0.0
        # every input reaches both models: one that ignores `scale` differs once scale is not 1
        with pytest.raises(fxlop.EquivalenceError, match=r"output\['y'\]"):
            fxlop.verify(Outputs(), IgnoresScale(), inputs)
    assert fxlop.verify(Outputs(), IgnoresScale(), {"x": x, "scale": 1.0}) == 0.0


def test_structure_mismatch():
    class Other(nn.Module):
        def forward(self, x):
            return {"y": x}

    with pytest.raises(fxlop.EquivalenceError, match="keys"):
        fxlop.verify(Outputs(), Other(), torch.randn(4, 3))
    with pytest.raises(fxlop.EquivalenceError, match="shape"):
        fxlop.verify(nn.Identity(), nn.Flatten(0), torch.randn(2, 2))


def test_relative_error_definition():
    reference = torch.tensor([1.0, -4.0, 0.0])
    assert relative_error(reference + torch.tensor([0.0, 0.0, 0.04]), reference) == pytest.approx(0.01)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert relative_error(torch.ones(2), torch.zeros(2)) == float("inf")
    assert relative_error(torch.tensor([float("nan")]), torch.ones(1)) == float("inf")


INF, NAN = float("inf"), float("nan")


class Const(nn.Module):
    """Returns fixed outputs (whatever the input): lets a test choose both sides of a comparison."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x):
        return self.output


def _verify(expected, got, **tolerances):
    return fxlop.verify(Const(expected), Const(got), torch.zeros(1), **tolerances)


@pytest.mark.parametrize("got", [
    [INF, 1.0, 7.0],  # an inf in the reference made the allowed deviation infinite: a 6.0 passed
    [INF, NAN, 2.0],  # a NaN where the reference has a number
    [1e30, 1.0, 2.0],  # a number where the reference has an inf
    [-INF, 1.0, 2.0],  # the inf's sign flipped
    [NAN, 1.0, 2.0],  # NaN for inf
])
def test_nonfinite_reference_does_not_hide_a_difference(got):
    with pytest.raises(fxlop.EquivalenceError, match=r"output\[\d\]: expected"):
        _verify(torch.tensor([INF, 1.0, 2.0]), torch.tensor(got))


@pytest.mark.parametrize("expected,got", [
    ([NAN, 1.0], [0.0, 1.0]), ([1.0, 2.0], [1.0, NAN]), ([1.0, 2.0], [1.0, INF]), ([1.0, -INF], [1.0, INF]),
])
def test_nonfinite_mismatch_names_the_element(expected, got):
    index = next(i for i, (e, g) in enumerate(zip(expected, got)) if not (e == g or (e != e and g != g)))
    with pytest.raises(fxlop.EquivalenceError, match=rf"output\[{index}\]: .*NaN/inf positions or signs differ at 1 of 2"):
        _verify(torch.tensor(expected), torch.tensor(got))
    assert relative_error(torch.tensor(got), torch.tensor(expected)) == INF


def test_matching_nonfinite_values_pass_and_the_tolerance_comes_from_the_finite_part():
    reference = torch.tensor([[INF, -INF, NAN], [1.0, -2.0, 0.5]])
    # fp32: allowed deviation 1e-5 * max |finite reference| = 2e-5
    close = reference + torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.5e-5, 0.0]])
    deviation = abs(close[1, 1].item() + 2.0)  # 1.5e-5 as fp32 rounds it
    assert _verify(reference, close) == relative_error(close, reference) == pytest.approx(deviation / 2, rel=1e-12)
    assert relative_error(reference.clone(), reference) == 0.0
    far = reference + torch.tensor([[0.0, 0.0, 0.0], [0.0, 3e-5, 0.0]])
    with pytest.raises(fxlop.EquivalenceError, match=r"output\[1, 1\]: expected -2, got -1.99997.*> allowed 2e-05"):
        _verify(reference, far)


def test_all_nonfinite_reference():
    reference = torch.tensor([INF, NAN])
    # matching NaN/inf patterns agree, but with no finite element nothing was compared (issue 26)
    with pytest.raises(fxlop.EquivalenceError, match="nothing to compare"):
        _verify(reference, reference.clone())
    with pytest.raises(fxlop.EquivalenceError, match="NaN/inf"):
        _verify(reference, torch.tensor([INF, 0.0]))


def test_complex_outputs_are_compared_whole():
    reference = torch.tensor([3 + 4j, 1 - 1j], dtype=torch.complex128)
    # only the imaginary part differs: comparing real parts alone passed this
    with pytest.raises(fxlop.EquivalenceError, match=r"output\[0\]: expected 3\+4j, got 3\+5j"):
        _verify(reference, reference + torch.tensor([1j, 0]))
    # the deviation is the modulus of the complex difference, relative to the largest modulus (5)
    shifted = reference + torch.tensor([(3 + 4j) * 1e-12, 0])
    assert _verify(reference, shifted) == pytest.approx(5e-12 / 5, rel=1e-6)
    assert relative_error(shifted, reference) == pytest.approx(1e-12, rel=1e-6)
    with pytest.raises(fxlop.EquivalenceError, match="complex128"):
        _verify(reference, reference + torch.tensor([(3 + 4j) * 1e-10, 0]))  # over fp64's 1e-10


def test_complex_tolerance_follows_the_part_dtype_and_nonfinite_parts_count():
    reference = torch.tensor([1 + 1j, 2 - 2j], dtype=torch.complex64)
    assert _verify(reference, reference * (1 + 2e-6)) > 0  # complex64: fp32's 1e-5
    with pytest.raises(fxlop.EquivalenceError, match="complex64"):
        _verify(reference, reference * (1 + 1e-4))
    with_inf = torch.tensor([complex(1, INF), 2 - 2j], dtype=torch.complex64)
    assert _verify(with_inf, with_inf.clone()) == 0.0
    with pytest.raises(fxlop.EquivalenceError, match=r"output\[0\].*NaN/inf"):
        _verify(with_inf, torch.tensor([complex(1, -INF), 2 - 2j], dtype=torch.complex64))
    with pytest.raises(fxlop.EquivalenceError, match=r"output\[0\]: expected 1\+infj, got 1\.5\+infj"):
        _verify(with_inf, torch.tensor([complex(1.5, INF), 2 - 2j], dtype=torch.complex64))  # the finite part


def test_worst_element_is_named_in_nested_outputs():
    reference = {"a": (torch.zeros(2, 3), torch.ones(3, 4))}
    got = {"a": (torch.zeros(2, 3), torch.ones(3, 4))}
    got["a"][1][2, 1] += 0.5
    got["a"][1][0, 3] += 0.1
    with pytest.raises(fxlop.EquivalenceError,
                       match=r"^output\['a'\]\[1\]\[2, 1\]: expected 1, got 1\.5; max abs deviation 0\.5 > allowed "
                             r"1e-05 at 2 of 12 elements \(relative 0\.5, rtol 1e-05, atol 0, dtype torch\.float32\)$"):
        _verify(reference, got)


def test_scalar_outputs():
    assert _verify(torch.tensor(2.0), torch.tensor(2.0)) == 0.0
    with pytest.raises(fxlop.EquivalenceError, match=r"output\[\]: expected 2, got 3"):
        _verify(torch.tensor(2.0), torch.tensor(3.0))
    with pytest.raises(fxlop.EquivalenceError, match=r"output\[\]: expected inf, got nan"):
        _verify(torch.tensor(INF), torch.tensor(NAN))


@pytest.mark.parametrize("bad", [dict(rtol=-1e-5), dict(atol=float("nan")), dict(rtol=float("inf")), dict(atol="0")])
def test_bad_tolerances_are_clear_errors(bad):
    with pytest.raises(fxlop.FxlopError, match=f"{next(iter(bad))} must be a finite number >= 0"):
        _verify(torch.ones(2), torch.ones(2), **bad)


def test_relative_error_needs_equal_shapes():
    with pytest.raises(fxlop.EquivalenceError, match=r"shape \(2, 1\) with one of shape \(2,\)"):
        relative_error(torch.ones(2, 1), torch.ones(2))


# --- issue 26: inputs are copied, nothing empty or non-finite counts as agreement, meta is refused


def test_each_model_gets_its_own_copy_of_the_inputs():
    x = torch.randn(4, 3)
    before = x.clone()
    # an in-place ReLU wrote into the caller's x, which the Identity then returned: "equivalent", 0.0
    with pytest.raises(fxlop.EquivalenceError, match=r"output\[\d+, \d+\]"):
        fxlop.verify(nn.Sequential(nn.ReLU(inplace=True)), nn.Sequential(nn.Identity()), x)
    assert torch.equal(x, before)

    class Nested(nn.Module):
        def forward(self, inputs):
            inputs["xs"][0].relu_()
            return inputs["xs"][0] + inputs["xs"][1]

    nested = {"xs": [x, x]}  # one tensor twice: each model's copy keeps it one tensor
    assert fxlop.verify(Nested(), Nested(), (nested,)) == 0.0
    assert nested["xs"][0] is x and torch.equal(x, before)


def test_all_nan_outputs_of_different_models_are_not_agreement():
    torch.manual_seed(0)
    x = torch.full((2, 3), float("nan"))
    reference, candidate = nn.Sequential(nn.Linear(3, 2)), nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(fxlop.EquivalenceError, match="nothing to compare"):
        fxlop.verify(reference, candidate, x)  # was 0.0
    with pytest.raises(fxlop.EquivalenceError, match="nothing to compare"):
        fxlop.verify(reference, candidate, x, layers=False)


def test_a_zero_size_batch_is_not_agreement():
    torch.manual_seed(0)
    with pytest.raises(fxlop.EquivalenceError, match="nothing to compare.*empty"):
        fxlop.verify(nn.Sequential(nn.Linear(3, 2)), nn.Sequential(nn.Linear(3, 2)), torch.randn(0, 3))


def test_an_atol_covering_an_all_zero_reference_is_not_agreement():
    with pytest.raises(fxlop.EquivalenceError, match="nothing to compare.*all zero"):
        _verify(torch.zeros(3), torch.full((3,), 1e-4), atol=1e-3)  # was inf, as a pass
    # beside something that does compare, an all-zero output must still agree within atol
    assert _verify((torch.zeros(3), torch.ones(2)), (torch.full((3,), 1e-4), torch.ones(2)), atol=1e-3) == 0.0
    with pytest.raises(fxlop.EquivalenceError, match=r"output\[0\]\[0\]"):
        _verify((torch.zeros(3), torch.ones(2)), (torch.full((3,), 1e-2), torch.ones(2)), atol=1e-3)


def test_meta_device_models_are_refused_before_anything_runs():
    calls = []

    class Counting(nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    with torch.device("meta"):
        on_meta = nn.Linear(3, 2)
    for reference, candidate in ((on_meta, Counting(3, 2)), (Counting(3, 2), on_meta)):
        with pytest.raises(fxlop.FxlopError, match=r"parameter 'weight' is on the meta device") as refused:
            fxlop.verify(reference, candidate, torch.randn(2, 3))
        assert not isinstance(refused.value, NotImplementedError)
    with pytest.raises(fxlop.FxlopError, match="example_inputs hold a tensor on the meta device"):
        fxlop.verify(Counting(3, 2), Counting(3, 2), torch.empty(2, 3, device="meta"))
    assert not calls


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_layers_option_is_checked_first(bad):
    with pytest.raises(fxlop.FxlopError, match="layers must be True or False"):
        _verify(torch.ones(2), torch.ones(2), layers=bad)


# --- issue 25: layers are compared where they are continuous, before selection can hide them


class Selects(nn.Module):
    """A linear layer, then only a selection of its scores leaves the model (as in a detector)."""

    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor(weight).reshape(2, 1))

    def forward(self, x):
        scores = self.fc(x)
        return scores.argsort(dim=1), scores > 1e6


def test_a_wrong_layer_that_selection_hides_fails_naming_it():
    x = torch.ones(3, 1)
    reference, candidate = Selects([1.0, 2.0]), Selects([1.0, 3.0])  # same order, same threshold result
    with pytest.raises(fxlop.EquivalenceError, match=r"^the models diverge at layer 'fc': its output\[\d, 1\]: "
                                                     r"expected 2, got 3.*it is the first compared module$"):
        fxlop.verify(reference, candidate, x)
    assert fxlop.verify(reference, candidate, x, layers=False) == 0.0  # what the outputs alone say


def test_exact_layers_pass_when_selection_reorders_the_outputs():
    x = torch.ones(3, 1)
    # scores 1 and 1 + 1e-7 swap places: a difference in the seventh digit reorders the output
    reference, candidate = Selects([1.0 + 1.2e-7, 1.0]), Selects([1.0, 1.0 + 1.2e-7])
    with pytest.raises(fxlop.EquivalenceError, match=r"torch.int64 outputs differ"):
        fxlop.verify(reference, candidate, x, layers=False)
    with pytest.warns(UserWarning, match=r"every compared module agreed.*select or reorder"):
        assert 0 < fxlop.verify(reference, candidate, x) < 1e-5


def test_error_that_grows_through_agreeing_layers_fails_without_selection():
    """Each layer within tolerance of its own largest value, yet wrong on a small channel that
    BatchNorm then scales up: with no op that selects or reorders, that end-to-end difference fails."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        reference[0].weight[3].mul_(1e-3)
        reference[0].bias[3] = 0.0
        reference[1].running_var.copy_(torch.tensor([1.0, 1.0, 1.0, 1e-6]))
    candidate = copy.deepcopy(reference)
    x = torch.randn(16, 8)
    with torch.no_grad():
        candidate[0].bias[3] += 0.5e-5 * reference[0](x).abs().max()  # half the fp32 tolerance of layer 0
        assert relative_error(candidate(x), reference(x)) > 1e-4
    with pytest.raises(fxlop.EquivalenceError):
        fxlop.verify(reference, candidate, x)


def test_the_reference_runs_under_the_callers_autocast_and_inference_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # both sides in bf16, compared at bf16's tolerance
        assert fxlop.verify(model, twin, x) == 0.0
    with torch.inference_mode():  # the in-place ReLU writes into an inference tensor in both threads alike
        assert fxlop.verify(model, twin, x) == 0.0


def test_a_difference_outside_the_layers_names_the_module_that_contains_it():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    candidate = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Identity()), nn.Linear(4, 2))
    candidate.load_state_dict(reference.state_dict())
    with pytest.raises(fxlop.EquivalenceError, match=r"^the models diverge at module '0': .*\(last: '0.0'\)$"):
        fxlop.verify(reference, candidate, torch.randn(8, 4))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.block(self.conv(x).relu())
        return self.fc(y.mean((2, 3))).topk(2).indices


def _scale_factor(model, name):
    with torch.no_grad():
        model.get_submodule(name).factors[0].mul_(1.5)


@pytest.mark.parametrize("path", ["eager", "graph", "export"])
def test_expanded_layers_are_compared_on_every_path(path):
    torch.manual_seed(0)
    model, x = SmallCNN().eval(), torch.randn(2, 3, 8, 8)
    if path == "export":
        expanded = fxlop.expand(torch.export.export(model, (x,)), expansion=2)
        layer = "block.0.weight"
    else:
        expanded = fxlop.expand(model, trace=path == "graph", expansion=2)
        layer = "block.0"
    assert fxlop.verify(model, expanded, x) < 1e-5
    _scale_factor(expanded, layer)
    with pytest.raises(fxlop.EquivalenceError, match=r"^the models diverge at layer 'block.0': .*\(last: 'conv'\)$"):
        fxlop.verify(model, expanded, x)
    fused = fxlop.fuse(expanded)
    assert fxlop.verify(expanded, fused, x) < 1e-5
    with pytest.raises(fxlop.EquivalenceError, match=r"^the models diverge at layer 'block.0'"):
        fxlop.verify(model, fused, x)


def test_one_model_against_itself_and_a_failing_reference():
    model, x = SmallCNN().eval(), torch.randn(2, 3, 8, 8)
    assert fxlop.verify(model, model, x) == 0.0
    with pytest.raises(fxlop.FxlopError, match="the reference model .* fails on example_inputs"):
        fxlop.verify(model, model, torch.randn(2, 5, 8, 8))
