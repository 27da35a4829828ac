"""Datasets for pretraining and evaluation, selected by name with :func:`build_dataset`.

Datasets that fit in memory (digits, synthetic, CIFAR, STL-10) are held as one uint8 tensor of
shape (N, 3, H, W) plus a label tensor, so that batches are one indexing op
(:class:`~ssl_toolkit.data.loader.TensorBatchLoader`) and augmentation runs batched afterwards.
Image folders are decoded in DataLoader workers to fixed-size uint8 tensors instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ssl_toolkit.data.folders import (
    CropViews,
    DatasetNotFoundError,
    ImageFiles,
    ImageFolderCenter,
    ImageFolderViews,
    find_images,
)
from ssl_toolkit.data.shards import ShardFiles, shard_classes, shard_split
from ssl_toolkit.data.splits import fixed_split

DatasetName = Literal[
    "digits", "synthetic", "cifar10", "cifar100", "stl10", "imagefolder", "shards"
]
"""The datasets :func:`build_dataset` knows; ``data.name`` is validated against it."""
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)
"""The values of :data:`DatasetName`."""


class InMemoryImageDataset(Dataset):
    """Images as one uint8 (N, 3, H, W) tensor ``images`` with int64 labels ``targets``.

    Items are ``(image, label)``; unlabeled samples (STL-10's unlabeled split) have label -1.
    """

    def __init__(self, images: Tensor, targets: Tensor, classes: list[str] | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must have shape ({images.shape[0]},), got {targets.shape}")
        self.images = images
        self.targets = targets.long()
        self.classes = classes if classes is not None else _class_names(self.targets)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.targets[index])

    @property
    def num_classes(self) -> int:
        """Number of classes (labels -1 of unlabeled samples do not count)."""
        return len(self.classes)


def build_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    train: bool = True,
    download: bool = False,
    image_size: int | None = None,
    views: CropViews | None = None,
    index_dir: str | Path | None = None,
    skip_bad: bool = False,
    num_classes: int | None = None,
    **kwargs: Any,
) -> Dataset:
    """Build the dataset ``name``, returning ``(image, label)`` items.

    ``image_size`` sets the size of the stored images where a dataset has a choice (digits,
    synthetic; image folders' evaluation crops). ``views`` asks datasets decoded in workers
    (image folders) for pretraining items: two random resized crops of each image, cut from
    the full image at native resolution (:class:`~ssl_toolkit.data.folders.CropViews`);
    in-memory datasets ignore it, since their views are cut on the device. ``index_dir`` is
    where the indexes of image folders and shards are kept (``data.index_dir``; ``None``: the
    per-user cache, :mod:`~ssl_toolkit.data.indexes`); others ignore it. ``skip_bad`` leaves
    out tar shards that cannot be read, with a warning, instead of raising. ``num_classes``
    declares the class count of shards (:func:`~ssl_toolkit.data.shards.shard_classes`) and
    of ``synthetic``; others ignore it.

    - ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline),
      upscaled bilinearly to ``image_size`` (default 32) RGB; a fixed stratified split
      (:func:`~ssl_toolkit.data.splits.fixed_split`) gives 80% of each class for
      ``train=True``, the rest otherwise.
    - ``synthetic``: random images, for tests; kwargs ``length`` (256), ``image_size`` (32),
      ``num_classes`` (10), ``seed`` (0; the test split uses ``seed + 1``).
    - ``cifar10`` / ``cifar100``: torchvision's files under ``root``.
    - ``stl10``: ``split`` "train+unlabeled" when ``train`` (pretraining) else "test"; pass
      ``split=`` to choose another.
    - ``imagefolder``: images under ``root``, one sub-folder per class, or the images directly
      in it for an unlabelled folder (labels -1). With ``train/`` and ``val/`` inside, those
      are the splits, and ``val/`` is numbered by ``train/``'s class names (a class that
      ``train/`` lacks is an error); ``train/`` alone, or a labelled folder with neither, is
      split 80/20 per class with a fixed seed (:func:`~ssl_toolkit.data.splits.fixed_split`).
      Decoded in DataLoader workers (:data:`~ssl_toolkit.data.folders.IMAGE_SUFFIXES`);
      without ``views``, the shorter side is resized to ``image_size / 0.875`` (default 224)
      and the centre crop kept. Run directories inside the folder are never listed.
    - ``shards``: WebDataset tar shards (``key.jpg`` and an optional ``key.cls``): ``root`` is a
      folder of ``.tar`` files, or a brace pattern of them; with ``train/`` and ``val/`` folders
      of shards inside, those are the splits, else labelled shards are split 80/20 per class as
      an image folder is (:func:`~ssl_toolkit.data.shards.shard_split`). Read by sample index
      and decoded in workers, like an image folder.

    Missing or unreadable files raise :class:`DatasetNotFoundError` (unless ``download=True``,
    for the torchvision datasets), and so does an image folder laid out wrongly; an unknown
    name raises ``ValueError`` listing the valid names.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    builder = _BUILDERS[name]
    accepted = inspect.signature(builder).parameters
    common = {"name": name, "root": root, "train": train, "download": download}
    if image_size is not None:
        common["image_size"] = image_size
    if views is not None:
        common["views"] = views
    if index_dir is not None:
        common["index_dir"] = index_dir
    if skip_bad:
        common["skip_bad"] = skip_bad
    if num_classes is not None:
        common["num_classes"] = num_classes
    options = sorted(set(accepted) - set(common))
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {', '.join(unknown)} for dataset {name!r}; "
            f"valid options: {', '.join(options) or 'none'}"
        )
    return builder(**{k: v for k, v in common.items() if k in accepted}, **kwargs)


