"""What a self-supervised method is to the trainer: views in, embeddings out, a batch loss.

The trainer names no method. It builds one from its config (:meth:`Method.build`), asks it for
its augmentation, and for each optimizer step hands its views to
:func:`ssl_toolkit.accumulation.accumulate`, which calls the method's two steps:

- :meth:`Method.embed` ``(views) -> embeddings``: everything with learnable parameters that
  works sample by sample (backbone, heads, a target network's outputs). The embeddings are a
  tensor or a dict / tuple of batch-first tensors, so that those of several micro-batches
  concatenate into the embeddings of their joined batch.
- :meth:`Method.loss` ``(embeddings) -> Tensor``: everything that couples the samples of the
  batch and the processes (negatives, cross-correlation, gathering across ranks).

This split is what makes gradient accumulation exact: the loss can be taken once over the
embeddings of every micro-batch of a step. ``forward`` is :meth:`Method.embed`, so DDP and
FSDP2, which hook ``forward``, see every embedding pass. After the optimizer step the trainer
calls :meth:`Method.after_optimizer_step` (e.g. BYOL's target EMA; before the step's forward
passes, :meth:`Method.before_optimizer_step`) and, on logging steps,
:meth:`Method.log_metrics`. Evaluation encodes images with :meth:`Method.features`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from models import ProjectionHead
from models.heads import LastBatchNorm
from optim.configs import ConfigModel
from ssl_toolkit.data import BYOLAugment, TwoViewAugment

__all__ = [
    "BYOLAugmentation",
    "Embeddings",
    "HeadConfig",
    "Method",
    "MethodConfig",
    "at_least_fp32",
    "check_pair",
    "check_temperature",
    "features_by_size",
    "full_tensor",
    "off_diagonal",
    "scale_gradient",
    "two_views",
]

Embeddings = Tensor | dict[str, Any] | tuple[Any, ...]
"""What :meth:`Method.embed` returns: a tensor, or a dict / tuple (possibly nested) of
tensors whose first dimension is the batch."""


class MethodConfig(ConfigModel):
    """Keys every method shares; a method's config subclasses it with a literal ``name``
    (unknown keys, non-finite numbers and booleans as numbers are errors)."""

    name: str = Field(description="the registered method to pretrain with")
    loss_scale: float = Field(
        1.0,
        gt=0.0,
        description="multiplies the loss and its gradient (SimCLR's code sums both directions: 2)",
    )
    gradient_scale: float = Field(
        1.0,
        gt=0.0,
        description="multiplies the loss's gradient, not its value (reproduces an authors' "
        "gradient that was a fraction of the exact one)",
    )


class HeadConfig(ConfigModel):
    """An MLP head: hidden width, output width, number of linear layers, the output's norm."""

    hidden_dim: int = Field(2048, ge=1, description="width of the hidden layers")
    out_dim: int = Field(128, ge=1, description="width of the output")
    num_layers: int = Field(2, ge=1, description="number of linear layers")
    last_batch_norm: LastBatchNorm = Field(
        "none",
        description="batch norm on the output: none, affine, scale (γ only: SimCLR's code), "
        "plain (neither: MoCo v3's)",
    )

    def build(
        self, in_dim: int, *, last_bias: bool = True, hidden_bias: bool = False
    ) -> ProjectionHead:
        """The head on ``in_dim`` features."""
        return ProjectionHead(
            in_dim,
            self.hidden_dim,
            self.out_dim,
            num_layers=self.num_layers,
            last_batch_norm=self.last_batch_norm,
            last_bias=last_bias,
            hidden_bias=hidden_bias,
        )


