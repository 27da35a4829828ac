"""Barlow Twins (Zbontar et al. 2021, arXiv:2103.03230): make the cross-correlation of two
views' embeddings the identity.

Config, model (backbone + 8192-8192-8192 projector), the loss and the augmentation, all here.
The embeddings of each view are standardised over the batch (the authors' affine-free
BatchNorm), their cross-correlation matrix ``C`` is computed, and the loss is
``Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij²``: invariance on the diagonal, redundancy reduction off it.

Across ranks, the loss's batch statistics and ``C`` are sums over all ranks, as in the authors'
code (which all-reduces ``C``). Here the sums are differentiable, so for given embeddings the
loss and, after DDP's mean, its gradients are those of one process on the joined batch. (The
authors' in-place ``all_reduce`` is invisible to autograd: each rank back-propagates only its
own shard's share, which after DDP's mean is the joined-batch gradient divided by the number of
ranks.) The network's own BatchNorm layers are synchronised by the trainer
(``model.sync_bn``), as the authors convert them to ``SyncBatchNorm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor, nn

from ssl_toolkit.distributed import sum_over_ranks, world_size

from .base import (
    BYOLAugmentation,
    HeadConfig,
    Method,
    MethodConfig,
    at_least_fp32,
    check_pair,
    off_diagonal,
    two_views,
)
from .registry import register_method

__all__ = [
    "BarlowTwins",
    "BarlowTwinsConfig",
    "BarlowTwinsLoss",
    "barlow_twins_loss",
    "cross_correlation",
]

# The authors normalise with nn.BatchNorm1d(affine=False), whose default eps this is.
_BATCH_NORM_EPS = 1e-5


class BarlowTwinsConfig(MethodConfig):
    """Barlow Twins: cross-correlation of two views' embeddings pushed to the identity."""

    name: Literal["barlow_twins"] = Field("barlow_twins", description="selects this method")
    projector: HeadConfig = Field(
        HeadConfig(hidden_dim=8192, out_dim=8192, num_layers=3),
        description="projection head (Linear-BN-ReLU blocks, no biases)",
    )
    off_diagonal_weight: float = Field(
        0.0051, ge=0.0, description="λ, the weight of the off-diagonal (redundancy) term"
    )


def _standardise(z: Tensor, batch: int) -> Tensor:
    """``(z - mean) / sqrt(var + eps)`` per dimension, statistics over all ranks' rows."""
    mean = sum_over_ranks(z.sum(dim=0)) / batch
    centred = z - mean
    var = sum_over_ranks(centred.square().sum(dim=0)) / batch
    return centred / torch.sqrt(var + _BATCH_NORM_EPS)


def cross_correlation(z_a: Tensor, z_b: Tensor) -> Tensor:
    """The (d, d) cross-correlation of the batch-standardised embeddings of two views.

    ``C_ij = Σ_b ẑ_a[b, i] ẑ_b[b, j] / N`` where ``ẑ`` is standardised per dimension with the
    biased batch variance (plus ``eps = 1e-5``) and ``N`` is the batch over all ranks. Every rank
    passes the same number of rows. Computes in at least fp32, also under autocast.
    """
    check_pair(z_a, z_b, "cross_correlation")
    batch = z_a.shape[0] * world_size()
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        a = _standardise(at_least_fp32(z_a), batch)
        b = _standardise(at_least_fp32(z_b), batch)
        return sum_over_ranks(a.T @ b) / batch


class BarlowTwinsLoss(NamedTuple):
    """The loss and its two terms (before λ), for the log."""

    loss: Tensor
    on_diagonal: Tensor
    off_diagonal: Tensor


def barlow_twins_loss(
    z_a: Tensor, z_b: Tensor, *, off_diagonal_weight: float = 0.0051
) -> BarlowTwinsLoss:
    """``Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij²`` with ``C`` from :func:`cross_correlation`;
    λ defaults to the paper's 0.0051."""
    c = cross_correlation(z_a, z_b)
    on_diagonal = (torch.diagonal(c) - 1).square().sum()
    off_diagonal_sum = off_diagonal(c).square().sum()
    return BarlowTwinsLoss(
        on_diagonal + off_diagonal_weight * off_diagonal_sum, on_diagonal, off_diagonal_sum
    )


@register_method("barlow_twins", BarlowTwinsConfig)
class BarlowTwins(BYOLAugmentation, Method):
    """Backbone + projector; the loss drives the views' cross-correlation to the identity.

    Parameter names are ``backbone.*`` and ``projector.*``, as for the other methods. Each view
    goes through the network in its own forward pass, as in the authors' code, so batch-norm
    statistics are per view.
    """

    def __init__(
        self, backbone: nn.Module, projector: nn.Module, off_diagonal_weight: float
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.off_diagonal_weight = off_diagonal_weight
        self._terms: dict[str, Tensor] = {}

    @classmethod
    def build(cls, config: BarlowTwinsConfig, backbone: nn.Module) -> BarlowTwins:
        """Barlow Twins with ``config``'s projector (biases off, as the authors') and λ."""
        projector = config.projector.build(backbone.num_features, last_bias=False)
        return cls(backbone, projector, config.off_diagonal_weight)

    def embed(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """The projections ``(z_a, z_b)`` of a batch of view pairs, one forward pass each."""
        view_a, view_b = two_views(views, "barlow_twins")
        return self.projector(self.backbone(view_a)), self.projector(self.backbone(view_b))

    def loss(self, embeddings: tuple[Tensor, Tensor]) -> Tensor:
        """The Barlow Twins loss of the batch's projections; keeps its two terms for the log."""
        z_a, z_b = embeddings
        result = barlow_twins_loss(z_a, z_b, off_diagonal_weight=self.off_diagonal_weight)
        self._terms = {
            "method/on_diagonal": result.on_diagonal.detach(),
            "method/off_diagonal": result.off_diagonal.detach(),
        }
        return result.loss

    def log_metrics(self) -> dict[str, Tensor | float]:
        """The invariance and redundancy terms (before λ) of this process's last loss."""
        return dict(self._terms)
