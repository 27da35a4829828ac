"""MLP heads placed on top of a backbone: SimCLR / BYOL projectors and the BYOL predictor.

The contrastive loss is computed on the projector's output rather than on backbone features,
which keeps the features general; BYOL additionally needs a predictor on the online branch to
avoid collapse.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor


class ProjectionHead(nn.Module):
    """MLP of ``num_layers`` Linear layers: (Linear -> BatchNorm -> ReLU) blocks, final Linear.

    Covers the SimCLR projector (``ProjectionHead(2048, 2048, 128)``), the BYOL projector
    (``ProjectionHead(2048, 4096, 256)``) and SimCLR v2's deeper variant with a BatchNorm on the
    output (``num_layers=3, last_batch_norm=True``). Linear layers followed by a BatchNorm have no
    bias, since the BatchNorm shift makes it redundant; ``last_bias=False`` drops the output bias
    too (Barlow Twins, whose loss standardises the output). ``num_layers=1`` is a single Linear
    map and ignores ``hidden_dim``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_batch_norm: bool = False,
        last_bias: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=last_bias and not last_batch_norm))
        if last_batch_norm:
            layers.append(nn.BatchNorm1d(out_dim))
        self.layers = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, in_dim) features, or pooled (B, in_dim, 1, 1) maps, to (B, out_dim)."""
        return self.layers(x.flatten(1))


class PredictionHead(ProjectionHead):
    """BYOL predictor: Linear(256, 4096) -> BatchNorm -> ReLU -> Linear(4096, 256).

    Applied to the online projection only; the asymmetry with the target branch is what keeps
    BYOL from collapsing to a constant.
    """

    def __init__(
        self, in_dim: int = 256, hidden_dim: int = 4096, out_dim: int = 256, num_layers: int = 2
    ) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_layers=num_layers)