class Method(nn.Module):
    """Base class of every method; register subclasses with ``register_method(name, config)``.

    A subclass implements :meth:`build`, :meth:`embed`, :meth:`loss` and :meth:`augmentation`;
    it keeps the backbone at ``self.backbone`` (or overrides :meth:`features`) and overrides
    the hooks it needs. Nothing in :meth:`embed` may couple the samples of a batch except
    batch-norm layers, whose statistics are per micro-batch under accumulation.
    """

    backbone: nn.Module
    loss_scale: float = 1.0
    gradient_scale: float = 1.0

    @classmethod
    def build(cls, config: MethodConfig, backbone: nn.Module) -> Method:
        """The method described by ``config`` on top of ``backbone`` (heads built here)."""
        raise NotImplementedError(f"{cls.__name__} must implement build(config, backbone)")

    def embed(self, views: Sequence[Tensor]) -> Embeddings:
        """The embeddings of a list of views (batches of the same images), batch first."""
        raise NotImplementedError(f"{type(self).__name__} must implement embed(views)")

    def loss(self, embeddings: Embeddings) -> Tensor:
        """The loss of a batch's embeddings (those :meth:`embed` returned, or several
        micro-batches' concatenated), a scalar."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss(embeddings)")

    def training_loss(self, embeddings: Embeddings) -> Tensor:
        """What the trainer back-propagates: :meth:`loss` times ``loss_scale``, with its
        gradient times ``gradient_scale`` (``method.loss_scale`` / ``method.gradient_scale``;
        ``build_method`` sets both)."""
        loss = self.loss(embeddings)
        if self.loss_scale != 1.0:
            loss = loss * self.loss_scale
        return scale_gradient(loss, self.gradient_scale)

    def forward(self, views: Sequence[Tensor]) -> Embeddings:
        """:meth:`embed`: wrappers (DDP, FSDP2, ``torch.compile``) call ``forward``.

        It calls the class's ``embed``, not the instance's, which FSDP2 wraps with its
        forward hooks (``register_fsdp_forward_method``): the hooks run once per call.
        """
        return type(self).embed(self, views)

    def augmentation(
        self,
        image_size: int,
        *,
        crop_scale: tuple[float, float],
        color_strength: float,
        generator: torch.Generator,
    ) -> TwoViewAugment:
        """The method's default augmentation for images of ``image_size`` pixels: crops of
        ``crop_scale`` of the image area, colour jitter of ``color_strength``."""
        raise NotImplementedError(f"{type(self).__name__} must implement augmentation()")

    def evaluated_backbone(self) -> nn.Module:
        """The backbone that is evaluated and exported (``backbone.pt``): ``self.backbone``
        (DINO's: the teacher's, as its authors evaluate)."""
        return self.backbone

    def features(self, images: Tensor) -> Tensor:
        """Features of :meth:`evaluated_backbone`, the representation that is evaluated."""
        return self.evaluated_backbone()(images)

    def rank_state_dict(self) -> dict[str, Any]:
        """State that differs between processes and is no module buffer (SwAV's queue); the
        checkpoint keeps every process's. Empty here."""
        return {}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this process's :meth:`rank_state_dict`; a no-op here."""

    def trainable_module(self) -> nn.Module:
        """The module whose ``named_parameters()`` the optimizer gets (default: all of it)."""
        return self

    def check_views(self, sizes: Sequence[int]) -> None:
        """A ``ValueError`` unless the method trains on views of these sides, in this order
        (``data.crops``); by default exactly two views (of any sizes)."""
        if len(sizes) != 2:
            raise ValueError(f"{type(self).__name__} takes 2 views, got {len(sizes)} crops")

    def before_optimizer_step(self, step: int, steps_per_epoch: int) -> None:
        """Called before the forward passes of optimizer step ``step`` (1-based), epochs of
        ``steps_per_epoch`` steps (SwAV normalises its prototypes here, DINO sets the
        epoch's teacher temperature); a no-op here. A resumed run calls it too, so what it
        sets follows from the step alone."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after optimizer step ``step`` (1-based) of ``total_steps``; a no-op here."""

    def log_metrics(self) -> dict[str, Tensor | float]:
        """Extra ``method/*`` metrics for the log rows (tensors are fine: one transfer)."""
        return {}


class BYOLAugmentation:
    """Mixin of the methods whose authors cut BYOL's asymmetric views: blur 1.0 / 0.1 and
    solarisation 0 / 0.2 (BYOL, Barlow Twins, VICReg, MoCo v3). Its colour jitter is the
    authors' fixed one, so ``color_strength`` is not used."""

    def augmentation(
        self,
        image_size: int,
        *,
        crop_scale: tuple[float, float],
        color_strength: float,
        generator: torch.Generator,
    ) -> BYOLAugment:
        """BYOL's augmentation at ``image_size`` with crops of ``crop_scale`` of the area."""
        return BYOLAugment(image_size, scale=crop_scale, generator=generator)


def features_by_size(backbone: nn.Module, views: Sequence[Tensor]) -> Tensor:
    """The backbone's features of every view, concatenated in order: one forward per run of
    consecutive views of one size, as the authors' multi-crop code batches them (SwAV's
    ``forward``, DINO's ``MultiCropWrapper``), so batch norm sees each run together."""
    features, start = [], 0
    while start < len(views):
        stop = start + 1
        while stop < len(views) and views[stop].shape[-2:] == views[start].shape[-2:]:
            stop += 1
        batch = views[start] if stop == start + 1 else torch.cat(list(views[start:stop]))
        features.append(backbone(batch))
        start = stop
    return features[0] if len(features) == 1 else torch.cat(features)


def full_tensor(t: Tensor) -> Tensor:
    """``t`` whole: a DTensor (a parameter sharded by FSDP2) gathered, a tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_pair(a: Tensor, b: Tensor, loss: str) -> None:
    """A clear error unless ``a`` and ``b`` are two ``(n, d)`` tensors of one shape, as every
    loss of two views' embeddings takes."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"{loss} expects two (n, d) tensors of equal shape, got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )


def check_temperature(temperature: float) -> float:
    """``temperature``, or a clear error unless it is positive."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return temperature


def off_diagonal(c: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix, as a flat view (no copy)."""
    d = c.shape[0]
    return c.flatten()[:-1].view(d - 1, d + 1)[:, 1:]


def scale_gradient(t: Tensor, scale: float) -> Tensor:
    """``t`` unchanged in value, its gradient multiplied by ``scale``.

    ``t.detach() + scale·(t - t.detach())`` adds an exact zero to the value, so the logged
    loss stays the loss while everything upstream receives ``scale`` times its gradient.
    """
    if scale == 1.0:
        return t
    value = t.detach()
    return value + scale * (t - value)


def two_views(views: Sequence[Tensor], method: str) -> tuple[Tensor, Tensor]:
    """``views`` as a pair, for the methods that take exactly two (a clear error otherwise)."""
    if len(views) != 2:
        raise ValueError(f"{method} takes 2 views, got {len(views)}")
    return views[0], views[1]


def at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in fp32 if it is half precision; fp32 and fp64 stay as they are.

    Losses call it under ``autocast(enabled=False)``: similarities divided by a small
    temperature, or squared cross-correlations summed over thousands of entries, overflow or
    lose all precision in fp16 / bf16.
    """
    return t.to(torch.promote_types(t.dtype, torch.float32))
