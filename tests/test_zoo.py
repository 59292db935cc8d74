"""torchvision models: prune 50 % with torch-pruning, expand, perturb the factors, fuse, verify.

torch-pruning cannot prune every model: it raises on ShuffleNet's channel shuffle, and on
SwinTransformer it does not finish building its dependency graph (minutes, no result), so those
two are expanded dense; the test checks that the others really were pruned.  ViT is pruned with
head settings (``num_heads``): torch-pruning shrinks its MLP and head dims, not the embedding width.
"""
import json
import re

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch_pruning as tp
import torchvision
import torchvision.models as tvm
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import fxlop
from fxlop.verify import default_rtol, relative_error

from benchmarks import common, zoo

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
    x = torch.randn(2, 3, side, side)
    dense_params = sum(p.numel() for p in model.parameters())
    if prunable:
        model = _prune_half(model, x)
        # CNNs keep about a quarter; ViT keeps its embedding width (class token and position
        # embedding are not pruned), so only the MLP and head dims shrink
        assert sum(p.numel() for p in model.parameters()) < 0.85 * dense_params
    zoo.make_outputs_depend_on_input(model, torch.randn(16, 3, side, side))  # BatchNorm statistics of 16 images
    traced = fx.symbolic_trace(model)
    with torch.no_grad():
        logits = traced(x)
        assert relative_error(logits[1], logits[0]) >= zoo.MIN_INPUT_SENSITIVITY
        # deep nets round more in fp32 than one layer does: the tolerance follows the model's own error
        rtol = zoo.fp32_tolerance({"fp32_floor": zoo.fp32_floor(traced, x)})

    gm = fxlop.expand(model)
    report = fxlop.report(gm).expand
    # nn.MultiheadAttention is a leaf of symbolic tracing that reads out_proj.weight itself:
    # its projection is left dense, and said so; every other layer is expanded
    in_attention = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    assert report.expanded and {s.name for s in report.skipped} == in_attention
    assert all("leaf module" in s.reason for s in report.skipped)
    measured("zoo expand fp32", fxlop.verify(traced, gm, x, rtol=rtol))
    with torch.no_grad():
        for param_name, param in gm.named_parameters():
            if ".factors." in param_name:
                param.add_(torch.randn_like(param) * 0.1 * param.std())
        assert relative_error(gm(x), traced(x)) > 1e-4  # the perturbation shows in the logits

    fused = fxlop.fuse(gm)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in traced.state_dict().items()}
    assert {n: type(m) for n, m in fused.named_modules() if n} == {n: type(m) for n, m in traced.named_modules() if n}
    measured("zoo fuse(perturbed) vs perturbed fp32", fxlop.verify(gm, fused, x, rtol=rtol))



def _zoo_rows() -> dict[str, dict]:
    """The committed result of ``python -m benchmarks.zoo``: one row per torchvision model."""
    return {row["model"]: row for row in json.loads((common.RESULTS / "zoo.json").read_text())["rows"]}


def test_zoo_table_lists_every_torchvision_model_with_a_reason_for_each_left_out():
    rows = _zoo_rows()
    assert sorted(rows) == sorted(torchvision.models.list_models(module=tvm))
    for name, row in rows.items():
        if row.get("traced"):
            # every model symbolic_trace accepts must round-trip, within fp32 tolerance, and the
            # comparison must mean something: logits that ignore the input would match anyway
            assert row.get("ok"), f"{name}: {row.get('reason', 'round trip failed')}"
            assert row["same_state_dict"]
            if max(row["expand_error"], row["fuse_error"]) > zoo.fp32_tolerance(row):
                # deeper than fp32 keeps to the tolerance: then the float64 round trip was exact
                assert max(row["fp64_errors"]) <= default_rtol(torch.float64), name
            assert row["input_sensitivity"] >= zoo.MIN_INPUT_SENSITIVITY, name
        else:
            assert row["reason"], name


@pytest.mark.parametrize("name", sorted(torchvision.models.list_models(module=tvm)))
def test_zoo_table_traced_column_matches_symbolic_trace(name):
    # built on the meta device where the builder allows it (RegNet computes its widths with
    # tensors): tracing needs the module structure only, not the weights
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
    except NotImplementedError:
        model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
    try:
        fx.symbolic_trace(model)
        traced = True
    except Exception:  # whatever broke tracing, the table must say it did not trace
        traced = False
    assert traced == bool(_zoo_rows()[name].get("traced"))


def test_zoo_table_shows_every_model_within_the_bound_or_refused_at_once():
    """Issue 13: at default settings, expand + fuse of every traceable model finishes within 60 s and
    8 GB of peak resident memory on the benchmark machine, or is refused at once with the estimate and
    the options that fit.  The rows must have been measured with the bound in place
    (``python -m benchmarks.zoo --update-readme``)."""
    for name, row in _zoo_rows().items():
        if not row.get("traced"):
            continue
        assert "peak_rss" in row, f"{name}: measured before the bound existed: rerun python -m benchmarks.zoo"
        if "refused_s" in row:
            assert row["refused_s"] < 5 and "Options that fit: " in row["refusal"], name
        else:
            assert zoo.within_bound(row), (f"{name}: expand {row['expand_s']:.0f} s + fuse {row['fuse_s']:.0f} s, "
                                           f"peak {row['peak_rss'] / 1e9:.1f} GB")


def test_zoo_default_cell_reads_a_real_refusal():
    model = nn.Sequential(nn.Linear(16, 96), nn.ReLU(), nn.Linear(96, 4))
    with pytest.raises(fxlop.ExpansionError) as refused:
        fxlop.expand(model, max_seconds=1e-6)
    cell = zoo._default_cell({"refused_s": 0.3, "refusal": str(refused.value)})
    assert re.fullmatch(r"refused in 0\.3 s \(max_seconds; est\. [\d.]+ [MG]B, [\d.]+ s\)", cell), cell
    within = {"expand_s": 20.0, "fuse_s": 10.0, "peak_rss": 2e9, "estimate": {"seconds": {"expand": 25, "fuse": 9}}}
    assert zoo.within_bound(within) and zoo._default_cell(within) == "yes (est. 34 s)"
    assert not zoo.within_bound({**within, "fuse_s": 41.0}) and not zoo.within_bound({**within, "peak_rss": 9e9})