def _digits(*, train: bool, image_size: int = 32) -> InMemoryImageDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear")
    images = pixels.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    targets = torch.from_numpy(digits.target).long()
    index = fixed_split(targets, train)
    classes = [str(c) for c in digits.target_names]
    return InMemoryImageDataset(images[index].contiguous(), targets[index], classes)


def _synthetic(
    *,
    train: bool,
    length: int = 256,
    image_size: int = 32,
    num_classes: int = 10,
    seed: int = 0,
) -> InMemoryImageDataset:
    generator = torch.Generator().manual_seed(seed if train else seed + 1)
    images = torch.randint(
        0, 256, (length, 3, image_size, image_size), generator=generator, dtype=torch.uint8
    )
    targets = torch.randint(0, num_classes, (length,), generator=generator)
    return InMemoryImageDataset(images, targets, [str(c) for c in range(num_classes)])


def _cifar(
    *, name: str, root: str | Path | None, train: bool, download: bool
) -> InMemoryImageDataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    ds = _open_torchvision(name, root, download, lambda r: cls(r, train=train, download=download))
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return InMemoryImageDataset(images, torch.as_tensor(ds.targets), list(ds.classes))


def _stl10(
    *,
    name: str,
    root: str | Path | None,
    train: bool,
    download: bool,
    split: str | None = None,
) -> InMemoryImageDataset:
    from torchvision.datasets import STL10

    split = split or ("train+unlabeled" if train else "test")
    ds = _open_torchvision(name, root, download, lambda r: STL10(r, split=split, download=download))
    images = torch.from_numpy(np.ascontiguousarray(ds.data))
    return InMemoryImageDataset(images, torch.from_numpy(ds.labels), list(ds.classes))


def _open_torchvision(
    name: str, root: str | Path | None, download: bool, open_fn: Callable[[str], Any]
) -> Any:
    """Call ``open_fn(root)``, turning torchvision's "not found" error into a helpful one."""
    if root is None:
        raise DatasetNotFoundError(_not_found_message(name, None))
    try:
        return open_fn(str(root))
    except RuntimeError as err:
        if download:
            raise
        raise DatasetNotFoundError(_not_found_message(name, root)) from err


def _not_found_message(name: str, root: str | Path | None) -> str:
    if root is None:
        return (
            f"Dataset {name!r} needs data.root: set data.root=PATH to a folder holding the "
            f"{name} files (or to an empty folder together with data.download=true)."
        )
    return (
        f"Dataset {name!r} not found under data.root={str(root)!r}. Set data.download=true to "
        f"download it there, or place the {name} files under {str(root)!r}."
    )


