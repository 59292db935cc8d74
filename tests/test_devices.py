"""Factors are created where the weight lives, in its dtype, reproducibly; no pass assumes the CPU.

Any CPU machine can check this: on the meta device every tensor that an operation creates is a meta
tensor, and torch refuses to mix a meta tensor with a CPU one, so a factor drawn on (or a computation
moved to) the CPU shows up as an error or as a CPU tensor recorded below.  The CUDA run is
``python -m benchmarks.gpu_check``.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fxlop
from fxlop.verify import relative_error
from fxlop.passes import ExpandedLayer, linalg

from conftest import FP64_RTOL, FunctionalLayer


class DeviceLog(TorchDispatchMode):
    """Records the device of every tensor any aten op produces, and the generators it is given."""

    def __init__(self):
        super().__init__()
        self.devices = set()
        self.generators = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("generator") is not None:
            self.generators.append(kwargs["generator"].device)
        out = func(*args, **kwargs)
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor):
                self.devices.add(value.device.type)
        return out


class Calls(TorchFunctionMode):
    """Records the factory calls (randn and friends) with their device and generator arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.randn, torch.rand, torch.empty, torch.zeros, torch.eye, torch.normal):
            self.calls.append((func.__name__, kwargs.get("device"), kwargs.get("generator")))
        return func(*args, **kwargs)


def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


