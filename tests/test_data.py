import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Subset

from fxlop.data import DataError, load_dataset, make_loader

DIGITS_PER_CLASS = np.bincount(load_digits().target)  # 174..183 images of each digit


@pytest.fixture(scope="module")
def plain():
    return load_dataset("digits", augment=False)


def _labels(dataset):
    return [int(dataset[i][1]) for i in range(len(dataset))]


def _fingerprints(dataset):
    """One hash per image, taken before augmentation: the identity of a sample (the 1,797 digits
    are pairwise distinct)."""
    return {hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in dataset.images}


def test_digits_fixed_stratified_split(plain):
    assert (len(plain.train), len(plain.test), plain.val) == (1257, 540, None)
    assert (plain.num_classes, plain.input_shape, plain.name) == (10, (1, 16, 16), "digits")
    image, label = plain.train[0]
    assert image.dtype == torch.float32 and image.shape == (1, 16, 16) and isinstance(label, int)
    # stratified: every class sits in the test split with 30 % of its images, up to rounding
    test_counts = np.bincount(_labels(plain.test), minlength=10)
    assert np.all(np.abs(test_counts - 0.3 * DIGITS_PER_CLASS) <= 1), test_counts
    assert np.all(np.bincount(_labels(plain.train), minlength=10) == DIGITS_PER_CLASS - test_counts)
    train, test = _fingerprints(plain.train), _fingerprints(plain.test)
    assert len(train) == 1257 and len(test) == 540 and not train & test


def test_validation_split_is_carved_from_train_and_test_never_moves(plain):
    bundles = [load_dataset("digits", val_fraction=0.2, split_seed=seed, augment=False) for seed in (0, 1)]
    for bundle in bundles:
        assert (len(bundle.train), len(bundle.val)) == (1005, 252)
        assert torch.equal(bundle.test.images, plain.test.images) and _labels(bundle.test) == _labels(plain.test)
        train, val = _fingerprints(bundle.train), _fingerprints(bundle.val)
        assert not train & val and train | val == _fingerprints(plain.train)
        assert set(_labels(bundle.val)) == set(_labels(bundle.train)) == set(range(10))
    assert _fingerprints(bundles[0].val) != _fingerprints(bundles[1].val)
    assert load_dataset("digits", val_fraction=0.2).val.augment is None  # validation images are never shifted


def test_normalization_image_sizes_and_channels(plain):
    images = plain.train.images
    assert abs(images.mean().item()) < 1e-5 and abs(images.std().item() - 1) < 1e-5
    assert abs(plain.test.images.mean().item()) < 0.1  # test normalized with the training statistics
    carved = load_dataset("digits", val_fraction=0.25, augment=False)  # statistics of train + val together
    both = torch.cat([carved.train.images, carved.val.images])
    assert abs(both.mean().item()) < 1e-5 and abs(both.std().item() - 1) < 1e-5
    big = load_dataset("digits", image_size=32, channels=3, augment=False)
    assert big.input_shape == (3, 32, 32) and big.train[0][0].shape == (3, 32, 32)
    assert torch.equal(big.train.images[:, 0], big.train.images[:, 2])
    # the upsampling is bilinear, once: downsampling the 32x32 image by 2 lands near the 16x16 one
    small = F.avg_pool2d(big.train.images[:, :1], 2)
    assert torch.corrcoef(torch.stack([small.flatten(), images.flatten()]))[0, 1] > 0.95


def _shift_of(image, reference, background, limit=2):
    """The (dy, dx) that turns ``reference`` into ``image`` (padding with ``background``), or None."""
    padded = F.pad(reference, (limit,) * 4, value=background)
    size = reference.shape[-1]
    for dy in range(2 * limit + 1):
        for dx in range(2 * limit + 1):
            if torch.equal(padded[:, dy:dy + size, dx:dx + size], image):
                return dy - limit, dx - limit
    return None