def _imagefolder(
    *,
    root: str | Path | None,
    train: bool,
    image_size: int = 224,
    views: CropViews | None = None,
    index_dir: str | Path | None = None,
) -> Dataset:
    if root is None or not Path(root).is_dir():
        raise DatasetNotFoundError(
            f"Dataset 'imagefolder' not found: data.root={root!r} is not a folder. Set data.root "
            "to a folder of images, with one sub-folder per class when it is labelled "
            "(optionally split into train/ and val/)."
        )
    return _decoded_in_workers(_folder_split(Path(root), train, index_dir), views, image_size)


def _decoded_in_workers(
    files: ImageFiles | ShardFiles, views: CropViews | None, image_size: int
) -> Dataset:
    """Pretraining items of ``views`` when given, else evaluation crops of ``image_size``."""
    if views is not None:
        return ImageFolderViews(files, views)
    return ImageFolderCenter(files, image_size)


def _folder_split(root: Path, train: bool, index_dir: str | Path | None) -> ImageFiles:
    """The images of one split of the folder ``root``: ``train/``, or ``val/`` numbered by
    ``train/``'s class names so that a label means the same class in both; with ``train/``
    alone, or neither, the fixed 80/20 split of ``train/`` (or of ``root``)."""
    train_dir, val_dir = root / "train", root / "val"
    if val_dir.is_dir() and not train_dir.is_dir():
        raise DatasetNotFoundError(
            f"Dataset 'imagefolder': {val_dir} has no train/ beside it: put the training images "
            f"in {train_dir}, or val/'s class folders directly in {root} to split them 80/20"
        )
    folder = train_dir if train_dir.is_dir() else root
    files = _find_images(folder, root, index_dir)
    if not val_dir.is_dir():
        if not files.labelled:
            return files
        # No val/: a fixed stratified 80/20 split keeps the test images apart.
        keep = fixed_split(torch.tensor(files.labels), train).tolist()
        return ImageFiles(
            [files.paths[i] for i in keep],
            [files.labels[i] for i in keep],
            files.classes,
            files.root,
        )
    if train:
        return files
    val = _find_images(val_dir, root, index_dir)
    index = {name: label for label, name in enumerate(files.classes)}
    unknown = [name for name in val.classes if name not in index]
    if unknown:
        raise DatasetNotFoundError(
            f"Dataset 'imagefolder': {val_dir} has classes that {train_dir} lacks: "
            f"{', '.join(unknown)}"
        )
    if files.labelled and not val.labelled:
        raise DatasetNotFoundError(
            f"Dataset 'imagefolder': {val_dir} has no class sub-folders, but {train_dir} has "
            f"{len(files.classes)}: put val/'s images in sub-folders named as train/'s"
        )
    labels = [index[val.classes[label]] for label in val.labels] if val.labelled else val.labels
    return ImageFiles(val.paths, labels, files.classes, val.root)


def _find_images(folder: Path, root: Path, index_dir: str | Path | None) -> ImageFiles:
    """:func:`find_images`, with missing or unreadable files as :class:`DatasetNotFoundError`."""
    try:
        return find_images(folder, index_dir=index_dir)
    except OSError as err:
        raise DatasetNotFoundError(
            f"Dataset 'imagefolder': {err} (data.root={str(root)!r})"
        ) from err


def _class_names(targets: Tensor) -> list[str]:
    labelled = targets[targets >= 0]
    count = int(labelled.max()) + 1 if labelled.numel() else 0
    return [str(c) for c in range(count)]


def _shards(
    *,
    root: str | Path | None,
    train: bool,
    image_size: int = 224,
    views: CropViews | None = None,
    index_dir: str | Path | None = None,
    skip_bad: bool = False,
    num_classes: int | None = None,
) -> Dataset:
    if root is None:
        raise DatasetNotFoundError(
            "Dataset 'shards' needs data.root: a folder of .tar shards or a brace pattern "
            "of them (scripts/make_shards.py writes them from an image folder)"
        )
    files = shard_split(str(root), train, index_dir, skip_bad)
    files.classes = shard_classes(files, num_classes)
    return _decoded_in_workers(files, views, image_size)


_BUILDERS: dict[str, Callable[..., Dataset]] = {
    "digits": _digits,
    "synthetic": _synthetic,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "stl10": _stl10,
    "imagefolder": _imagefolder,
    "shards": _shards,
}
