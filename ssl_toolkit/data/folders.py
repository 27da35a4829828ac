"""Image folders as the papers read them: decoded in workers, cropped from the full image.

A folder holds one sub-folder of images per class (labelled), or images directly (unlabelled;
every label is -1). For pretraining, :class:`ImageFolderViews` decodes each image at its native
resolution (``torchvision.io``, no PIL round trip) and cuts the two RandomResizedCrop views
from the whole image, resized to the view size; the batched augmentation does the rest on the
device. The crop parameters come from a generator seeded by (seed, epoch, index), so they do
not depend on which worker decodes the image, and a resume reproduces them. For evaluation,
:class:`ImageFolderCenter` resizes the shorter side to ``size / 0.875`` and centre-crops.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from ssl_toolkit.data.augment import CROP_UNIFORMS, sample_crop_boxes

__all__ = [
    "IMAGE_SUFFIXES",
    "CropViews",
    "ImageFiles",
    "ImageFolderCenter",
    "ImageFolderViews",
    "find_images",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
"""File endings read as images (decoded by ``torchvision.io.decode_image``)."""

# torchvision 0.29 deprecates its decoders in favour of TorchCodec, which needs FFmpeg on the
# system; until that is a fair requirement, torchvision's still work and say so once per image.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated"
)

# The usual evaluation crop: resize the shorter side to 256, centre-crop 224.
_CENTER_CROP_FRACTION = 0.875


@dataclass(frozen=True)
class CropViews:
    """How pretraining views are cut in the workers: RandomResizedCrop to ``size`` pixels,
    area fraction in ``scale``, log-uniform aspect ratio in ``ratio``, seeded by ``seed``."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    seed: int = 0


@dataclass(frozen=True)
class ImageFiles:
    """The images of a folder: paths, labels (-1 when unlabelled) and class names."""

    paths: list[Path]
    labels: list[int]
    classes: list[str]

    @property
    def labelled(self) -> bool:
        """True when the folder has class sub-folders."""
        return bool(self.classes)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def find_images(folder: Path) -> ImageFiles:
    """The images under ``folder``: one sub-folder per class, or the images directly in it.

    Class sub-folders that hold images make the folder labelled (images directly in it are
    then ignored, as torchvision's ``ImageFolder`` does); otherwise its own images are
    unlabelled. Raises ``FileNotFoundError`` when there is no image at all.
    """
    classes = sorted(
        d.name for d in folder.iterdir() if d.is_dir() and any(map(_is_image, d.rglob("*")))
    )
    if classes:
        pairs = [
            (path, label)
            for label, name in enumerate(classes)
            for path in sorted(p for p in (folder / name).rglob("*") if _is_image(p))
        ]
    else:
        pairs = [(path, -1) for path in sorted(p for p in folder.iterdir() if _is_image(p))]
    if not pairs:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    paths, labels = zip(*pairs, strict=True)
    return ImageFiles(list(paths), list(labels), classes)


def _decode(path: Path) -> Tensor:
    return decode_image(str(path), mode=ImageReadMode.RGB)


class ImageFolderViews(Dataset):
    """Pretraining items: ``((view_a, view_b), label)``, two uint8 (3, S, S) crops of one image.

    Indices are ``(index, epoch)`` pairs (see :class:`~ssl_toolkit.data.loader.WorkerBatchLoader`),
    so that the crops of an image differ from epoch to epoch and never depend on the worker.
    """

    takes_epoch = True

    def __init__(self, files: ImageFiles, views: CropViews) -> None:
        self.files = files
        self.views = views
        self.targets = torch.tensor(files.labels)

    def __len__(self) -> int:
        return len(self.files.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[tuple[Tensor, Tensor], int]:
        index, epoch = item
        image = _decode(self.files.paths[index])
        # One seed per (seed, epoch, index): index < len(self), so no two of them share one.
        generator = torch.Generator().manual_seed(
            (self.views.seed * 1_000_003 + epoch) * len(self) + index
        )
        height, width = image.shape[-2:]
        uniforms = torch.rand(2, CROP_UNIFORMS, generator=generator)
        boxes = sample_crop_boxes(uniforms, (height, width), self.views.scale, self.views.ratio)
        crops = tuple(_crop(image, box, self.views.size) for box in boxes)
        return crops, self.files.labels[index]


def _crop(image: Tensor, box: Tensor, size: int) -> Tensor:
    """The box (x0, y0, w, h) of ``image``, resized to ``size`` x ``size`` with antialiasing."""
    x0, y0, w, h = box.tolist()
    left, top = math.floor(x0), math.floor(y0)
    width, height = max(1, round(w)), max(1, round(h))
    return TF.resized_crop(image, top, left, height, width, [size, size], antialias=True)


class ImageFolderCenter(Dataset):
    """Evaluation items: ``(image, label)``, the shorter side resized to ``size / 0.875`` and
    the centre ``size`` x ``size`` crop kept, as uint8 (3, size, size)."""

    def __init__(self, files: ImageFiles, size: int) -> None:
        self.files = files
        self.size = size
        self.targets = torch.tensor(files.labels)
        self.classes = files.classes

    def __len__(self) -> int:
        return len(self.files.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = _decode(self.files.paths[index])
        image = TF.resize(image, [round(self.size / _CENTER_CROP_FRACTION)], antialias=True)
        return TF.center_crop(image, [self.size, self.size]), self.files.labels[index]