@pytest.mark.parametrize("trace", [True, False])
@pytest.mark.parametrize("init", ["orthogonal", "balanced"])
def test_meta_model_expands_to_meta_factors_without_touching_the_cpu(trace, init):
    cpu = fxlop.expand(_model(), trace=trace, init=init)
    with torch.device("meta"):
        model = _model()
    log = DeviceLog()
    with log:
        gm = fxlop.expand(model, trace=trace, init=init)
    assert log.devices == {"meta"}, log.devices  # no tensor was made anywhere else
    assert log.generators == []  # nothing is drawn on meta, so no (CPU) generator is used either
    factors = {n: p for n, p in gm.named_parameters() if ".factors." in n}
    assert factors and all(p.device.type == "meta" for p in gm.parameters())
    # the same structure as the expansion of the same model on the CPU
    assert {n: p.shape for n, p in factors.items()} == {n: p.shape for n, p in cpu.named_parameters()
                                                        if ".factors." in n}
    with log:
        fused = fxlop.fuse(gm)
    assert log.devices == {"meta"}
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("depth", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_factorize_creates_every_tensor_on_the_weight_device(depth, dtype):
    weight = torch.empty(12, 3, 3, 3, device="meta", dtype=dtype)  # groups=2: 6 input channels
    shapes, kernel_index = linalg.chain_shapes(weight.shape, 2, 4, depth)
    calls, log = Calls(), DeviceLog()
    with calls, log:
        factors = linalg.factorize(weight, 2, shapes, kernel_index, linalg.generator(0, "meta"))
    assert [tuple(f.shape) for f in factors] == [tuple(s) for s in shapes]
    assert all(f.device.type == "meta" and f.dtype == dtype for f in factors)
    assert log.devices == {"meta"}
    draws = [call for call in calls.calls if call[0] == "randn"]
    assert len(draws) == depth - 1 and all(torch.device(device).type == "meta" for _, device, _ in draws)


def test_factorize_draws_with_a_generator_on_the_weight_device():
    weight = torch.randn(6, 4)
    shapes, kernel_index = linalg.chain_shapes(weight.shape, 1, 4, 3)
    calls = Calls()
    with calls:
        linalg.factorize(weight, 1, shapes, kernel_index, linalg.generator(3, weight.device, "layer"))
    draws = [(device, gen) for name, device, gen in calls.calls if name == "randn"]
    assert len(draws) == 2
    assert all(torch.device(device) == weight.device and gen.device == weight.device for device, gen in draws)
    assert linalg.generator(0, "meta") is None


def test_a_generator_on_another_device_is_refused():
    # torch itself draws meta tensors with a CPU generator without complaint: factorize does not
    weight = torch.empty(6, 4, device="meta")
    shapes, kernel_index = linalg.chain_shapes(weight.shape, 1, 4, 3)
    with pytest.raises(ValueError, match="generator on cpu .* weight on meta"):
        linalg.factorize(weight, 1, shapes, kernel_index, torch.Generator())


def test_same_seed_same_factors_and_each_layer_its_own_draw():
    model = _model()
    first, again, other = fxlop.expand(model, seed=5), fxlop.expand(model, seed=5), fxlop.expand(model, seed=6)
    for (name, a), b, c in zip(first.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b), name
        if name.endswith((".factors.0", ".factors.2")):
            assert not torch.equal(a, c), name
    # a layer's factors depend on the seed and its name, not on which other layers are expanded
    alone = fxlop.expand(model, seed=5, include=["6"])
    assert torch.equal(alone.get_parameter("6.factors.0"), first.get_parameter("6.factors.0"))
    assert torch.equal(alone.get_parameter("6.factors.1"), first.get_parameter("6.factors.1"))


SHAPES = [((48, 32), 1), ((32, 48), 1), ((24, 4, 3, 3), 2), ((512, 256), 1)]


@pytest.mark.parametrize("dtype,bound,shape,groups", [(torch.float32, 3e-8, *case) for case in SHAPES + [((8, 1, 3, 3), 8)]]
                         + [(torch.bfloat16, 8e-4, *case) for case in SHAPES])
def test_kernel_is_solved_from_the_factors_as_held(shape, groups, dtype, bound):
    """The outer factors are drawn in float32 and rounded to the weight's dtype; the kernel factor is
    solved in float64 from those rounded factors (pseudo-inverses, not transposes), so the chain's
    product is the weight to the rounding of the kernel alone: measured <= 1.7e-8 in fp32, <= 5.3e-4
    in bf16 (1.1e-3 depthwise, 9 entries per group: not held to the bf16 bound).  Transposes of the
    float32 factors instead leave ~3e-7 in fp32; a kernel solved before rounding them, 1.3e-3 in bf16."""
    weight = torch.randn(*shape, dtype=torch.float64).to(dtype)
    shapes, kernel_index = linalg.chain_shapes(weight.shape, groups, 4, 3)
    factors = linalg.factorize(weight, groups, shapes, kernel_index, linalg.generator(0, "cpu"))
    assert all(f.dtype == dtype for f in factors)
    product = linalg.compose([f.double() for f in factors], groups, kernel_index)
    error = (product - weight.double()).norm() / weight.double().norm()
    assert error <= bound, error.item()
    # and the outer factors are orthonormal to the precision they are held in
    for index in (0, 2):
        m = linalg.grouped(factors[index], groups)[..., 0].double()
        gram = m.mT @ m if index == 0 else m @ m.mT
        assert (gram - torch.eye(gram.shape[-1], dtype=torch.float64)).abs().max() < 30 * torch.finfo(dtype).eps


def test_float64_weights_give_float64_exactness():
    weight = torch.randn(40, 30, dtype=torch.float64)
    shapes, kernel_index = linalg.chain_shapes(weight.shape, 1, 4, 3)
    factors = linalg.factorize(weight, 1, shapes, kernel_index, linalg.generator(0, "cpu"))
    assert relative_error(linalg.compose(factors, 1, kernel_index), weight) < FP64_RTOL


def test_devices_without_float64_compose_in_float32():
    assert linalg.compute_dtype("mps") == torch.float32
    assert linalg.compute_dtype("cpu") == linalg.compute_dtype("cuda") == linalg.compute_dtype("meta") == torch.float64
    assert linalg.draw_dtype(torch.bfloat16) == linalg.draw_dtype(torch.float32) == torch.float32
    assert linalg.draw_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize("rows,cols", [(200, 64), (64, 200), (130, 65), (300, 100)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_cholesky_qr_draws_are_orthonormal_and_haar_signed(rows, cols, dtype, tol):
    q = linalg.orthonormal(rows, cols, linalg.generator(1, "cpu"), batch=2, dtype=dtype, device="cpu")
    assert q.shape == (2, rows, cols) and q.dtype == dtype
    gram = q.mT @ q if rows >= cols else q @ q.mT
    assert (gram - torch.eye(min(rows, cols), dtype=dtype)).abs().max() < tol
    # the same matrix Householder QR gives with R's diagonal made positive
    g = torch.randn(2, max(rows, cols), min(rows, cols), generator=linalg.generator(1, "cpu"), dtype=dtype)
    householder, r = torch.linalg.qr(g)
    householder = householder * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    expected = householder if rows >= cols else householder.mT
    assert (q - expected).abs().max() < 100 * tol


def test_functional_weights_on_meta():
    with torch.device("meta"):
        model = FunctionalLayer(F.conv2d, torch.empty(6, 2, 3, 3), torch.empty(6), groups=2, padding=1)
    gm = fxlop.expand(model)
    assert isinstance(gm.get_submodule("weight"), ExpandedLayer)
    assert all(p.device.type == "meta" for p in gm.parameters())


def test_expand_and_fuse_under_a_callers_autocast_stay_exact():
    """Under bf16 autocast (CPU here, CUDA alike) the float32 products that draw and solve the factors
    would run in bf16: measured 3e-5 instead of 3e-7 before the passes turned autocast off.

    The bound is fp32's: each output is an inner product of length <= 400 through weights composed from
    fp32 factors, whose roundoff is about sqrt(400) * eps = 2.4e-6 per layer; measured 4.5e-7 to 6.6e-7
    across CPU kernel sets (the old bound of 1e-6 left less than 2x of room)."""
    model = nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 200))
    x = torch.randn(4, 300)
    torch.set_float32_matmul_precision("high")  # TF32 where the device has it: the passes use full float32
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gm = fxlop.expand(model)
        with torch.no_grad():
            assert relative_error(gm(x), model(x)) <= 5e-6
            for param in gm.parameters():
                param.add_(0.01 * torch.randn_like(param))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = fxlop.fuse(gm)
        with torch.no_grad():
            assert relative_error(fused(x), gm(x)) <= 5e-6
        assert torch.get_float32_matmul_precision() == "high"  # the caller's setting is back
    finally:
        torch.set_float32_matmul_precision("highest")
