import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from fxlop.models import ModelError, build_model, is_torchvision_model, load_model


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg16"])
@pytest.mark.parametrize("channels,side", [(1, 16), (3, 32)])
def test_cifar_models_shapes_and_tracing(name, channels, side):
    model = build_model(name, num_classes=7, in_channels=channels).eval()
    x = torch.randn(2, channels, side, side)
    assert model(x).shape == (2, 7)
    traced = fx.symbolic_trace(model)
    assert torch.equal(traced(x), model(x))


def test_resnet_depths_by_parameter_count():
    # He et al. report 0.27M (ResNet-20) and 0.85M (ResNet-56) parameters; 1x1 projection
    # shortcuts add a few thousand. One block more or less per stage moves the count by ~0.19M.
    assert 0.26e6 < _params(build_model("resnet20", num_classes=10)) < 0.28e6
    assert 0.84e6 < _params(build_model("resnet56", num_classes=10)) < 0.87e6
    convs = [m for m in build_model("resnet56", num_classes=10).modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 55  # 6n + 1 3x3 convs, n = 9


def test_torchvision_models_by_name():
    assert is_torchvision_model("resnet18") and not is_torchvision_model("resnet20")
    model = build_model("mobilenet_v3_small", num_classes=5).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ModelError, match="3 input channels"):
        build_model("resnet18", num_classes=10, in_channels=1)
    with pytest.raises(ModelError, match="unknown model 'resnet21'.*torchvision"):
        build_model("resnet21", num_classes=10)


def test_load_model_round_trips(tmp_path):
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 16, 16)
    torch.save(model, tmp_path / "whole.pt")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pt")
    assert torch.equal(load_model(tmp_path / "whole.pt").eval()(x), model(x))
    for file in ("state.pt", "checkpoint.pt"):
        loaded = load_model(tmp_path / file, arch="resnet20", num_classes=10, in_channels=1).eval()
        assert torch.equal(loaded(x), model(x))


def test_load_model_errors(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match=r"garbage.pt is unreadable"):
        load_model(tmp_path / "garbage.pt")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    torch.save(build_model("resnet20", num_classes=10).state_dict(), tmp_path / "state.pt")
    with pytest.raises(ModelError, match="which architecture"):
        load_model(tmp_path / "state.pt")
    with pytest.raises(ModelError, match="does not fit resnet56"):
        load_model(tmp_path / "state.pt", arch="resnet56", num_classes=10)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="holds a list"):
        load_model(tmp_path / "list.pt")
