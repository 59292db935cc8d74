"""fxlop among the tools around it: torch.export, ONNX, torch.compile, timm, saving."""
import io

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxlop
from fxlop.verify import relative_error
from fxlop.passes import ExpandedLayer

from conftest import FP32_RTOL


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, groups=2, padding="same"), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


X = torch.randn(2, 3, 8, 8)


def _perturbed_expansion(model, **options):
    gm = fxlop.expand(model, **options)
    with torch.no_grad():
        for param in gm.parameters():
            param.add_(0.05 * torch.randn_like(param) * param.std())
    return gm


def test_fused_and_expanded_models_export_with_torch_export():
    gm = _perturbed_expansion(_model())
    fused = fxlop.fuse(gm)
    for model in (fused, gm):
        exported = torch.export.export(model, (X,))
        fxlop.verify(model, exported.module(), X, rtol=0)


def test_fused_model_exports_to_onnx_and_keeps_the_pruned_size():
    onnx = pytest.importorskip("onnx")
    fused = fxlop.fuse(_perturbed_expansion(_model()))
    buffer = io.BytesIO()
    torch.onnx.export(fused, (X,), buffer, dynamo=True)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    weights = sum(int(torch.tensor(list(init.dims)).prod()) for init in graph.initializer if len(init.dims) > 1)
    assert weights == sum(p.numel() for p in fused.parameters() if p.dim() > 1)


def test_expand_accepts_torch_export_modules():
    model = _model()
    exported = torch.export.export(model, (X,)).module()
    for mode in ("online", "chain"):
        gm = fxlop.expand(exported, mode=mode)
        assert [e.name for e in fxlop.report(gm).expand.expanded] == ["0.weight", "3.weight", "6.weight"]
        assert fxlop.verify(model, gm, X) <= FP32_RTOL
        fused = fxlop.fuse(gm)
        assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in exported.state_dict().items()}


def test_fused_model_runs_and_expanded_model_trains_under_torch_compile():
    gm = _perturbed_expansion(_model())
    fused = fxlop.fuse(gm)
    fxlop.verify(fused, torch.compile(fused), X)

    eager, compiled = _perturbed_expansion(_model()).train(), None
    compiled_model = _perturbed_expansion(_model()).train()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model)
    y = torch.tensor([0, 3])
    losses = []
    for model in (eager, compiled):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            loss = F.cross_entropy(model(X), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        assert relative_error(b, a) <= 1e-4, name


def test_timm_reparameterize_model_gives_the_fused_model():
    model = _model()
    expanded = _perturbed_expansion(model, trace=False)
    reparameterized = timm.utils.reparameterize_model(expanded)
    # timm worked on a copy: the comparisons below are between two different models
    assert sum(isinstance(m, ExpandedLayer) for m in expanded.modules()) == 3
    fused = fxlop.fuse(expanded)
    assert [type(m) for m in reparameterized.modules()] == [type(m) for m in model.modules()]
    assert reparameterized.state_dict().keys() == model.state_dict().keys()
    fxlop.verify(fused, reparameterized, X, rtol=0)
    assert fxlop.verify(expanded, reparameterized, X) <= FP32_RTOL


def test_timm_cannot_silently_break_a_graph():
    gm = fxlop.expand(_model())
    with pytest.raises(fxlop.FusionError, match=r"passes\.fuse\(gm\)"):
        timm.utils.reparameterize_model(gm)


@pytest.mark.parametrize("name,kwargs,side", [
    ("test_resnet", {}, 64), ("test_efficientnet", {}, 64),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 32),
])
def test_timm_models_expand_and_fuse(name, kwargs, side):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(2, 3, side, side)
    gm = _perturbed_expansion(model, expansion=2)
    report = fxlop.report(gm).expand
    assert report.expanded and report.skipped == ()
    fused = fxlop.fuse(gm)
    assert fxlop.verify(gm, fused, x) <= FP32_RTOL
    assert {k: v.shape for k, v in fused.state_dict().items()} == \
        {k: v.shape for k, v in torch.fx.symbolic_trace(model).state_dict().items()}
