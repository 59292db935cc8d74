import itertools
import warnings

import pytest
import torch
import torch.nn as nn

from fxlop.data import load_dataset, make_loader
from fxlop.models import build_model
from fxlop.prune import IMPORTANCES, PruneError, prune

X = torch.randn(2, 1, 16, 16)
STAGE_1 = ["conv1"] + [f"layer1.{b}.conv{c}" for b in range(3) for c in (1, 2)]  # the 16-wide residual group


def _stage_widths(result):
    """Kept widths of the three stages: their residual groups and the inner convs of the blocks."""
    return [[result.widths_after[name] for name in names]
            for names in (["conv1", "layer1.0.conv1"], ["layer2.0.conv2", "layer2.0.conv1"],
                          ["layer3.0.shortcut.0", "layer3.2.conv1"])]


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return build_model("resnet20", num_classes=10, in_channels=1).eval()


@pytest.mark.parametrize("ratio,kept", [(0.5, (8, 16, 32)), (0.8, (3, 6, 12)), (0.9, (1, 3, 6))])
def test_kept_widths_follow_floor_of_the_ratio(resnet20, ratio, kept):
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    result = prune(resnet20, X, ratio=ratio)
    assert _stage_widths(result) == [[width] * 2 for width in kept]
    assert list(kept) == [int(width * (1 - ratio)) for width in (16, 32, 64)]  # torch-pruning's floor
    assert result.model.fc.out_features == 10 and result.widths_after["fc"] == 10
    assert result.widths_before["layer3.0.conv1"] == 64 and set(result.widths_before) == set(result.widths_after)
    assert result.params_before == sum(p.numel() for p in resnet20.parameters())
    assert result.params_after == sum(p.numel() for p in result.model.parameters()) < result.params_before
    assert result.macs_after < result.macs_before
    assert result.unpruned == [] and result.ignored == ["fc"]
    with torch.no_grad():
        assert result.model(X).shape == (2, 10) and torch.isfinite(result.model(X)).all()
    assert result.model is not resnet20 and not result.model.training
    assert resnet20.state_dict().keys() == before.keys()
    for key, value in resnet20.state_dict().items():  # the caller's model is untouched
        assert torch.equal(value, before[key]), key


def test_groups_that_would_round_to_zero_are_reported(resnet20):
    with pytest.warns(UserWarning, match="left 7 layers wider than ratio 0.95 asks: conv1, layer1.0.conv1"):
        result = prune(resnet20, X, ratio=0.95)
    # floor(16 * 0.05) = 0: torch-pruning keeps the whole 16-wide group; the others shrink
    assert result.unpruned == STAGE_1 and all(result.widths_after[name] == 16 for name in STAGE_1)
    assert _stage_widths(result)[1:] == [[1, 1], [3, 3]]
    assert result.params_after > prune(resnet20, X, ratio=0.9).params_after  # 0.95 is bigger than 0.9


def test_groups_refused_in_iterative_or_global_pruning_are_reported(resnet20):
    with pytest.warns(UserWarning, match="left 7 layers"):  # step 1 halves the stage, step 2 would empty it
        result = prune(resnet20, X, ratio=0.95, iterative_steps=2)
    assert result.unpruned == STAGE_1 and result.widths_after["conv1"] == 8
    with pytest.warns(UserWarning, match="wider than ratio 0.95"):
        result = prune(resnet20, X, ratio=0.95, global_pruning=True)
    # the global threshold would remove every channel of the residual groups, so they stay whole
    assert {"conv1", "layer2.0.shortcut.0", "layer3.0.shortcut.0"} <= set(result.unpruned)
    assert all(result.widths_after[name] == result.widths_before[name] for name in result.unpruned)


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_every_importance(resnet20, importance):
    data = None
    if importance == "taylor":  # a generator, consumed once, of two digits batches
        data = itertools.islice(make_loader(load_dataset("digits").train, batch_size=16, shuffle=True), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning's own notes on some criteria
        result = prune(resnet20, X, ratio=0.5, importance=importance, data=data)
    assert [widths[0] for widths in _stage_widths(result)] == [8, 16, 32]
    assert all(p.grad is None for p in result.model.parameters())


def test_importance_decides_which_channels_stay(resnet20):
    kept = {}
    for importance in ("l1", "random"):
        weight = prune(resnet20, X, ratio=0.5, importance=importance).model.layer3[0].conv1.weight
        kept[importance] = weight.flatten(1).norm(p=1, dim=1).sum().item()
    assert kept["l1"] > kept["random"]  # l1 keeps the channels of largest weights


def test_ignored_layers_by_name_or_module_and_global_pruning(resnet20):
    result = prune(resnet20, X, ratio=0.5, ignored_layers=["layer3.0.conv1", resnet20.layer2[1].conv1])
    assert result.ignored == ["fc", "layer3.0.conv1", "layer2.1.conv1"]  # the classifier always stays
    assert (result.widths_after["layer3.0.conv1"], result.widths_after["layer2.1.conv1"]) == (64, 32)
    assert result.widths_after["layer2.0.conv1"] == 16 and result.unpruned == []
    result = prune(resnet20, X, ratio=0.5, global_pruning=True, iterative_steps=2)
    assert result.params_after < result.params_before and result.widths_after["fc"] == 10
    assert sorted(result.widths_after.values()) != sorted(prune(resnet20, X, ratio=0.5).widths_after.values())


def test_training_mode_is_kept(resnet20):
    model = build_model("resnet20", num_classes=10, in_channels=1).train()
    running_mean = model.bn1.running_mean.clone()
    result = prune(model, X, ratio=0.5)
    assert result.model.training and torch.equal(model.bn1.running_mean, running_mean)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(8, 16)
        self.aux = nn.Linear(16, 4)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.trunk(x))
        return self.head(x), self.aux(x)


