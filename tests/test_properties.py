"""Property tests over random conv/linear configurations.

CI runs the ``ci`` hypothesis profile (tens of examples per property); ``HYPOTHESIS_PROFILE=slow``
runs 2,000 per property.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fxlop
from fxlop.verify import relative_error

from conftest import FP32_RTOL, FP64_RTOL, FunctionalLayer

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_F = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@st.composite
def layers(draw):
    """A model holding one random conv/linear layer (module or functional) and an input for it."""
    dims = draw(st.integers(0, 3))
    functional = draw(st.booleans())
    bias = draw(st.booleans())
    batch = draw(st.integers(1, 3))
    if dims == 0:
        cin, cout = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        layer = (FunctionalLayer(F.linear, torch.randn(cout, cin), torch.randn(cout) if bias else None)
                 if functional else nn.Sequential(nn.Linear(cin, cout, bias=bias)))
        return layer, torch.randn(batch, cin)
    depthwise = draw(st.booleans())
    groups = draw(st.integers(1, 4)) if depthwise else draw(st.integers(1, 3))
    cin = groups * (1 if depthwise else draw(st.integers(1, 3)))
    cout = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3 if dims == 3 else 4)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding == "same" and any(s > 1 for s in stride):
        padding = "valid"  # PyTorch refuses 'same' with strides
    padding = {"int": draw(st.integers(0, 2)), "tuple": tuple(draw(st.integers(0, 2)) for _ in range(dims)),
               "same": "same", "valid": "valid"}[padding]
    size = tuple((k - 1) * d + 1 + draw(st.integers(2, 5)) for k, d in zip(kernel, dilation))
    x = torch.randn(batch, cin, *size)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if functional:
        weight = torch.randn(cout, cin // groups, *kernel)
        return FunctionalLayer(CONV_F[dims], weight, torch.randn(cout) if bias else None, **options), x
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    conv = CONV[dims](cin, cout, kernel, bias=bias, padding_mode=padding_mode, **options)
    return nn.Sequential(conv), x


expansion_options = st.fixed_dictionaries({
    "expansion": st.sampled_from([1, 1.5, 2, 4]), "depth": st.integers(2, 4),
    "mode": st.sampled_from(["online", "chain"]), "seed": st.integers(0, 2**16),
})


@given(layers(), expansion_options)
def test_expansion_is_exact(case, options):
    model, x = case
    gm = fxlop.expand(model, **options)
    assert len(fxlop.report(gm).expand.expanded) == 1
    with torch.no_grad():
        assert relative_error(gm(x), model(x)) <= FP32_RTOL


@given(layers(), expansion_options, st.floats(0.01, 1.0))
def test_fusion_is_exact_after_factor_updates(case, options, scale):
    model, x = case
    gm = fxlop.expand(model, **options)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            param.add_(torch.randn_like(param) * scale * (param.std() if param.numel() > 1 else 1))
    fused = fxlop.fuse(gm)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert relative_error(fused(x), gm(x)) <= FP32_RTOL


@given(layers(), st.integers(2, 4), st.sampled_from([1, 2, 3]))
def test_chain_and_online_have_equal_gradients(case, depth, expansion):
    model, x = case
    model, x = model.double(), x.double()
    results = []
    for mode in ("online", "chain"):
        gm = fxlop.expand(model, mode=mode, depth=depth, expansion=expansion, seed=7)
        out = gm(x)
        # a fixed random cotangent: a symmetric one can make some true gradients exactly zero
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        (out * cotangent).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in gm.named_parameters()}))
    (out_online, grads_online), (out_chain, grads_chain) = results
    assert relative_error(out_chain, out_online) <= FP64_RTOL
    assert grads_online.keys() == grads_chain.keys()
    for name, grad in grads_online.items():
        assert relative_error(grads_chain[name], grad) <= FP64_RTOL, name
