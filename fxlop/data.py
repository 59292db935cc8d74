"""Datasets: scikit-learn's embedded digits by default, MNIST-1D generated offline; CIFAR-10/100 and
ImageFolder from disk.

Every dataset yields ``(input, label)`` with ``input`` a float tensor ``(C, H, W)`` (images) or
``(C, L)`` (MNIST-1D signals) and ``label`` an int. Nothing is downloaded unless the caller asks
(``download=True``, CIFAR only).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import random
from pathlib import Path

import numpy as np

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms as T

from .errors import FxlopError

__all__ = ["DATASETS", "MNIST1D_REFERENCE", "DataError", "DatasetBundle", "TensorImages", "load_dataset",
           "make_loader"]

DATASETS = ("digits", "mnist1d", "cifar10", "cifar100", "imagefolder")
#: datasets whose inputs are 1-D signals ``(C, L)``; the others hold images ``(C, H, W)``
SIGNAL_DATASETS = ("mnist1d",)
#: published test accuracies on MNIST-1D (Greydanus 2020, the mnist1d README), for comparison
MNIST1D_REFERENCE = {"logistic regression": 32.0, "MLP": 68.0, "CNN": 94.0}
_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_CIFAR_MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                   "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
_IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: digits: share of the 1,797 images in the fixed test split, and the shift of the augmentation
_DIGITS_TEST_FRACTION = 0.3
_DIGITS_SHIFT = 2


class DataError(FxlopError):
    """A dataset is missing, malformed or unknown, or its options cannot be honoured."""


@dataclasses.dataclass
class DatasetBundle:
    """The splits of one dataset and what a model needs to know about it.

    ``train``/``val``/``test`` yield ``(input, label)``; ``val`` is None unless a validation
    fraction was asked for. ``input_shape`` is ``(C, H, W)`` of one image or ``(C, L)`` of one signal.
    """

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str


class TensorImages(Dataset):
    """Images (or 1-D signals) held in memory as one ``(N, C, H, W)`` (``(N, C, L)``) tensor with their labels.

    With ``shift`` > 0 (images only) every access translates the image by a random integer offset of up to
    ``shift`` pixels in each direction (pad with ``background``, random crop back to size),
    drawn from torch's RNG, so seeded runs and seeded DataLoader workers reproduce it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int = 0, background: float = 0.0):
        self.images, self.labels = images, labels
        size = tuple(images.shape[-2:])
        self.augment = T.RandomCrop(size, padding=shift, fill=background) if shift else None

    @property
    def fixed_inputs(self) -> bool:
        """True without augmentation: an index always gives the same input (a teacher's outputs for it
        can be kept, see :func:`fxlop.train.fixed_inputs`)."""
        return self.augment is None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        return image, int(self.labels[index])


def load_dataset(name: str, *, data_dir: str | None = None, download: bool = False, image_size: int | None = None,
                 channels: int | None = None, val_fraction: float = 0.0, split_seed: int = 0,
                 augment: bool = True) -> DatasetBundle:
    """Load a dataset with its fixed train/test split and an optional validation split.

    - ``digits`` (the default; embedded in scikit-learn, works offline): the 1,797 real 8x8
      digits, upsampled bilinearly to ``image_size`` (16 by default), scaled to [0, 1] and
      normalized with the mean/std of the training part; a fixed stratified 30 % test split
      (1,257 train / 540 test) that no seed moves; training images shifted by up to 2 px when
      ``augment``. ``channels=3`` repeats the gray channel (for RGB models).
    - ``mnist1d`` (embedded: generated offline by the ``mnist1d`` package with its published
      arguments, ``make_dataset(get_dataset_args())``): 4,000 train / 1,000 test signals of shape
      ``(1, 40)``, 10 classes, already centered and scaled by the generator; no augmentation.
      Published test accuracies: logistic regression 32 %, MLP 68 %, CNN 94 %
      (:data:`MNIST1D_REFERENCE`). ``channels`` repeats the signal; ``image_size`` does not apply.
    - ``cifar10``/``cifar100``: torchvision's python batches in ``data_dir`` (``download=True``
      fetches them); random crop 32 with padding 4 and horizontal flips when ``augment``.
    - ``imagefolder``: ``data_dir/train`` and ``data_dir/val`` (or ``test``), one folder per
      class; resized and center-cropped to ``image_size`` (224 by default), ImageNet statistics.

    ``val_fraction`` carves a stratified validation split off the training data (seeded by
    ``split_seed``), without augmentation, for choosing settings without touching the test split.

    Raises:
        DataError: unknown name, missing directory or files, options the dataset cannot honour;
            the message says what was expected where.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if name == "digits":
        return _digits(16 if image_size is None else image_size, 1 if channels is None else channels, val_fraction, split_seed, augment)
    if name == "mnist1d":
        if image_size is not None:
            raise DataError(f"mnist1d holds 1-D signals of length 40; image_size does not apply, got {image_size}")
        return _mnist1d(1 if channels is None else channels, val_fraction, split_seed)
    if name in ("cifar10", "cifar100"):
        _rgb_only(name, channels)
        if image_size not in (None, 32):
            raise DataError(f"{_TITLES[name]} images are 32x32; image_size must be 32 (or unset), got {image_size}")
        return _cifar(name, _existing_dir(name, data_dir), download, val_fraction, split_seed, augment)
    if name == "imagefolder":
        _rgb_only(name, channels)
        if image_size is not None and image_size < 1:
            raise DataError(f"image_size must be positive, got {image_size}")
        return _imagefolder(_existing_dir(name, data_dir), 224 if image_size is None else image_size, val_fraction, split_seed, augment)
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int = 0, workers: int = 0,
                distributed: bool = False, drop_last: bool = False) -> DataLoader:
    """A DataLoader whose order and worker seeds depend only on ``seed``.

    With ``distributed=True`` (needs the process group, see :func:`fxlop.train.init_distributed`)
    a ``DistributedSampler`` shards the data; call ``loader.sampler.set_epoch(epoch)`` every epoch.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    # the generator shuffles (non-distributed) and seeds the workers, whose torch RNG drives augmentation
    generator = torch.Generator().manual_seed(seed)
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          drop_last=drop_last, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
                      generator=generator)