def test_augmentation_shifts_by_up_to_two_pixels_keeps_labels_and_is_seeded(plain):
    augmented = load_dataset("digits")
    background = plain.train.images.min().item()  # the normalized value of a 0 pixel
    torch.manual_seed(0)
    first = [augmented.train[i] for i in range(40)]
    torch.manual_seed(0)
    again = [augmented.train[i] for i in range(40)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert [label for _, label in first] == _labels(plain.train)[:40]
    shifts = [_shift_of(image, plain.train.images[i], background) for i, (image, _) in enumerate(first)]
    assert None not in shifts and sum(shift != (0, 0) for shift in shifts) >= 30
    assert len(set(shifts)) >= 10  # many different offsets, within +-2 px
    assert torch.equal(augmented.test.images, plain.test.images) and augmented.test.augment is None


def test_loader_order_and_worker_augmentation_depend_only_on_the_seed(plain):
    def order(seed):
        return torch.cat([y for _, y in make_loader(plain.test, batch_size=64, shuffle=True, seed=seed)])

    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))
    assert sorted(order(3).tolist()) == sorted(_labels(plain.test))
    subset = Subset(load_dataset("digits").train, range(48))

    def images(seed):  # two worker processes, each seeded from the loader's generator
        return torch.cat([x for x, _ in make_loader(subset, batch_size=8, shuffle=False, seed=seed, workers=2)])

    assert torch.equal(images(5), images(5)) and not torch.equal(images(5), images(6))
    with pytest.raises(DataError, match="batch_size"):
        make_loader(subset, batch_size=0, shuffle=False)


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "mnist"}, r"unknown dataset 'mnist'; known: digits, mnist1d, cifar10, cifar100, imagefolder"),
    ({"name": "cifar10"}, "pass data_dir"),
    ({"name": "imagefolder", "data_dir": "/nonexistent/x"}, "/nonexistent/x does not exist"),
    ({"name": "digits", "val_fraction": 1.0}, r"val_fraction must be in \[0, 1\), got 1.0"),
    ({"name": "digits", "val_fraction": -0.1}, "val_fraction"),
    ({"name": "digits", "val_fraction": 0.001}, "cannot carve a stratified validation split"),
    ({"name": "digits", "image_size": 4}, "at least 8"),
    ({"name": "cifar10", "data_dir": "/", "image_size": 64}, "32x32"),
    ({"name": "cifar100", "data_dir": "/", "channels": 1}, "channels must be 3"),
])
def test_data_errors(kwargs, match):
    with pytest.raises(DataError, match=match):
        load_dataset(**kwargs)


CIFAR_LAYOUT = {  # folder, batches (train then test), label key, meta file, meta key
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels",
                "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", ["train", "test"], "fine_labels", "meta", "fine_label_names"),
}


def _fake_cifar(root, name, per_batch=20, value=None):
    """A tiny CIFAR folder in the real format: pickled dicts of uint8 rows (3 x 32 x 32, channel
    planes) and labels, plus the meta file with the class names."""
    folder, batches, label_key, meta, meta_key = CIFAR_LAYOUT[name]
    classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(0)
    (root / folder).mkdir()
    for batch in batches:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8) if value is None else \
            np.full((per_batch, 3072), value, dtype=np.uint8)
        labels = [i % classes for i in range(per_batch)]
        (root / folder / batch).write_bytes(pickle.dumps({"data": data, label_key: labels}))
    (root / folder / meta).write_bytes(pickle.dumps({meta_key: [f"class{i}" for i in range(classes)]}))
    return root / folder


@pytest.mark.parametrize("name,title", [("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100")])
def test_missing_or_damaged_cifar_says_what_was_expected_where(tmp_path, name, title):
    folder = tmp_path / CIFAR_LAYOUT[name][0]
    with pytest.raises(DataError, match=rf"^{title} not found in {tmp_path}: expected {folder} \(pass --download"):
        load_dataset(name, data_dir=str(tmp_path))
    _fake_cifar(tmp_path, name)
    (folder / CIFAR_LAYOUT[name][3]).unlink()
    with pytest.raises(DataError, match=rf"{title} in {folder} is incomplete: missing {CIFAR_LAYOUT[name][3]}"):
        load_dataset(name, data_dir=str(tmp_path))
    (folder / CIFAR_LAYOUT[name][3]).write_bytes(b"")
    with pytest.raises(DataError, match="fail torchvision's md5 check"):  # a fake is not the real data
        load_dataset(name, data_dir=str(tmp_path))


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks the md5 of every CIFAR file; the fakes pass on existing files only."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_fake_cifar_in_the_real_format_loads(tmp_path, name, no_md5):
    classes = 10 if name == "cifar10" else 100
    per_batch = 2 * classes  # two images of every class, so that validation can be stratified
    _fake_cifar(tmp_path, name, per_batch=per_batch, value=255)
    train_batches = len(CIFAR_LAYOUT[name][1]) - 1
    bundle = load_dataset(name, data_dir=str(tmp_path), augment=False, val_fraction=0.5)
    assert (bundle.num_classes, bundle.input_shape, len(bundle.test)) == (classes, (3, 32, 32), per_batch)
    assert len(bundle.train) == len(bundle.val) == per_batch * train_batches // 2
    image, label = bundle.test[3]
    mean, std = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                 "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}[name]
    expected = (1 - torch.tensor(mean)) / torch.tensor(std)  # a white pixel, normalized per channel
    assert label == 3 and torch.allclose(image, expected[:, None, None].expand(3, 32, 32))


