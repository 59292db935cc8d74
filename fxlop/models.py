"""Models: CIFAR-style ResNet-20/56 and VGG-16 (the paper's families), 1-D CNN and ResNet for signals
(MNIST-1D), torchvision by name, saved ones."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .errors import FxlopError
from .io import check_file

__all__ = ["build_model", "load_model", "ModelError", "CifarResNet", "CifarVGG", "SignalCNN", "CIFAR_MODELS",
           "SIGNAL_MODELS", "is_known_model"]

CIFAR_RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
CIFAR_MODELS = (*CIFAR_RESNET_DEPTHS, "vgg16")
#: models for 1-D signals ``(C, L)`` such as MNIST-1D; every other model takes images ``(C, H, W)``
SIGNAL_MODELS = ("cnn1d", "resnet1d")


class ModelError(FxlopError):
    """A model name, file or state_dict that cannot be used."""


_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


class BasicBlock(nn.Module):
    """Two 3x3 (or 3-tap, ``dims=1``) conv-BN layers and a shortcut; the shortcut is a 1x1 conv + BN
    where the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int, dims: int = 2):
        super().__init__()
        conv, norm = _CONV[dims], _NORM[dims]
        self.conv1 = conv(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = conv(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = norm(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            # option B (projection): torch-pruning prunes it together with the stage's residual
            # channels, whereas option A's zero-padded identity is not a prunable layer
            self.shortcut = nn.Sequential(conv(in_channels, channels, 1, stride, bias=False), norm(channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small inputs (He et al. 2016, section 4.2): depth 6n + 2, a 3x3 stem, three stages
    of n basic blocks with widths 16/32/64, global average pooling and a linear classifier ``fc``.

    ``dims=1`` builds the same network for 1-D signals (3-tap convs; the stem has ``stem_kernel``
    taps); ``widths`` sets the three stage widths.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, *, dims: int = 2,
                 widths: tuple[int, int, int] = (16, 32, 64), stem_kernel: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ModelError(f"a CIFAR ResNet has depth 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        blocks = (depth - 2) // 6
        conv = _CONV[dims]
        self.conv1 = conv(in_channels, widths[0], stem_kernel, 1, stem_kernel // 2, bias=False)
        self.bn1 = _NORM[dims](widths[0])
        stages, channels = [], widths[0]
        for stage, width in enumerate(widths):
            stage_blocks = []
            for index in range(blocks):
                # every stage after the first halves the resolution in its first block
                stage_blocks.append(BasicBlock(channels, width, 2 if stage and not index else 1, dims))
                channels = width
            stages.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = (nn.AdaptiveAvgPool1d if dims == 1 else nn.AdaptiveAvgPool2d)(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for module in self.modules():
            if isinstance(module, conv):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class CifarVGG(nn.Module):
    """VGG-16 with BatchNorm for small inputs: 13 3x3 conv-BN-ReLU layers of widths 64..512, global
    average pooling and one linear ``classifier``.

    It has four 2x2 max-pools, not the five of the ImageNet VGG: a fifth would take a 16x16 input
    below one pixel. The global pooling makes any input of at least 16x16 work.
    """

    CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers, channels = [], in_channels
        for item in self.CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item),
                           nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class SignalCNN(nn.Module):
    """A plain 1-D CNN for MNIST-1D-like signals: a 5-tap stem conv, three stages of two 3-tap
    conv-BN-ReLU layers (widths 32/64/128; stages 2 and 3 start with stride 2), global average
    pooling and a linear ``fc``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        layers = [nn.Conv1d(in_channels, widths[0], 5, padding=2, bias=False), nn.BatchNorm1d(widths[0]), nn.ReLU()]
        channels = widths[0]
        for stage, width in enumerate(widths):
            for index in range(2):
                stride = 2 if stage and not index else 1
                layers += [nn.Conv1d(channels, width, 3, stride, 1, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@functools.lru_cache(maxsize=None)
def _torchvision_names() -> frozenset[str]:
    return frozenset(torchvision.models.list_models(module=torchvision.models))


def is_torchvision_model(name: str) -> bool:
    """True for a torchvision classification model name (which takes 3-channel input), False for
    the CIFAR models here and for unknown names."""
    return name not in CIFAR_MODELS and name not in SIGNAL_MODELS and name in _torchvision_names()


def is_known_model(name: str) -> bool:
    """Whether :func:`build_model` knows ``name``."""
    return name in CIFAR_MODELS or name in SIGNAL_MODELS or is_torchvision_model(name)


def unknown_model_message(name: str) -> str:
    return (f"unknown model {name!r}: use one of {', '.join(CIFAR_MODELS + SIGNAL_MODELS)} or any "
            f"torchvision classification model name (e.g. resnet18, mobilenet_v3_small)")


def is_signal_model(name: str) -> bool:
    """True for the models of 1-D signals ``(C, L)`` (``cnn1d``, ``resnet1d``)."""
    return name in SIGNAL_MODELS


def build_model(name: str, *, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A freshly initialized model.

    ``name``: ``resnet20``/``resnet32``/``resnet44``/``resnet56``/``resnet110`` or ``vgg16``
    (CIFAR-style, any ``in_channels``); ``cnn1d`` (:class:`SignalCNN`) or ``resnet1d`` (a 1-D
    ResNet-14, widths 32/64/128, 5-tap stem) for 1-D signals such as MNIST-1D; or any torchvision
    classification model name such as ``resnet18`` or ``mobilenet_v3_small`` (``weights=None``;
    ``in_channels`` must be 3).

    Raises:
        ModelError: an unknown name, or options the model cannot take.
    """
    if num_classes < 1 or in_channels < 1:
        raise ModelError(f"num_classes and in_channels must be positive, got {num_classes} and {in_channels}")
    if name in CIFAR_RESNET_DEPTHS:
        return CifarResNet(CIFAR_RESNET_DEPTHS[name], num_classes, in_channels)
    if name == "vgg16":
        return CifarVGG(num_classes, in_channels)
    if name == "cnn1d":
        return SignalCNN(num_classes, in_channels)
    if name == "resnet1d":
        return CifarResNet(14, num_classes, in_channels, dims=1, widths=(32, 64, 128), stem_kernel=5)
    if is_torchvision_model(name):
        if in_channels != 3:
            raise ModelError(f"torchvision's {name} takes 3 input channels, not {in_channels} "
                             f"(load the data with channels=3 to repeat gray images)")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise ModelError(unknown_model_message(name))


def load_model(path: str | Path, *, arch: str | None = None, num_classes: int | None = None,
               in_channels: int = 3) -> nn.Module:
    """Load a model saved with ``torch.save``, on the CPU.

    The file may hold a whole module, a state_dict, or a checkpoint dict with either under
    ``"model"`` or ``"state_dict"``. A state_dict is loaded strictly into
    ``build_model(arch, num_classes=..., in_channels=...)``; ``num_classes`` defaults to the
    output size of its last 2-D weight (the classifier). The file is unpickled with
    ``weights_only=False``, which can run code: load only files you trust.

    Raises:
        ModelError: a missing or unreadable file, a state_dict without ``arch``, or one that does
            not fit the architecture; the message names the file.
    """
    return model_from_saved(read_model_file(path), path, arch=arch, num_classes=num_classes,
                            in_channels=in_channels)


def read_model_file(path: str | Path) -> nn.Module | dict:
    """What a model file holds, on the CPU: a whole module or a state_dict (unwrapped from a
    checkpoint dict's ``"model"`` or ``"state_dict"``), not yet built into a model.

    Args:
        path: the file, saved with ``torch.save``; unpickled with ``weights_only=False``.

    Returns:
        The module or the state_dict.

    Raises:
        ModelError: a missing or unreadable file, or one holding neither a model nor a state_dict.
    """
    path = check_file(path, "model file", "a file saved by torch.save", ModelError)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load raises many types on a damaged file
        raise ModelError(f"model file {path} is unreadable: {type(error).__name__}: {error}") from error
    if isinstance(saved, dict):
        for key in ("model", "state_dict"):
            if key in saved and isinstance(saved[key], (nn.Module, dict)):
                saved = saved[key]
                break
    if isinstance(saved, nn.Module):
        return saved
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ModelError(f"{path} holds a {type(saved).__name__} that is neither a model nor a state_dict")
    return saved


def model_from_saved(saved: nn.Module | dict, path: str | Path, *, arch: str | None = None,
                     num_classes: int | None = None, in_channels: int = 3) -> nn.Module:
    """The model of what :func:`read_model_file` read: a module as it is, a state_dict loaded strictly
    into ``build_model(arch, ...)``.

    Args:
        saved: a module or a state_dict.
        path: the file it came from, for the messages.
        arch: the architecture of a state_dict.
        num_classes: its classes (default: the output size of its last 2-D weight).
        in_channels: its input channels.

    Returns:
        The model.

    Raises:
        ModelError: a state_dict without ``arch``, or one that does not fit the architecture.
    """
    path = Path(path)
    if isinstance(saved, nn.Module):
        return saved
    if arch is None:
        raise ModelError(f"{path} holds a state_dict: say which architecture it belongs to (arch=, --model)")
    if num_classes is None:
        num_classes = _classifier_outputs(saved, path)
    model = build_model(arch, num_classes=num_classes, in_channels=in_channels)
    try:
        model.load_state_dict(saved)
    except RuntimeError as error:
        detail = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        hint = (" (a pruned model's state_dict fits only the pruned architecture: save the whole module)"
                if "size mismatch" in detail else "")
        raise ModelError(f"the state_dict in {path} does not fit {arch} with {num_classes} classes and "
                         f"{in_channels} input channels: {detail}{hint}") from error
    return model


def _classifier_outputs(state_dict: dict, path: Path) -> int:
    weights = [value for key, value in state_dict.items() if key.endswith("weight") and value.dim() == 2]
    if not weights:
        raise ModelError(f"the state_dict in {path} has no linear layer to read the number of classes from: "
                         f"pass num_classes")
    return weights[-1].shape[0]
