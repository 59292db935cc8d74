"""Layers whose factors have the same shapes compose their kernels together (passes/batch.py)."""
import operator

import pytest
import torch
import torch.nn as nn

import fxlop
from fxlop import passes
import fxlop.passes.batch
from fxlop.models import build_model
from fxlop.verify import relative_error
from fxlop.passes import BatchComposer, ExpandedLayer, linalg
from fxlop.passes import cost as cost_model

from conftest import FP32_RTOL


def _resnet():
    return build_model("resnet20", num_classes=10).train()


def _batches(gm):
    return {name: m for name, m in gm.named_modules() if isinstance(m, BatchComposer)}


def _shapes(layer):
    return [tuple(f.shape) for f in layer.factors]


def test_same_shape_layers_compose_together_and_compute_the_same():
    model = _resnet()
    gm = fxlop.expand(model)
    per_layer = passes.unbatch_compositions(gm)
    sets = fxlop.report(gm).batch
    # resnet20: each stage's 3x3 convs after the first have one shape; the stem, the first conv of
    # stages 2 and 3, the 1x1 shortcuts and the classifier are alone in theirs
    assert [len(s.layers) for s in sets] == [6, 5, 5]
    for batch in sets:
        layers = [gm.get_submodule(name) for name in batch.layers]
        assert all(_shapes(layer) == _shapes(layers[0]) for layer in layers)
        assert gm.get_submodule(batch.module).layers == len(layers)
    x = torch.randn(4, 3, 32, 32)
    out, expected = gm(x), per_layer(x)
    assert relative_error(out, expected) <= FP32_RTOL
    assert relative_error(out, model(x)) <= FP32_RTOL
    out.square().mean().backward()
    expected.square().mean().backward()
    grads = dict(gm.named_parameters())
    for name, p in per_layer.named_parameters():
        assert relative_error(grads[name].grad, p.grad) <= FP32_RTOL, name


def test_unbatch_gives_back_the_per_layer_graph():
    model = _resnet()
    gm = fxlop.expand(model)
    plain = passes.expand(passes.trace(model))
    unbatched = passes.unbatch_compositions(gm)
    assert [(n.op, n.target, n.kwargs) for n in unbatched.graph.nodes] == \
           [(n.op, n.target, n.kwargs) for n in plain.graph.nodes]
    assert not _batches(unbatched) and fxlop.report(unbatched).batch is None
    assert _batches(gm)  # the input is not changed
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(unbatched(x), plain(x))


def test_fuse_of_a_batched_model_is_the_fuse_of_the_per_layer_one():
    gm = fxlop.expand(_resnet())
    with torch.no_grad():
        for p in gm.parameters():  # as if fine-tuned
            p.add_(0.01 * torch.randn_like(p))
    fused = fxlop.fuse(gm)
    expected = fxlop.fuse(passes.unbatch_compositions(gm))
    assert not _batches(fused) and not any(isinstance(m, ExpandedLayer) for m in fused.modules())
    assert fused.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), expected.state_dict().values()))
    assert _batches(gm)


def test_small_pointwise_layers_batch_and_large_ones_do_not():
    small = [nn.Conv2d(8, 8, 1) for _ in range(2)]
    large = [nn.Conv2d(256, 256, 1) for _ in range(2)]
    gm = fxlop.expand(nn.Sequential(*small, *large))
    for name in ("0", "1", "2", "3"):
        layer = gm.get_submodule(name)
        cost = cost_model.compose_cost(_shapes(layer), layer.groups, layer.kernel_index)
        assert (cost <= passes.batch.POINTWISE_MAX_MACS) == (name in ("0", "1"))
    assert [s.layers for s in fxlop.report(gm).batch] == [("0", "1")]


def test_layers_of_other_dtypes_or_shapes_are_not_batched_together():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Conv2d(4, 6, 3, padding=1))
    model[2:].double()
    gm = fxlop.expand(nn.Sequential(model[:2], _ToDouble(), model[2:]))
    assert [s.layers for s in fxlop.report(gm).batch] == [("0.0", "0.1")]


class _ToDouble(nn.Module):
    def forward(self, x):
        return x.double()


def test_batch_composer_composes_mixed_dtypes_and_devices_one_by_one():
    shapes = [(16, 4, 1, 1), (16, 16, 3, 3), (4, 16, 1, 1)]
    order = linalg.contraction_order(shapes, 1, 1)
    chains = [[torch.randn(s) for s in shapes] for _ in range(3)]
    chains[1] = [f.double() for f in chains[1]]
    composer = BatchComposer(3, 1, 1, order)
    kernels = composer(*[f for chain in chains for f in chain])
    for chain, kernel in zip(chains, kernels):
        assert kernel.dtype == chain[0].dtype
        assert torch.equal(kernel, linalg.compose(chain, 1, 1, order))
    on_meta = [[f.to("meta") for f in chains[0]], chains[2]]
    kernels = linalg.compose_many(on_meta, 1, 1, order)
    assert [k.device.type for k in kernels] == ["meta", "cpu"]
    assert torch.equal(kernels[1], linalg.compose(chains[2], 1, 1, order))


def test_batched_kernels_are_cached_in_eval_and_never_stale():
    gm = fxlop.expand(_resnet()).eval()
    name, composer = next(iter(_batches(gm).items()))
    layer = gm.get_submodule(fxlop.report(gm).batch[0].layers[2])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = gm(x)
        cached = composer._cache[1]
        gm(x)
        assert composer._cache[1] is cached  # reused while no factor changed
        layer.factors[1].data.mul_(-1.0)  # a write through .data: no version bump
        after = gm(x)
    assert composer._cache[1] is not cached
    assert not torch.equal(after, before)
    with torch.enable_grad():
        assert torch.equal(after, gm(x).detach())  # as composed afresh
    gm.train()
    assert composer._cache is None


def test_expanding_a_batched_model_again_batches_only_the_new_layers():
    model = _resnet()
    first = fxlop.expand(model, include="layer1.*")
    again = fxlop.expand(first)
    sets = fxlop.report(again).batch
    assert sets[0] == fxlop.report(first).batch[0]
    assert all(not name.startswith("layer1.") for s in sets[1:] for name in s.layers)
    assert len({s.module for s in sets}) == len(sets)
    x = torch.randn(2, 3, 32, 32)
    assert relative_error(again(x), model(x)) <= FP32_RTOL
    assert relative_error(fxlop.fuse(again)(x), model(x)) <= FP32_RTOL


def test_fuse_refuses_an_edit_that_reads_a_batched_kernel():
    gm = fxlop.expand(_resnet())
    kernel = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem)
    with gm.graph.inserting_after(kernel):
        gm.graph.call_function(torch.sum, (kernel,))
    gm.recompile()
    with pytest.raises(passes.FusionError, match="reads a kernel that 'fxlop_compose_0' composes"):
        fxlop.fuse(gm)
