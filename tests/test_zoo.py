"""torchvision models: prune 50 % with torch-pruning, expand, perturb the factors, fuse, verify.

torch-pruning cannot prune every model: it raises on ShuffleNet's channel shuffle, and on
SwinTransformer it does not finish building its dependency graph (minutes, no result), so those
two are expanded dense; the test checks that the others really were pruned.  ViT is pruned with
head settings (``num_heads``): torch-pruning shrinks its MLP and head dims, not the embedding width.
"""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch_pruning as tp
import torchvision.models as tvm
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import fxlop
from fxlop.verify import relative_error

NUM_CLASSES = 10


def _vit():
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=NUM_CLASSES)


def _swin():
    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=NUM_CLASSES)


# name: (factory, input side, pruned with torch-pruning?)
ZOO = {
    "resnet18": (lambda: tvm.resnet18(num_classes=NUM_CLASSES), 64, True),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(num_classes=NUM_CLASSES), 64, True),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(num_classes=NUM_CLASSES), 64, True),
    "regnet_x_400mf": (lambda: tvm.regnet_x_400mf(num_classes=NUM_CLASSES), 64, True),
    "shufflenet_v2_x0_5": (lambda: tvm.shufflenet_v2_x0_5(num_classes=NUM_CLASSES), 64, False),
    "convnext_tiny": (lambda: tvm.convnext_tiny(num_classes=NUM_CLASSES), 64, True),
    "vit (VisionTransformer, 2 layers, dim 64)": (_vit, 32, True),
    "swin (SwinTransformer, depths 2-2, dim 32)": (_swin, 32, False),
}


def _prune_half(model, x):
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES]
    num_heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=heads, num_heads=num_heads)
    pruner.step()
    return model


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_round_trip(name, measured):
    factory, side, prunable = ZOO[name]
    torch.manual_seed(0)
    model = factory().eval()
    with torch.no_grad():  # ViT's head starts at zero: make the logits depend on everything before
        for head in (m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES):
            head.weight.normal_(0, 0.05)
    x = torch.randn(2, 3, side, side)
    dense_params = sum(p.numel() for p in model.parameters())
    if prunable:
        model = _prune_half(model, x)
        # CNNs keep about a quarter; ViT keeps its embedding width (class token and position
        # embedding are not pruned), so only the MLP and head dims shrink
        assert sum(p.numel() for p in model.parameters()) < 0.85 * dense_params
    traced = fx.symbolic_trace(model)

    gm = fxlop.expand(model)
    report = gm.meta["fxlop"]["expand"]
    assert report["expanded"] and report["skipped"] == []
    measured("zoo expand fp32", fxlop.verify(traced, gm, x))
    with torch.no_grad():
        for param_name, param in gm.named_parameters():
            if ".factors." in param_name:
                param.add_(torch.randn_like(param) * 0.1 * param.std())
        assert relative_error(gm(x), traced(x)) > 1e-4  # the perturbation shows in the logits

    fused = fxlop.fuse(gm)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in traced.state_dict().items()}
    assert {n: type(m) for n, m in fused.named_modules() if n} == {n: type(m) for n, m in traced.named_modules() if n}
    measured("zoo fuse(perturbed) vs perturbed fp32", fxlop.verify(gm, fused, x))
