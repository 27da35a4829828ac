"""Shared fixtures for the optimizer tests: a small CNN with BatchNorm and a downsample branch."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

lars_module = importlib.import_module("optim.lars")  # `optim.lars` names the function


class SmallResNet(nn.Module):
    """A stem, one residual block whose shortcut is a 1x1 conv + BatchNorm, and a linear head.

    The shortcut's BatchNorm is called ``downsample.1``: no name says "norm", as in torchvision.
    The head's bias starts at zero, as a freshly initialised bias often does.
    """

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.downsample = nn.Sequential(
            nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16)
        )
        self.fc = nn.Linear(16, num_classes)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + self.downsample(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def small_resnet() -> SmallResNet:
    torch.manual_seed(0)
    return SmallResNet()


def make_batch(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch of 8 random 3x8x8 images and labels for step ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 8, 8, generator=gen, dtype=dtype), torch.randint(
        0, 5, (8,), generator=gen
    )


@pytest.fixture(autouse=True)
def fused_kernel_on_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test models' tensors are small: let the fused path's compiled kernel take every
    tensor of two rows or more, not only the large ones it takes by default."""
    monkeypatch.setattr(lars_module, "_FUSED_MIN_NUMEL", lars_module._LANES)
