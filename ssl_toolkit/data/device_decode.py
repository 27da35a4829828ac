"""Decoding a batch of images on the device, for ``data.decode: cuda``.

With a GPU, decoding JPEGs in CPU workers can bound the epoch (solo-learn's DALI path halves
its epoch time). Then the workers only read each image's bytes and draw its crops' random
numbers (:class:`~ssl_toolkit.data.folders.EncodedImage`), and the main process decodes the
whole batch at once with ``torchvision.io.decode_jpeg(..., device="cuda")`` (nvjpeg), applies
the EXIF orientation (which nvjpeg ignores), and cuts the crops there, with the very draws and
the same crop code that the workers use on CPU. Other formats than JPEG are decoded on the
CPU and moved. The views equal those decoded in the workers but for the JPEG decoders' own
rounding.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from ssl_toolkit.data.folders import BadImageError, CropViews, _reason, cut_views, decode_bytes

__all__ = ["DECODE_DEVICES", "DecodeDevice", "DeviceViews", "orient"]

DecodeDevice = Literal["cpu", "cuda"]
"""Where ``data.decode`` puts the decoding of image folders and shards."""
DECODE_DEVICES: tuple[str, ...] = get_args(DecodeDevice)
"""The values of :data:`DecodeDevice`."""

_JPEG = frozenset({".jpg", ".jpeg"})


def orient(image: Tensor, orientation: int) -> Tensor:
    """``image`` (C, H, W) turned upright from EXIF ``orientation`` (1-8), as the CPU
    decoder does: 2 mirrored, 3 turned half round, 4 flipped, 5-8 transposed variants."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return image.transpose(-1, -2).flip(-2)
    return image


class DeviceViews:
    """Turns a batch of :class:`~ssl_toolkit.data.folders.EncodedImage` (collated by the
    DataLoader: lists of bytes, places and suffixes, a tensor of orientations and one of
    uniforms) into the crops of ``views``, one (B, 3, S, S) uint8 batch per crop, on
    ``device``. An image that does not decode raises
    :class:`~ssl_toolkit.data.folders.BadImageError` naming it."""

    def __init__(self, views: CropViews, device: torch.device | str) -> None:
        self.views = views
        self.device = torch.device(device)

    def decode(self, data: list[bytes], where: list[str], suffix: list[str]) -> list[Tensor]:
        """Every image of the batch decoded on the device, JPEGs in one call."""
        images: list[Tensor | None] = [None] * len(data)
        jpegs = [i for i, s in enumerate(suffix) if s.lower() in _JPEG]
        encoded = [torch.frombuffer(bytearray(data[i]), dtype=torch.uint8) for i in jpegs]
        try:  # decode_jpeg refuses an empty list: a batch of PNGs only decodes below
            decoded = (
                decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device) if jpegs else []
            )
        except RuntimeError:  # which one: decode them one by one to name it
            decoded = []
            for i, tensor in zip(jpegs, encoded, strict=True):
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as error:
                    raise BadImageError(where[i], _reason(error)) from error
        for i, image in zip(jpegs, decoded, strict=True):
            images[i] = image
        for i, image in enumerate(images):
            if image is None:
                images[i] = decode_bytes(data[i], where[i], suffix[i]).to(self.device)
        return images

    def __call__(self, batch: list) -> tuple[Tensor, ...]:
        data, where, suffix, orientation, uniforms = batch
        images = self.decode(list(data), list(where), list(suffix))
        per_image = [
            cut_views(orient(image, int(turn)), draws, self.views)
            for image, turn, draws in zip(images, orientation.tolist(), uniforms, strict=True)
        ]
        return tuple(torch.stack(crops) for crops in zip(*per_image, strict=True))
