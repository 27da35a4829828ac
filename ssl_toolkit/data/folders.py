"""Image folders as the papers read them: decoded in workers, cropped from the full image.

A folder holds one sub-folder of images per class (labelled), or images directly (unlabelled;
every label is -1). For pretraining, :class:`ImageFolderViews` decodes each image at its native
resolution (``torchvision.io``, no PIL round trip, for JPEG, PNG, WebP and GIF) and cuts the
RandomResizedCrop views (two, or every crop of a multi-crop list) from the whole image, each
resized to its size; the batched
augmentation does the rest on the device. The crop parameters come from a generator seeded by
(seed, epoch, index), so they do not depend on which worker decodes the image, and a resume
reproduces them. For evaluation, :class:`ImageFolderCenter` resizes the shorter side to
``size / 0.875`` and centre-crops. A file that does not decode raises :class:`BadImageError`,
which names it.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from ssl_toolkit.data.augment import CROP_UNIFORMS, sample_crop_boxes
from ssl_toolkit.data.crops import CropGroup
from ssl_toolkit.data.listing import IMAGE_SUFFIXES, PIL_SUFFIXES, ImageFiles, find_images

__all__ = [
    "IMAGE_SUFFIXES",
    "BadImageError",
    "CropViews",
    "DatasetNotFoundError",
    "ImageFiles",
    "ImageFolderCenter",
    "ImageFolderViews",
    "StaleIndexError",
    "find_images",
]

# torchvision 0.29 deprecates its decoders in favour of TorchCodec, which needs FFmpeg on the
# system; until that is a fair requirement, torchvision's still work and say so once per image.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated"
)

# The usual evaluation crop: resize the shorter side to 256, centre-crop 224.
_CENTER_CROP_FRACTION = 0.875


class DatasetNotFoundError(ValueError):
    """The dataset's files are missing or unusable (not under ``data.root`` and downloading was
    not requested, unreadable, or wrongly laid out): the user's data to fix, not a bug."""


class StaleIndexError(DatasetNotFoundError):
    """A sample read does not agree with the index it was listed from (another label, key or
    count): the files changed since, and reading on would train on mislabelled data."""


class BadImageError(DatasetNotFoundError):
    """An image file that does not decode, named with the decoder's reason, so that one line
    says which file to fix or remove."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(
            f"cannot decode the image {path}: {reason} "
            "(data.skip_bad=true skips the images that do not decode)"
        )
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # A DataLoader worker sends it to the main process pickled: rebuild it from its fields.
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class CropViews:
    """How pretraining views are cut in the workers: two RandomResizedCrops to ``size`` pixels,
    area fraction in ``scale``, log-uniform aspect ratio in ``ratio``, seeded by ``seed``; or
    the crops of ``crops`` (multi-crop), each group at its own size and scale."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    seed: int = 0
    crops: tuple[CropGroup, ...] | None = None
    decode: str = "cpu"
    """Where images are decoded and cropped: ``"cpu"`` in the workers, or a device
    (``"cuda"``) in the main process, from the bytes the workers read
    (:class:`~ssl_toolkit.data.device_decode.DeviceViews`)."""

    def groups(self) -> list[tuple[int, int, tuple[float, float]]]:
        """``(count, size, scale)`` of each group of crops, in order."""
        if self.crops is None:
            return [(2, self.size, self.scale)]
        return [(g.count, g.size, tuple(g.scale)) for g in self.crops]


# torchvision's errors start with where in its C++ sources they were raised.
_SOURCE_LOCATION = re.compile(r"^\S+, \S+:\d+, ")


