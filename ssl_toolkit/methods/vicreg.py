"""VICReg (Bardes, Ponce and LeCun, ICLR 2022, arXiv:2105.04906): variance, invariance and
covariance regularisation of two views' embeddings.

Config, model (backbone + 8192-8192-8192 expander), the loss and the augmentation, all here, as
the authors' ``main_vicreg.py`` computes them:

- invariance: the mean squared error between the two views' embeddings, over this process's
  rows;
- variance: for each view, the mean over dimensions of ``relu(1 - sqrt(var + 1e-4))``, the
  variance over the batch of every process, halved, summed over both views;
- covariance: for each view, the squared off-diagonal entries of the batch covariance, summed
  and divided by the dimension, summed over both views;
- loss: ``25·invariance + 25·variance + 1·covariance``.

Across ranks the embeddings are gathered with a backward that sums the gradients over ranks
(the authors' ``FullGatherLayer``), so after DDP's mean the gradients are those of one process
on the joined batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssl_toolkit.distributed import gather_with_grad, world_size

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

__all__ = ["VICReg", "VICRegConfig", "VICRegLoss", "vicreg_loss"]


class VICRegExpander(HeadConfig):
    """The authors' expander: 8192-8192-8192, Linear-BN-ReLU blocks, no output bias."""

    hidden_dim: int = Field(8192, ge=1, description="width of the hidden layers")
    out_dim: int = Field(8192, ge=1, description="width of the output")
    num_layers: int = Field(3, ge=1, description="number of linear layers")


class VICRegConfig(MethodConfig):
    """VICReg: invariance, variance and covariance terms on two views' embeddings."""

    name: Literal["vicreg"] = Field("vicreg", description="selects this method")
    projector: VICRegExpander = Field(
        default_factory=VICRegExpander, description="the expander on the backbone features"
    )
    invariance_weight: float = Field(25.0, ge=0.0, description="λ of the invariance term")
    variance_weight: float = Field(25.0, ge=0.0, description="μ of the variance term")
    covariance_weight: float = Field(1.0, ge=0.0, description="ν of the covariance term")


class VICRegLoss(NamedTuple):
    """The loss and its three terms (before their weights), for the log."""

    loss: Tensor
    invariance: Tensor
    variance: Tensor
    covariance: Tensor


def _variance_and_covariance(z: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """One view's variance hinge and covariance penalty over the gathered batch."""
    centred = z - z.mean(dim=0)
    std = torch.sqrt(centred.var(dim=0) + epsilon)
    cov = centred.T @ centred / (z.shape[0] - 1)
    return F.relu(1 - std).mean(), off_diagonal(cov).square().sum() / z.shape[1]


def vicreg_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    epsilon: float = 1e-4,
) -> VICRegLoss:
    """VICReg's loss of two views' embeddings ``(n, d)``; the defaults are the paper's.

    The invariance term is over this process's rows; the variance and covariance terms are over
    the rows of every process, gathered with gradients (every rank passes the same ``n``). The
    variance term is the mean of the two views' hinges, as ``main_vicreg.py`` halves each.
    Computes in at least fp32, also under autocast.
    """
    check_pair(z_a, z_b, "vicreg_loss")
    if z_a.shape[0] * world_size() < 2:
        raise ValueError("vicreg_loss needs at least 2 rows over all processes (a variance)")
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        z_a, z_b = at_least_fp32(z_a), at_least_fp32(z_b)
        invariance = F.mse_loss(z_a, z_b)
        if world_size() > 1:
            z_a, z_b = gather_with_grad(z_a), gather_with_grad(z_b)
        variance_a, covariance_a = _variance_and_covariance(z_a, epsilon)
        variance_b, covariance_b = _variance_and_covariance(z_b, epsilon)
        variance = variance_a / 2 + variance_b / 2
        covariance = covariance_a + covariance_b
        loss = (
            invariance_weight * invariance
            + variance_weight * variance
            + covariance_weight * covariance
        )
        return VICRegLoss(loss, invariance, variance, covariance)


@register_method("vicreg", VICRegConfig)
class VICReg(BYOLAugmentation, Method):
    """Backbone + expander; the loss keeps the views' embeddings close, spread and decorrelated.

    Parameter names are ``backbone.*`` and ``projector.*``, as for the other methods. Each view
    goes through the network in its own forward pass, as in the authors' code, so batch-norm
    statistics are per view. The augmentation is the authors' (``augmentations.py``), which is
    BYOL's.
    """

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module,
        *,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.weights = dict(
            invariance_weight=invariance_weight,
            variance_weight=variance_weight,
            covariance_weight=covariance_weight,
        )
        self._terms: dict[str, Tensor] = {}

    @classmethod
    def build(cls, config: VICRegConfig, backbone: nn.Module) -> VICReg:
        """VICReg with ``config``'s expander (no output bias, as the authors') and weights."""
        return cls(
            backbone,
            config.projector.build(backbone.num_features, last_bias=False),
            invariance_weight=config.invariance_weight,
            variance_weight=config.variance_weight,
            covariance_weight=config.covariance_weight,
        )

    def embed(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """The embeddings ``(z_a, z_b)`` of a batch of view pairs, one forward pass each."""
        view_a, view_b = two_views(views, "vicreg")
        return self.projector(self.backbone(view_a)), self.projector(self.backbone(view_b))

    def loss(self, embeddings: tuple[Tensor, Tensor]) -> Tensor:
        """The VICReg loss of the batch's embeddings; keeps its three terms for the log."""
        result = vicreg_loss(*embeddings, **self.weights)
        self._terms = {
            f"method/{term}": getattr(result, term).detach()
            for term in ("invariance", "variance", "covariance")
        }
        return result.loss

    def log_metrics(self) -> dict[str, Tensor | float]:
        """The invariance, variance and covariance terms of this process's last loss."""
        return dict(self._terms)
