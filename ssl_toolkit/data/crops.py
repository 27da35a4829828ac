"""Multi-crop: which crops of each image a method trains on, as ``data.crops`` lists them.

SwAV and DINO train on two global crops and several small local ones (SwAV's ImageNet recipe:
2 x 224 of 14-100% of the image and 6 x 96 of 5-14%). A :class:`CropGroup` is one line of
that list: how many crops, their side, their area range, and optionally their own blur and
solarisation probabilities. The in-memory augmentation cuts every crop on the device
(:meth:`~ssl_toolkit.data.augment.MultiCropAugment.with_crops`), image folders' workers cut
them from the full image (:class:`~ssl_toolkit.data.folders.CropViews`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field, model_validator

from optim.configs import ConfigModel

__all__ = ["CropGroup", "crop_sizes"]


class CropGroup(ConfigModel):
    """``count`` crops of ``size`` pixels covering a fraction in ``scale`` of the image area;
    ``blur_p`` / ``solarize_p`` replace the method's probabilities for these crops (null:
    the method's)."""

    count: int = Field(ge=1, description="how many crops of this kind")
    size: int = Field(ge=8, description="side of each crop, in pixels")
    scale: tuple[float, float] = Field(
        description="[low, high] fraction of the image area each crop covers"
    )
    blur_p: float | None = Field(
        None, ge=0.0, le=1.0, description="Gaussian blur probability of these crops"
    )
    solarize_p: float | None = Field(
        None, ge=0.0, le=1.0, description="solarisation probability of these crops"
    )

    @model_validator(mode="after")
    def _scale_range(self) -> CropGroup:
        low, high = self.scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got [{low}, {high}]")
        return self


def crop_sizes(crops: Sequence[CropGroup]) -> list[int]:
    """The side of every crop, in order (a group of ``count`` crops gives ``count`` sides)."""
    return [group.size for group in crops for _ in range(group.count)]