def _digits(image_size: int, channels: int, val_fraction: float, split_seed: int, augment: bool) -> DatasetBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if image_size < 8:
        raise DataError(f"digits are 8x8 images; image_size must be at least 8, got {image_size}")
    if channels < 1:
        raise DataError(f"channels must be positive, got {channels}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=_DIGITS_TEST_FRACTION,
                                           stratify=labels.numpy(), random_state=0)
    # statistics of the whole training part, taken before a validation split is carved off, so
    # the test images are identical whatever the split seed
    mean, std = images[train_idx].mean(), images[train_idx].std()
    val_idx = None
    if val_fraction:
        train_idx, val_idx = _stratified_split(train_idx, labels.numpy()[train_idx], val_fraction, split_seed,
                                               "digits")
    images = ((images - mean) / std).repeat(1, channels, 1, 1)
    background = float(-mean / std)  # a 0 pixel, normalized: what surrounds every digit

    def subset(indices, shift):
        return TensorImages(images[indices], labels[indices], shift, background)

    return DatasetBundle(
        train=subset(train_idx, _DIGITS_SHIFT if augment else 0),
        val=None if val_idx is None else subset(val_idx, 0), test=subset(test_idx, 0),
        num_classes=10, input_shape=tuple(images.shape[1:]), name="digits")


