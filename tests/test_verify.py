import collections

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


def test_keyword_and_positional_inputs():
    x = torch.randn(4, 3)
    fxlop.verify(Outputs(), Outputs(), {"x": x, "scale": 2.0})
    fxlop.verify(Outputs(), Outputs(), (x, 2.0))


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
