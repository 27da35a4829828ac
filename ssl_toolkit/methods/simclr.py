"""SimCLR (Chen et al. 2020, arXiv:2002.05709): contrast two augmented views of each image."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssl_toolkit.losses import nt_xent

__all__ = ["SimCLR"]


class SimCLR(nn.Module):
    """Backbone + projection head trained with the NT-Xent loss.

    Parameter names are ``backbone.*`` and ``projector.*`` (the same prefixes as BYOL's online
    network), so optimizer rules such as ``projector.*`` read the same for both methods.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, temperature: float) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.backbone = backbone
        self.projector = projector
        self.temperature = temperature

    def forward(self, view_a: Tensor, view_b: Tensor) -> Tensor:
        """Return the NT-Xent loss of a batch of view pairs ``(n, ...)`` and ``(n, ...)``.

        Both views go through the backbone in one forward pass (batch concatenation), as in the
        reference implementation: one kernel launch sequence, and batch-norm statistics over
        all 2n views.
        """
        n = view_a.shape[0]
        z = self.projector(self.backbone(torch.cat([view_a, view_b])))
        return nt_xent(z[:n], z[n:], self.temperature)

    def embed(self, x: Tensor) -> Tensor:
        """Backbone features (before the projector), the representation that is evaluated."""
        return self.backbone(x)

    def trainable_module(self) -> nn.Module:
        """The module whose ``named_parameters()`` the optimizer gets: all of SimCLR."""
        return self
