"""The baselines the benchmarks measure against, written the straightforward way.

- :class:`PerParameterLARS`: the original LARS algorithm, one parameter at a time with a Python
  ``if`` on tensor norms (a host sync per parameter on GPU);
- :func:`torchvision_pipeline` and :class:`TwoViewDataset`: SimCLR's augmentation per image
  with ``torchvision.transforms.v2``, as most SSL code runs it in DataLoader workers;
  :func:`two_view_folder` does the same on an image folder read by torchvision's
  ``ImageFolder`` (PIL decoding);
- :func:`lightly_two_view`: lightly's own ``SimCLRTransform`` on PIL images, when lightly is
  installed (``pip install .[bench]``);
- :func:`path_listing`: a class-folder tree listed with a ``Path`` per file and ``Path``
  sorting, as this toolkit listed folders before it kept strings and an index.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.optim.optimizer import ParamsT
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ssl_toolkit.data.augment import IMAGENET_MEAN, IMAGENET_STD
from ssl_toolkit.data.functional import blur_kernel_size


class PerParameterLARS(torch.optim.Optimizer):
    """The original algorithm written the straightforward way: one parameter at a time, with a
    Python ``if`` on tensor norms (a host sync per parameter on GPU)."""

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 1e-3,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(
            params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps)
        )

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter with a gradient, one parameter at a time."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                w_norm, g_norm = torch.norm(p), torch.norm(p.grad)
                denom = g_norm + group["weight_decay"] * w_norm + group["eps"]
                ratio = group["eta"] * w_norm / denom if w_norm > 0 and denom > 0 else 1.0
                grad = p.grad.add(p, alpha=group["weight_decay"])
                buf.mul_(group["momentum"]).add_(grad, alpha=float(group["lr"] * ratio))
                p.sub_(buf)


class TwoViewDataset(Dataset):
    """Per-image baseline: each item is two independently transformed views of one image."""

    def __init__(self, images: torch.Tensor, transform: Callable) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return self.transform(image), self.transform(image)


class MultiCropDataset(Dataset):
    """Per-image multi-crop baseline, as SwAV's ``MultiCropDataset``: each item is every crop
    of one image, each from its own transform."""

    def __init__(self, images: torch.Tensor, transforms: list[Callable]) -> None:
        self.images = images
        self.transforms = transforms

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        image = self.images[index]
        return [transform(image) for transform in self.transforms]


def torchvision_pipeline(
    size: int, scale: tuple[float, float] = (0.08, 1.0), blur_min_size: int = 96
) -> v2.Compose:
    """The per-image equivalent of ``SimCLRAugment()`` at ``size`` pixels (blur from
    ``blur_min_size``; SwAV's crops blur at every size)."""
    steps = [
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if size >= blur_min_size:
        kernel = blur_kernel_size((size, size))
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def two_view_folder(root: str, size: int) -> Dataset:
    """torchvision's ``ImageFolder`` whose items are two SimCLR views of each image."""
    from torchvision.datasets import ImageFolder

    pipeline = v2.Compose([v2.ToImage(), torchvision_pipeline(size)])
    return ImageFolder(root, transform=lambda image: (pipeline(image), pipeline(image)))


def lightly_two_view(images: torch.Tensor, size: int) -> Dataset | None:
    """lightly's SimCLR pipeline per PIL image with this toolkit's SimCLR settings (blur from
    96 px, as ``SimCLRAugment``), or None without lightly."""
    try:
        from lightly.transforms import SimCLRTransform
    except ImportError:
        return None
    from torchvision.transforms.v2.functional import to_pil_image

    simclr = SimCLRTransform(input_size=size, gaussian_blur=0.5 if size >= 96 else 0.0)
    view = simclr.transforms[0]  # both views run the same transform
    return TwoViewDataset(images, lambda image: view(to_pil_image(image)))


def path_listing(folder: Path, suffixes: frozenset[str]) -> list[tuple[Path, int]]:
    """``(path, label)`` of the images under each class folder of ``folder``: ``os.scandir``
    per folder, but a ``Path`` object per file and ``Path`` comparisons to sort them."""

    def files_under(directory: Path) -> list[Path]:
        found = []
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir():
                    found += files_under(Path(entry.path))
                elif entry.is_file():
                    found.append(Path(entry.path))
        return found

    with os.scandir(folder) as entries:
        classes = sorted(entry.name for entry in entries if entry.is_dir())
    return [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted(p for p in files_under(folder / name) if p.suffix.lower() in suffixes)
    ]
