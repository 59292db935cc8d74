import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch_pruning as tp

from fxlop.models import CifarResNet, ModelError, build_model, is_torchvision_model, load_model


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg16"])
@pytest.mark.parametrize("channels,side", [(1, 16), (3, 32)])
def test_cifar_models_shapes_and_tracing(name, channels, side):
    model = build_model(name, num_classes=7, in_channels=channels).eval()
    x = torch.randn(2, channels, side, side)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 7)
        assert torch.equal(fx.symbolic_trace(model)(x), out)


def _resnet_params(n, in_channels=3, classes=10):
    """Parameters of a CIFAR ResNet with n blocks per stage and 1x1-conv + BN projections."""
    stem = 9 * in_channels * 16 + 2 * 16
    blocks = sum(9 * c_in * c + 9 * c * c + 4 * c for c_in, c in [(16, 16)] * n + [(16, 32)] + [(32, 32)] * (n - 1)
                 + [(32, 64)] + [(64, 64)] * (n - 1))
    projections = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    return stem + blocks + projections + 64 * classes + classes


def test_resnet_depths_by_parameter_count():
    # He et al. give 0.27M (ResNet-20) and 0.85M (ResNet-56); the two projection shortcuts add 2,752
    counts = {name: _params(build_model(name, num_classes=10)) for name in ("resnet20", "resnet56")}
    assert counts == {"resnet20": 272_474, "resnet56": 855_770} == {"resnet20": _resnet_params(3),
                                                                    "resnet56": _resnet_params(9)}
    assert _params(build_model("resnet20", num_classes=10, in_channels=1)) == _resnet_params(3, in_channels=1)
    assert _params(build_model("resnet32", num_classes=10)) == _resnet_params(5)  # a block per stage: +194,432
    convs = [m for m in build_model("resnet56", num_classes=10).modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 55  # 6n + 1 3x3 convs, n = 9
    vgg = build_model("vgg16", num_classes=10)
    assert [m.out_channels for m in vgg.modules() if isinstance(m, nn.Conv2d)] == \
        [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert (vgg.classifier.in_features, vgg.classifier.out_features) == (512, 10)
    with pytest.raises(ModelError, match="depth 6n \\+ 2"):
        CifarResNet(21)


@pytest.mark.parametrize("name", ["resnet56", "vgg16"])
def test_cifar_models_are_prunable_by_torch_pruning(name):
    # resnet20 is pruned at length in test_prune.py
    model = build_model(name, num_classes=10, in_channels=1).eval()
    x = torch.randn(1, 1, 16, 16)
    tp.pruner.BasePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
                         ignored_layers=[model.classifier if name == "vgg16" else model.fc]).step()
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths[:2] == ([32, 32] if name == "vgg16" else [8, 8]) and model(x).shape == (1, 10)


@pytest.mark.parametrize("name,params", [("cnn1d", 100_714), ("resnet1d", 241_258)])
def test_signal_models_shapes_tracing_and_pruning(name, params):
    model = build_model(name, num_classes=10, in_channels=1).eval()
    # cnn1d: 5-tap stem, two 3-tap convs per stage at widths 32/64/128; resnet1d: a 1-D ResNet-14 of those widths
    stem = 5 * 32 + 64
    if name == "cnn1d":
        convs = [(32, 32)] * 2 + [(32, 64), (64, 64), (64, 128), (128, 128)]
        expected = stem + sum(3 * a * b + 2 * b for a, b in convs) + 128 * 10 + 10
    else:
        blocks = [(32, 32)] * 2 + [(32, 64), (64, 64), (64, 128), (128, 128)]
        expected = (stem + sum(3 * a * b + 3 * b * b + 4 * b for a, b in blocks) + (32 * 64 + 128) + (64 * 128 + 256)
                    + 128 * 10 + 10)
    assert _params(model) == expected == params
    assert all(isinstance(m, (nn.Conv1d, nn.Linear)) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear)))
    x = torch.randn(4, 1, 40)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (4, 10) and torch.equal(fx.symbolic_trace(model)(x), out)
    tp.pruner.BasePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
                         ignored_layers=[model.fc]).step()
    assert model(x).shape == (4, 10) and _params(model) < params / 3


def test_torchvision_models_by_name():
    assert is_torchvision_model("resnet18") and is_torchvision_model("mobilenet_v3_small")
    assert not is_torchvision_model("resnet20") and not is_torchvision_model("fasterrcnn_resnet50_fpn")
    for name in ("resnet18", "mobilenet_v3_small"):
        model = build_model(name, num_classes=5).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ModelError, match="takes 3 input channels, not 1"):
        build_model("resnet18", num_classes=10, in_channels=1)
    with pytest.raises(ModelError, match="unknown model 'resnet21': use one of resnet20, .*vgg16, cnn1d, resnet1d or any torchvision"):
        build_model("resnet21", num_classes=10)
    with pytest.raises(ModelError, match="positive"):
        build_model("resnet20", num_classes=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    torch.save(model, folder / "whole.pt")
    torch.save(model.state_dict(), folder / "state.pt")
    torch.save({"model": model.state_dict(), "epoch": 3}, folder / "checkpoint.pt")
    torch.save({"state_dict": model.state_dict()}, folder / "lightning.pt")
    torch.save({"model": model, "optimizer": {}}, folder / "training.pt")  # how fxlop.train checkpoints
    return folder, model


def test_load_model_round_trips(saved):
    folder, model = saved
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        expected = model(x)
        for file in ("whole.pt", "training.pt"):
            assert torch.equal(load_model(folder / file).eval()(x), expected)
        for file in ("state.pt", "checkpoint.pt", "lightning.pt"):
            loaded = load_model(str(folder / file), arch="resnet20", num_classes=10, in_channels=1).eval()
            assert torch.equal(loaded(x), expected)
        # the number of classes defaults to the classifier's output size
        assert torch.equal(load_model(folder / "state.pt", arch="resnet20", in_channels=1).eval()(x), expected)


def test_load_model_errors(saved, tmp_path):
    folder, model = saved
    (tmp_path / "garbage.pt").write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match=r"^model file .*garbage.pt is unreadable: UnpicklingError"):
        load_model(tmp_path / "garbage.pt")
    with pytest.raises(ModelError, match="missing.pt does not exist"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(ModelError, match="state.pt holds a state_dict: say which architecture"):
        load_model(folder / "state.pt")
    with pytest.raises(ModelError, match="state.pt does not fit resnet56 .*Missing key"):
        load_model(folder / "state.pt", arch="resnet56", num_classes=10, in_channels=1)
    with pytest.raises(ModelError, match="does not fit resnet20 with 10 classes and 3 input channels: .*size mismatch"):
        load_model(folder / "state.pt", arch="resnet20", num_classes=10)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="list.pt holds a list"):
        load_model(tmp_path / "list.pt")
    with pytest.raises(ModelError) as raised:  # one line, however many keys are missing
        load_model(folder / "state.pt", arch="resnet56", in_channels=1)
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 600