def _mnist1d(channels: int, val_fraction: float, split_seed: int) -> DatasetBundle:
    if channels < 1:
        raise DataError(f"channels must be positive, got {channels}")
    x, y, x_test, y_test = _mnist1d_arrays()
    signals = torch.tensor(x, dtype=torch.float32).unsqueeze(1).repeat(1, channels, 1)
    labels = torch.tensor(y, dtype=torch.long)
    train_idx, val_idx = np.arange(len(labels)), None
    if val_fraction:
        train_idx, val_idx = _stratified_split(train_idx, y, val_fraction, split_seed, "mnist1d")
    test = TensorImages(torch.tensor(x_test, dtype=torch.float32).unsqueeze(1).repeat(1, channels, 1),
                        torch.tensor(y_test, dtype=torch.long))
    return DatasetBundle(
        train=TensorImages(signals[train_idx], labels[train_idx]),
        val=None if val_idx is None else TensorImages(signals[val_idx], labels[val_idx]), test=test,
        num_classes=10, input_shape=tuple(signals.shape[1:]), name="mnist1d")


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays():
    """The published MNIST-1D split, generated (about 4 s) once per process."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise DataError("dataset 'mnist1d' needs the mnist1d package: pip install mnist1d") from error
    # make_dataset seeds Python's and NumPy's global generators; the caller's streams stay as they were
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


def _rgb_only(name: str, channels: int | None) -> None:
    if channels not in (None, 3):
        raise DataError(f"dataset {name!r} has RGB images; channels must be 3 (or unset), got {channels}")


def _existing_dir(name: str, data_dir: str | None) -> Path:
    if not data_dir:
        raise DataError(f"dataset {name!r} is read from a directory: pass data_dir (--data-dir)")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist (dataset {name!r})")
    return path


def _cifar(name: str, root: Path, download: bool, val_fraction: float, split_seed: int,
           augment: bool) -> DatasetBundle:
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    normalize = [T.ToTensor(), T.Normalize(*_CIFAR_MEAN_STD[name])]
    train_tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    try:
        train = cls(str(root), train=True, download=download, transform=T.Compose(train_tf + normalize))
        test = cls(str(root), train=False, download=False, transform=T.Compose(normalize))
    except Exception as error:  # torchvision: RuntimeError, a failed download, or a damaged pickle
        raise DataError(_cifar_problem(cls, _TITLES[name], root, download, error)) from error
    train, val = _carve(train, T.Compose(normalize), val_fraction, split_seed, name)
    return DatasetBundle(train=train, val=val, test=test, num_classes=len(test.classes), input_shape=(3, 32, 32),
                         name=name)


def _cifar_problem(cls, title: str, root: Path, download: bool, error: Exception) -> str:
    """Say what is wrong with a CIFAR folder: where it should be, which files are missing, or that
    the files are damaged."""
    folder = root / cls.base_folder
    files = [file for file, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    hint = (f"downloading failed: {type(error).__name__}: {error}" if download
            else "pass --download to fetch it when online")
    if not folder.is_dir():
        return f"{title} not found in {root}: expected {folder} ({hint})"
    missing = [file for file in files if not (folder / file).is_file()]
    if missing:
        return f"{title} in {folder} is incomplete: missing {', '.join(missing)} ({hint})"
    if isinstance(error, RuntimeError) and "not found or corrupted" in str(error):
        reason = "its files fail torchvision's md5 check"
    else:
        reason = f"{type(error).__name__}: {error}"
    return f"{title} in {folder} is damaged: {reason} (delete {folder} and pass --download to fetch it again)"


def _imagefolder(root: Path, image_size: int, val_fraction: float, split_seed: int, augment: bool) -> DatasetBundle:
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"ImageFolder data in {root}: expected {root / 'train'} and {root / 'val'} (or test), "
                        f"each with one sub-directory of images per class")
    normalize = [T.ToTensor(), T.Normalize(*_IMAGENET_MEAN_STD)]
    # the usual ImageNet evaluation: resize the short side to 8/7 of the crop (256 for 224), center crop
    eval_tf = T.Compose([T.Resize(round(image_size * 8 / 7)), T.CenterCrop(image_size)] + normalize)
    train_tf = (T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] + normalize) if augment
                else eval_tf)
    try:
        train = torchvision.datasets.ImageFolder(str(root / "train"), train_tf)
        test = torchvision.datasets.ImageFolder(str(test_dir), eval_tf)
    except (FileNotFoundError, RuntimeError) as error:  # no class folders, or no images in them
        raise DataError(f"ImageFolder data in {root} is unusable: {error}") from error
    if train.classes != test.classes:
        raise DataError(f"ImageFolder classes differ between {root / 'train'} ({len(train.classes)}) and "
                        f"{test_dir} ({len(test.classes)}): {sorted(set(train.classes) ^ set(test.classes))[:5]}")
    train, val = _carve(train, eval_tf, val_fraction, split_seed, "imagefolder")
    return DatasetBundle(train=train, val=val, test=test, num_classes=len(test.classes),
                         input_shape=(3, image_size, image_size), name="imagefolder")


def _carve(train, eval_transform, val_fraction: float, split_seed: int, name: str):
    """Split a stratified validation subset off a torchvision dataset; the validation images get
    the evaluation transform (no augmentation) through a shallow copy that shares the data."""
    if not val_fraction:
        return train, None
    from torchvision.datasets.vision import StandardTransform

    train_idx, val_idx = _stratified_split(list(range(len(train.targets))), train.targets, val_fraction,
                                           split_seed, name)
    plain = copy.copy(train)
    plain.transform, plain.transforms = eval_transform, StandardTransform(eval_transform, train.target_transform)
    return Subset(train, train_idx), Subset(plain, val_idx)


def _stratified_split(indices, labels, val_fraction: float, split_seed: int, name: str):
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(indices, test_size=val_fraction, stratify=labels, random_state=split_seed)
    except ValueError as error:  # too few samples for every class to appear on both sides
        detail = str(error) if len(str(error)) <= 200 else str(error)[:200] + " ..."
        raise DataError(f"cannot carve a stratified validation split of {val_fraction} off the {len(indices)} "
                        f"training images of {name!r}: {detail}") from error
