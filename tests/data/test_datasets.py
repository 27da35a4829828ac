"""Datasets: digits split and content, synthetic seeding, missing-file errors, image folders."""

import ast
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

import ssl_toolkit.data
from ssl_toolkit.data import (
    DATASET_NAMES,
    DatasetNotFoundError,
    TensorBatchLoader,
    build_dataset,
    build_loader,
    stratified_split,
)
from ssl_toolkit.data.splits import fixed_split


@pytest.fixture(scope="module")
def digits():
    raw = load_digits()
    return raw, build_dataset("digits", train=True), build_dataset("digits", train=False)


def test_digits_shapes_and_dtype(digits):
    _, train, test = digits
    for ds in (train, test):
        assert ds.images.dtype == torch.uint8
        assert ds.images.shape[1:] == (3, 32, 32)
        assert ds.targets.dtype == torch.int64
        assert torch.equal(ds.images[:, 0], ds.images[:, 1])
        assert torch.equal(ds.images[:, 0], ds.images[:, 2])
        image, label = ds[0]
        assert image.shape == (3, 32, 32)
        assert isinstance(label, int)
    assert train.num_classes == 10
    assert train.images.max() == 255
    assert train.images.min() == 0


def test_digits_split_is_80_20_and_stratified(digits):
    raw, train, test = digits
    total = Counter(raw.target.tolist())
    train_counts = Counter(train.targets.tolist())
    test_counts = Counter(test.targets.tolist())
    assert len(train) + len(test) == len(raw.target) == 1797
    assert abs(len(train) - 0.8 * 1797) <= 1
    for label, count in total.items():
        assert train_counts[label] + test_counts[label] == count
        assert abs(train_counts[label] - 0.8 * count) <= 1


def test_stratified_split_takes_exactly_the_count_of_every_class():
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 9)
    chosen, rest = stratified_split(labels, lambda n: 3, torch.Generator().manual_seed(0))
    assert len(set(chosen.tolist())) == 9
    assert torch.bincount(labels[chosen]).tolist() == [3, 3, 3]
    assert sorted(chosen.tolist() + rest.tolist()) == list(range(len(labels)))
    again = stratified_split(labels, lambda n: 3, torch.Generator().manual_seed(0))[0]
    assert torch.equal(chosen, again)
    half, _ = stratified_split(labels, lambda n: n // 2, torch.Generator().manual_seed(1))
    assert torch.bincount(labels[half]).tolist() == [3, 2, 4]


def test_digits_images_match_their_labels(digits):
    raw, train, test = digits
    originals = torch.from_numpy(raw.images).float().div(16).flatten(1)
    labels = torch.from_numpy(raw.target)
    matched = set()
    for ds in (train, test):
        small = F.avg_pool2d(ds.images[:, :1].float() / 255, 4).flatten(1)
        nearest = torch.cdist(small, originals).argmin(1)
        assert torch.equal(labels[nearest], ds.targets)
        matched |= set(nearest.tolist())
    assert len(matched) >= 1790  # train and test together cover the whole set


def test_digits_is_deterministic(digits):
    _, train, _ = digits
    again = build_dataset("digits", train=True)
    assert torch.equal(again.images, train.images)
    assert torch.equal(again.targets, train.targets)


def test_digits_image_size_option():
    assert build_dataset("digits", train=False, image_size=16).images.shape[1:] == (3, 16, 16)


def test_synthetic_is_seeded():
    a = build_dataset("synthetic", length=20, image_size=8, num_classes=3, seed=5)
    b = build_dataset("synthetic", length=20, image_size=8, num_classes=3, seed=5)
    c = build_dataset("synthetic", length=20, image_size=8, num_classes=3, seed=6)
    test = build_dataset("synthetic", train=False, length=20, image_size=8, num_classes=3, seed=5)
    assert a.images.shape == (20, 3, 8, 8)
    assert a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.images, test.images)
    assert set(a.targets.tolist()) <= {0, 1, 2}
    assert a.num_classes == 3


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build_dataset("cifar11")
    for name in DATASET_NAMES:
        assert name in str(info.value)