def test_a_changed_output_shape_is_an_error():
    with pytest.raises(PruneError, match=r"changed the model's output shapes from \[\(2, 3\), \(2, 4\)\] to "
                                         r"\[\(2, 3\), \(2, 2\)\]"):
        prune(TwoHeads(), torch.randn(2, 8), ratio=0.5)
    result = prune(TwoHeads(), torch.randn(2, 8), ratio=0.5, ignored_layers="aux")
    assert result.widths_after == {"trunk": 8, "aux": 4, "head": 3}


@pytest.mark.parametrize("kwargs,match", [
    ({"ratio": 0.0}, r"pruning ratio must be in \(0, 1\), got 0.0"), ({"ratio": 1.0}, r"in \(0, 1\)"),
    ({"ratio": 0.5, "importance": "magic"}, "unknown importance 'magic'; known: l1, l2, taylor, lamp, fpgm, random"),
    ({"ratio": 0.5, "importance": "taylor"}, "needs data"),
    ({"ratio": 0.5, "importance": "taylor", "data": []}, "got no data batches"),
    ({"ratio": 0.5, "ignored_layers": ["nope"]}, "ignored layer 'nope' is not a module"),
    ({"ratio": 0.5, "ignored_layers": [nn.Linear(2, 2)]}, "ignored layer Linear is not a module"),
    ({"ratio": 0.5, "iterative_steps": 0}, "iterative_steps"),
    ({"ratio": 0.5, "round_to": 0}, "round_to"),
])
def test_prune_errors(resnet20, kwargs, match):
    with pytest.raises(PruneError, match=match):
        prune(resnet20, X, **kwargs)


def test_prune_steps_reach_the_one_shot_widths_and_rank_by_the_weights_given_between(resnet20):
    from fxlop.prune import prune_steps

    one_shot = prune(resnet20, X, ratio=0.8)
    steps = prune_steps(resnet20, X, ratio=0.8, steps=3)
    first = next(steps)
    assert _stage_widths(first) == [[w] * 2 for w in (int(16 * (1 - 0.8 / 3)), int(32 * (1 - 0.8 / 3)),
                                                        int(64 * (1 - 0.8 / 3)))]  # a third of the way
    # between steps the caller's weights count: make the stem's first output channel the strongest
    # by far, and the next step keeps it
    model = first.model
    with torch.no_grad():
        model.conv1.weight[0].fill_(100.0)
        marker = model.conv1.weight[0].clone()
    second = next(steps)
    assert second.model is model and any(torch.equal(w, marker) for w in model.conv1.weight)
    last = next(steps)
    assert last.widths_after == one_shot.widths_after and last.params_after == one_shot.params_after
    with pytest.raises(StopIteration):
        next(steps)


def test_a_fused_graph_module_is_pruned_expanded_and_fused_again(resnet20):
    import fxlop

    fused = fxlop.fuse(fxlop.expand(prune(resnet20, X, ratio=0.5).model))
    again = prune(fused, X, ratio=0.5)
    assert _stage_widths(again) == [[w] * 2 for w in (4, 8, 16)]
    expanded = fxlop.expand(again.model)
    fxlop.verify(again.model, expanded, X)
    refused = fxlop.fuse(expanded)
    assert refused.state_dict().keys() == again.model.state_dict().keys()
    fxlop.verify(again.model, refused, X)
