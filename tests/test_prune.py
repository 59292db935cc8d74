import warnings

import pytest
import torch
import torch.nn as nn

from fxlop.data import load_dataset, make_loader
from fxlop.models import build_model
from fxlop.prune import IMPORTANCES, PruneError, prune

X = torch.randn(2, 1, 16, 16)


def _stage_widths(result):
    return [result.widths_after[n] for n in ("conv1", "layer2.0.conv1", "layer3.0.conv1")]


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return build_model("resnet20", num_classes=10, in_channels=1).eval()


@pytest.mark.parametrize("ratio,widths", [(0.5, [8, 16, 32]), (0.8, [3, 6, 12]), (0.9, [1, 3, 6])])
def test_kept_widths_follow_floor_of_the_ratio(resnet20, ratio, widths):
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    result = prune(resnet20, X, ratio=ratio)
    assert _stage_widths(result) == widths == [int(w * (1 - ratio)) for w in (16, 32, 64)]
    assert result.model.fc.out_features == 10
    assert result.params_after < result.params_before and result.macs_after < result.macs_before
    assert result.params_after == sum(p.numel() for p in result.model.parameters())
    assert result.model(X).shape == (2, 10)
    assert result.unpruned == []
    for key, value in resnet20.state_dict().items():  # the caller's model is untouched
        assert torch.equal(value, before[key]), key


def test_layers_that_would_round_to_zero_are_reported(resnet20):
    with pytest.warns(UserWarning, match="full width"):
        result = prune(resnet20, X, ratio=0.95)
    assert "conv1" in result.unpruned and result.widths_after["conv1"] == 16
    assert result.widths_after["layer3.0.conv1"] == 3


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_every_importance(resnet20, importance):
    data = None
    if importance == "taylor":
        data = list(make_loader(load_dataset("digits").train, batch_size=32, shuffle=True))[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prune(resnet20, X, ratio=0.5, importance=importance, data=data)
    assert _stage_widths(result) == [8, 16, 32]


def test_ignored_layers_by_name_and_global_pruning(resnet20):
    result = prune(resnet20, X, ratio=0.5, ignored_layers=["fc", "layer3.0.conv1"])
    assert result.widths_after["layer3.0.conv1"] == 64 and result.widths_after["layer2.0.conv1"] == 16
    result = prune(resnet20, X, ratio=0.5, global_pruning=True, iterative_steps=2)
    assert result.params_after < result.params_before


@pytest.mark.parametrize("kwargs,match", [({"ratio": 0.0}, "in \\(0, 1\\)"), ({"ratio": 1.0}, "in \\(0, 1\\)"),
                                          ({"ratio": 0.5, "importance": "magic"}, "unknown importance"),
                                          ({"ratio": 0.5, "importance": "taylor"}, "needs data"),
                                          ({"ratio": 0.5, "ignored_layers": ["nope"]}, "not a module")])
def test_prune_errors(resnet20, kwargs, match):
    with pytest.raises(PruneError, match=match):
        prune(resnet20, X, **kwargs)