def test_cifar_augmentation_on_train_only_and_damaged_batches(tmp_path, no_md5):
    folder = _fake_cifar(tmp_path, "cifar10")
    bundle = load_dataset("cifar10", data_dir=str(tmp_path), val_fraction=0.25)
    torch.manual_seed(0)
    crops = [bundle.train[0][0] for _ in range(8)]  # random crop with padding 4, flips
    assert any(not torch.equal(crops[0], crop) for crop in crops[1:])
    mean, std = (torch.tensor(v)[:, None, None] for v in ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))

    def unaugmented(raw):  # a stored uint8 HWC image, only converted and normalized: no crop, no flip
        return (torch.from_numpy(raw).permute(2, 0, 1).float() / 255 - mean) / std

    for _ in range(8):  # validation and test images are the stored ones at every access (fp32 roundoff)
        assert torch.allclose(bundle.val[0][0], unaugmented(bundle.val.dataset.data[bundle.val.indices[0]]), atol=1e-6)
        assert torch.allclose(bundle.test[0][0], unaugmented(bundle.test.data[0]), atol=1e-6)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=rf"CIFAR-10 in {folder} is damaged: UnpicklingError"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_imagefolder_layout_errors_and_loading(tmp_path):
    with pytest.raises(DataError, match=rf"expected {tmp_path / 'train'} and {tmp_path / 'val'}"):
        load_dataset("imagefolder", data_dir=str(tmp_path))
    from PIL import Image

    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 30), color=(i * 40, 100, 200 if label == "dog" else 0)).save(
                    tmp_path / split / label / f"{i}.png")
    bundle = load_dataset("imagefolder", data_dir=str(tmp_path), image_size=24, val_fraction=0.5)
    assert (len(bundle.train), len(bundle.val), len(bundle.test), bundle.num_classes) == (4, 4, 8, 2)
    assert bundle.input_shape == (3, 24, 24)
    image, label = bundle.test[7]
    assert image.shape == (3, 24, 24) and label == 1
    assert sorted(int(bundle.val[i][1]) for i in range(4)) == [0, 0, 1, 1]
    (tmp_path / "val" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "bird" / "0.png")
    with pytest.raises(DataError, match="classes differ"):
        load_dataset("imagefolder", data_dir=str(tmp_path))


def test_mnist1d_is_the_published_split_generated_offline():
    import mnist1d.data
    import random

    random.seed(5)
    np.random.seed(5)
    before = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    bundle = load_dataset("mnist1d")
    assert (random.random(), np.random.rand()) == before  # the generator's seeding does not leak into the caller's
    assert (len(bundle.train), len(bundle.test), bundle.val) == (4000, 1000, None)
    assert (bundle.num_classes, bundle.input_shape, bundle.name) == (10, (1, 40), "mnist1d")
    published = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    assert np.array_equal(bundle.train.images[:, 0].numpy(), published["x"].astype(np.float32))
    assert np.array_equal(bundle.test.images[:, 0].numpy(), published["x_test"].astype(np.float32))
    assert _labels(bundle.test) == published["y_test"].tolist()
    signal, label = bundle.train[0]
    assert signal.shape == (1, 40) and signal.dtype == torch.float32 and label == int(published["y"][0])


def test_mnist1d_validation_split_and_options():
    plain = load_dataset("mnist1d")
    bundle = load_dataset("mnist1d", val_fraction=0.2, split_seed=1)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (3200, 800, 1000)
    train, val = _fingerprints(bundle.train), _fingerprints(bundle.val)
    assert not train & val and train | val == _fingerprints(plain.train)
    assert _fingerprints(load_dataset("mnist1d", val_fraction=0.2, split_seed=2).val) != val
    counts = np.bincount(_labels(bundle.val), minlength=10)
    assert np.all(np.abs(counts - 0.2 * np.bincount(_labels(plain.train), minlength=10)) <= 1)  # stratified
    assert bundle.train.augment is None and torch.equal(bundle.test.images, plain.test.images)
    rgb = load_dataset("mnist1d", channels=3)
    assert rgb.input_shape == (3, 40) and all(torch.equal(rgb.train.images[:, c], plain.train.images[:, 0])
                                              for c in range(3))
    with pytest.raises(DataError, match="image_size does not apply"):
        load_dataset("mnist1d", image_size=32)
