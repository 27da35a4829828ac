"""MLP heads placed on top of a backbone: SimCLR / BYOL projectors, the BYOL predictor and
DINO's head.

The contrastive loss is computed on the projector's output rather than on backbone features,
which keeps the features general; BYOL additionally needs a predictor on the online branch to
avoid collapse.
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from torch import Tensor

LastBatchNorm = Literal["none", "affine", "scale", "plain"]
"""The batch norm on a head's output: none; with a learnt scale and shift; with a scale only
(SimCLR's code: ``center=False``); with neither (MoCo v3's: ``affine=False``)."""


class ScaleBatchNorm1d(nn.BatchNorm1d):
    """A BatchNorm1d with a learnt scale γ and no shift β, as SimCLR's last projection layer
    (TensorFlow's ``batch_normalization(center=False)``)."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """Running statistics reset, γ = 1 (there is no β)."""
        self.reset_running_stats()
        nn.init.ones_(self.weight)


def _last_batch_norm(kind: LastBatchNorm, dim: int) -> nn.Module | None:
    if kind == "affine":
        return nn.BatchNorm1d(dim)
    if kind == "scale":
        return ScaleBatchNorm1d(dim)
    if kind == "plain":
        return nn.BatchNorm1d(dim, affine=False)
    if kind == "none":
        return None
    raise ValueError(f"last_batch_norm must be one of none, affine, scale, plain; got {kind!r}")


class ProjectionHead(nn.Module):
    """MLP of ``num_layers`` Linear layers: (Linear -> BatchNorm -> ReLU) blocks, final Linear.

    Covers the SimCLR projector (``ProjectionHead(2048, 2048, 128)``), the BYOL projector
    (``ProjectionHead(2048, 4096, 256)``), SimCLR's code with a scale-only BatchNorm on the
    output (``last_batch_norm="scale"``) and MoCo v3's with a plain one (``"plain"``). Linear
    layers followed by a BatchNorm have no bias, since the BatchNorm shift makes it redundant,
    unless ``hidden_bias`` (BYOL's ``networks.py``, whose hidden ``hk.Linear`` has one: it
    starts at 0, as haiku's, and the batch norm cancels it); ``last_bias=False`` drops the
    output bias too (the BYOL, MoCo v3, Barlow Twins and VICReg code). ``num_layers=1`` is a
    single Linear map and ignores ``hidden_dim``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_batch_norm: LastBatchNorm = "none",
        last_bias: bool = True,
        hidden_bias: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            linear = nn.Linear(dim, hidden_dim, bias=hidden_bias or not batch_norm)
            if hidden_bias and batch_norm:
                nn.init.zeros_(linear.bias)
            layers.append(linear)
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        last_norm = _last_batch_norm(last_batch_norm, out_dim)
        layers.append(nn.Linear(dim, out_dim, bias=last_bias and last_norm is None))
        if last_norm is not None:
            layers.append(last_norm)
        self.layers = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, in_dim) features, or pooled (B, in_dim, 1, 1) maps, to (B, out_dim)."""
        return self.layers(x.flatten(1))


class PredictionHead(ProjectionHead):
    """BYOL predictor: Linear(256, 4096) -> BatchNorm -> ReLU -> Linear(4096, 256), biased
    and bias-free as BYOL's ``networks.py`` ``MLP``.

    Applied to the online projection only; the asymmetry with the target branch is what keeps
    BYOL from collapsing to a constant.
    """

    def __init__(
        self,
        in_dim: int = 256,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        num_layers: int = 2,
        last_batch_norm: LastBatchNorm = "none",
    ) -> None:
        super().__init__(
            in_dim,
            hidden_dim,
            out_dim,
            num_layers=num_layers,
            last_batch_norm=last_batch_norm,
            last_bias=False,
            hidden_bias=True,
        )


class DINOHead(nn.Module):
    """DINO's head: an MLP to a ``bottleneck_dim`` bottleneck, L2-normalised, then a
    weight-normalised linear layer without bias to ``out_dim`` prototypes.

    As ``vision_transformer.py``'s ``DINOHead``: GELU between the ``num_layers`` Linear layers
    (a BatchNorm after each hidden one with ``use_bn``), weights truncated-normal with std 0.02
    and biases 0; the last layer's magnitude ``g`` starts at 1 and, with ``norm_last_layer``,
    stays there (it is not trained), so only the directions of its rows are learnt. The last
    layer is ``last_layer``, whose weight is parametrised by ``torch``'s ``weight_norm``
    (``last_layer.parametrizations.weight.original0`` is ``g``, ``original1`` the direction).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck_dim, out_dim, bias=False)
        )
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, in_dim) features to (B, out_dim) logits."""
        x = nn.functional.normalize(self.mlp(x.flatten(1)), dim=-1, p=2)
        return self.last_layer(x)