def test_unknown_option_is_an_error():
    with pytest.raises(ValueError, match="imgae_size"):
        build_dataset("digits", imgae_size=16)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_missing_files_without_download(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset(name, root=tmp_path, download=False)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "data.root" in message
    assert "data.download=true" in message
    assert str(tmp_path) in message


def test_missing_root_names_data_root():
    with pytest.raises(DatasetNotFoundError, match=r"data\.root"):
        build_dataset("cifar10")
    with pytest.raises(DatasetNotFoundError, match=r"data\.root"):
        build_dataset("imagefolder", root="/nonexistent/folder")


def _write_image_folder(root, sizes):
    generator = torch.Generator().manual_seed(0)
    for label, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            pixels = torch.full((h, w, 3), 40 + 150 * label, dtype=torch.uint8)
            pixels[..., 0] = torch.randint(0, 256, (h, w), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / cls / f"{i}.png")


def test_imagefolder_batches_fixed_size_uint8(tmp_path):
    """Without train/ and val/, a labelled folder is split 80/20 per class (2 + 1 of 3)."""
    _write_image_folder(tmp_path, [(20, 30), (40, 17), (16, 16)])
    ds = build_dataset("imagefolder", root=tmp_path, image_size=12)
    assert len(ds) == 4 and len(build_dataset("imagefolder", root=tmp_path, train=False)) == 2
    image, label = ds[3]
    assert image.dtype == torch.uint8
    assert image.shape == (3, 12, 12)
    assert label == 1
    assert int(image[2, 6, 6]) == 190  # a constant channel survives resizing
    loader = build_loader(ds, batch_size=3, num_workers=0, drop_last=False)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    images, _ = batches[0]
    assert images.shape == (3, 3, 12, 12)
    assert images.dtype == torch.uint8
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == [0, 0, 1, 1]


def test_imagefolder_prefers_split_subfolders(tmp_path):
    _write_image_folder(tmp_path / "train", [(8, 8)] * 2)
    _write_image_folder(tmp_path / "val", [(8, 8)])
    assert len(build_dataset("imagefolder", root=tmp_path, image_size=8)) == 4
    assert len(build_dataset("imagefolder", root=tmp_path, train=False, image_size=8)) == 2


def test_empty_imagefolder_is_not_found(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"data\.root"):
        build_dataset("imagefolder", root=tmp_path)


def test_in_memory_datasets_get_the_tensor_loader():
    ds = build_dataset("synthetic", length=16)
    assert isinstance(build_loader(ds, batch_size=4), TensorBatchLoader)


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function."""
    tree = ast.parse(path.read_text())
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names - {None}


def test_the_splits_live_in_one_module_that_datasets_and_shards_import():
    """No import cycle: the shards do not import the datasets, which import the shards."""
    data = Path(ssl_toolkit.data.__file__).parent
    datasets, shards = (
        _imported_modules(data / "datasets.py"),
        _imported_modules(data / "shards.py"),
    )
    assert "ssl_toolkit.data.shards" in datasets and "ssl_toolkit.data.datasets" not in shards
    assert "ssl_toolkit.data.splits" in datasets and "ssl_toolkit.data.splits" in shards
    assert "ssl_toolkit.data" not in _imported_modules(data / "splits.py")


def test_image_folders_and_their_shards_take_the_same_fixed_split():
    labels = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0, 1, 2, 0])
    train, test = fixed_split(labels, True), fixed_split(labels, False)
    assert sorted(train.tolist() + test.tolist()) == list(range(12))
    assert torch.bincount(labels[train]).tolist() == [4, 2, 3]  # 80% of 5, 3 and 4, rounded
    assert torch.equal(train, train.sort().values) and torch.equal(fixed_split(labels, True), train)