def _reason(error: Exception) -> str:
    """The decoder's complaint in one line, without torchvision's source location and advice."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    located = _SOURCE_LOCATION.match(lines[0])
    return lines[0][located.end() :].split(". ")[0] if located else lines[0]


def _decode_with_pil(data: bytes) -> Tensor:
    """(3, H, W) RGB, upright; 16-bit grayscale stays uint16, for :func:`_decode` to scale."""
    with Image.open(io.BytesIO(data)) as file:
        image = ImageOps.exif_transpose(file)
        if image.mode.startswith("I;16"):
            return torch.from_numpy(np.array(image).astype(np.uint16)).expand(3, -1, -1)
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


# Reading errors that stay on a retry belong to the file; others (EIO on a network file system,
# too many open files) are the machine's, and are not blamed on the image.
_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError)


def decode_bytes(data: bytes, where: str, suffix: str) -> Tensor:
    """The encoded image ``data`` (a file of that ``suffix``, found at ``where``) as uint8
    (3, H, W) RGB: upright (its EXIF orientation applied), the first frame of an animation,
    16-bit channels cut to their high byte. :class:`BadImageError` naming ``where`` for data
    that does not decode."""
    try:
        if suffix.lower() in PIL_SUFFIXES:
            image = _decode_with_pil(data)
        else:
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            image = decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except Exception as error:  # whatever the decoder makes of a broken file: it names the file
        raise BadImageError(where, _reason(error)) from error
    if image.ndim == 4:  # an animated GIF: its first frame
        image = image[0]
    return TF.to_dtype(image, torch.uint8, scale=True)


def read_file(path: str) -> tuple[bytes, str, str]:
    """The bytes of the image file ``path``, where it is and its suffix (what
    :func:`decode_bytes` takes); :class:`BadImageError` for a file that cannot be read."""
    try:
        with open(path, "rb") as file:
            return file.read(), path, os.path.splitext(path)[1]
    except _FILE_ERRORS as error:
        raise BadImageError(path, f"it cannot be read ({error.strerror})") from error


def _read_listed(files: ImageFiles, index: int) -> tuple[bytes, str, str]:
    """Image ``index`` of a folder's listing, once its path is seen to lie in its label's
    class folder (a label is its class folder's name, so a listing that says otherwise is
    stale); :class:`StaleIndexError` naming the file if not."""
    path, label = files.paths[index], files.labels[index]
    if label >= 0:
        folder = os.path.join(files.root, files.classes[label], "")
        if not path.startswith(folder):
            raise StaleIndexError(
                f"{path} is listed in the class {files.classes[label]!r}, but it is not in "
                f"{folder}: the listing of {files.root} is stale"
            )
    return read_file(path)


def image_reader(files: Any) -> Callable[[int], tuple[bytes, str, str]]:
    """How the datasets below read image ``index`` of ``files`` (bytes, where, suffix): its own
    ``read`` (tar shards) or the file ``files.paths[index]`` (an image folder), each checked
    against the listing; picklable, for the workers."""
    read = getattr(files, "read", None)
    return read if read is not None else partial(_read_listed, files)


class ImageFolderViews(Dataset):
    """Pretraining items: ``((view_a, view_b, ...), label)``, the uint8 (3, S, S) crops of one
    image that ``views`` describes (two, or every crop of a multi-crop list).

    Indices are ``(index, epoch)`` pairs (see :class:`~ssl_toolkit.data.loader.WorkerBatchLoader`),
    so that the crops of an image differ from epoch to epoch and never depend on the worker.
    An image that does not decode raises :class:`BadImageError`.
    """

    takes_epoch = True

    def __init__(self, files: ImageFiles, views: CropViews) -> None:
        self.files = files
        self.views = views
        self.targets = torch.tensor(files.labels)
        self.read = image_reader(files)

    def __len__(self) -> int:
        return len(self.files.labels)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, int]:
        index, epoch = item
        # One seed per (seed, epoch, index): index < len(self), so no two of them share one.
        generator = torch.Generator().manual_seed(
            (self.views.seed * 1_000_003 + epoch) * len(self) + index
        )
        count = sum(group[0] for group in self.views.groups())
        uniforms = torch.rand(count, CROP_UNIFORMS, generator=generator)
        data, where, suffix = self.read(index)
        if self.views.decode != "cpu":  # decoded and cropped on the device, in the main process
            return EncodedImage(data, where, suffix, exif_orientation(data, suffix), uniforms), (
                self.files.labels[index]
            )
        return cut_views(decode_bytes(data, where, suffix), uniforms, self.views), (
            self.files.labels[index]
        )


class EncodedImage(NamedTuple):
    """An image as a worker reads it for decoding on the device: its encoded bytes, where it
    is, its suffix, its EXIF orientation (1-8, as the decoder on the device ignores it) and the
    uniform draws of its crops. Batched by the DataLoader, field by field."""

    data: bytes
    where: str
    suffix: str
    orientation: int
    uniforms: Tensor


def exif_orientation(data: bytes, suffix: str) -> int:
    """The EXIF orientation tag of a JPEG (1, upright, when it has none or is unreadable)."""
    if suffix.lower() not in {".jpg", ".jpeg"}:
        return 1
    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(image.getexif().get(0x0112, 1))
    except Exception:  # the decoder on the device names a broken file
        return 1


def cut_views(image: Tensor, uniforms: Tensor, views: CropViews) -> tuple[Tensor, ...]:
    """The crops of ``views`` cut from ``image`` (on any device) with the draws ``uniforms``."""
    height, width = image.shape[-2:]
    crops: list[Tensor] = []
    for count, size, scale in views.groups():
        rows = uniforms[len(crops) : len(crops) + count]
        boxes = sample_crop_boxes(rows, (height, width), scale, views.ratio)
        crops += [_crop(image, box, size) for box in boxes]
    return tuple(crops)


def _crop(image: Tensor, box: Tensor, size: int) -> Tensor:
    """The box (x0, y0, w, h) of ``image``, resized to ``size`` x ``size`` with antialiasing."""
    x0, y0, w, h = box.tolist()
    left, top = math.floor(x0), math.floor(y0)
    width, height = max(1, round(w)), max(1, round(h))
    return TF.resized_crop(image, top, left, height, width, [size, size], antialias=True)


class ImageFolderCenter(Dataset):
    """Evaluation items: ``(image, label)``, the shorter side resized to ``size / 0.875`` and
    the centre ``size`` x ``size`` crop kept, as uint8 (3, size, size). An image that does not
    decode raises :class:`BadImageError`."""

    def __init__(self, files: ImageFiles, size: int) -> None:
        self.files = files
        self.size = size
        self.targets = torch.tensor(files.labels)
        self.classes = files.classes
        self.read = image_reader(files)

    def __len__(self) -> int:
        return len(self.files.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = decode_bytes(*self.read(index))
        image = TF.resize(image, [round(self.size / _CENTER_CROP_FRACTION)], antialias=True)
        return TF.center_crop(image, [self.size, self.size]), self.files.labels[index]
