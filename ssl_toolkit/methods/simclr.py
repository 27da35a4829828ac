"""SimCLR (Chen et al. 2020, arXiv:2002.05709): contrast two augmented views of each image.

Config, model (backbone + projector), the NT-Xent loss and the default augmentation, all here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssl_toolkit.data import SimCLRAugment
from ssl_toolkit.distributed import gather_with_grad, world_size

from .base import (
    HeadConfig,
    Method,
    MethodConfig,
    at_least_fp32,
    check_pair,
    check_temperature,
    two_views,
)
from .registry import register_method

__all__ = ["SimCLR", "SimCLRConfig", "nt_xent"]


class SimCLRConfig(MethodConfig):
    """SimCLR: NT-Xent over two views of a backbone + projector."""

    name: Literal["simclr"] = Field("simclr", description="selects this method")
    temperature: float = Field(0.2, gt=0.0, description="NT-Xent temperature")
    projector: HeadConfig = Field(
        HeadConfig(hidden_dim=2048, out_dim=128, num_layers=2),
        description="projection head on the backbone features",
    )


def nt_xent(z_a: Tensor, z_b: Tensor, *, temperature: float = 0.1) -> Tensor:
    """SimCLR's NT-Xent loss (normalised temperature-scaled cross entropy) over 2N views.

    ``z_a[i]`` and ``z_b[i]`` are the projections of two augmented views of image ``i``, shape
    ``(n, d)``. Each of the 2n views is an anchor whose positive is the other view of the same
    image and whose negatives are all remaining views; self-similarity is masked out. The loss
    is the mean over anchors of ``-log softmax(cos(anchor, candidates) / temperature)[positive]``.
    The authors' code (``objective.py``) returns the sum of the two directions' means, twice
    this: ``method.loss_scale: 2`` reproduces it. ``temperature`` defaults to the paper's 0.1.

    Distributed: when a process group with world size W > 1 is initialised, the candidates are
    the views of all ranks, gathered with gradients, while the anchors are this rank's 2n views
    and the result is their mean. Every rank must pass the same n. The global loss over the
    joined batch is then the mean of the W local losses, and after DDP averages the parameter
    gradients over ranks they equal the gradients of one process on the joined batch of W·n
    images.

    The computation runs in at least fp32, also under autocast.
    """
    check_pair(z_a, z_b, "nt_xent")
    check_temperature(temperature)
    n = z_a.shape[0]
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        anchors = F.normalize(at_least_fp32(torch.cat([z_a, z_b])), dim=1)
        if world_size() > 1:
            candidates = gather_with_grad(anchors)
            offset = dist.get_rank() * 2 * n
        else:
            candidates = anchors
            offset = 0
        logits = anchors @ candidates.T / temperature
        local = torch.arange(2 * n, device=anchors.device)
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[local, offset + local] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        positives = offset + (local + n) % (2 * n)
        return F.cross_entropy(logits, positives)


@register_method("simclr", SimCLRConfig)
class SimCLR(Method):
    """Backbone + projection head trained with the NT-Xent loss.

    Parameter names are ``backbone.*`` and ``projector.*`` (the same prefixes as the other
    methods), so optimizer rules such as ``projector.*`` read the same for every method.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, temperature: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.temperature = check_temperature(temperature)

    @classmethod
    def build(cls, config: SimCLRConfig, backbone: nn.Module) -> SimCLR:
        """SimCLR with ``config``'s projector and temperature on ``backbone``."""
        return cls(backbone, config.projector.build(backbone.num_features), config.temperature)

    def embed(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """The projections ``(z_a, z_b)`` of a batch of view pairs ``(n, ...)`` and ``(n, ...)``.

        Both views go through the backbone in one forward pass (batch concatenation), as in the
        reference implementation: one kernel launch sequence, and batch-norm statistics over
        all 2n views.
        """
        view_a, view_b = two_views(views, "simclr")
        n = view_a.shape[0]
        z = self.projector(self.backbone(torch.cat([view_a, view_b])))
        return z[:n], z[n:]

    def loss(self, embeddings: tuple[Tensor, Tensor]) -> Tensor:
        """The NT-Xent loss of the projections of every view pair of the batch."""
        z_a, z_b = embeddings
        return nt_xent(z_a, z_b, temperature=self.temperature)

    def augmentation(
        self,
        image_size: int,
        *,
        crop_scale: tuple[float, float],
        color_strength: float,
        generator: torch.Generator,
    ) -> SimCLRAugment:
        """SimCLR's augmentation: one policy for both views, colour strength as given."""
        return SimCLRAugment(
            image_size, scale=crop_scale, jitter_strength=color_strength, generator=generator
        )
