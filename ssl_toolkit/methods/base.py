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
calls :meth:`Method.after_optimizer_step` (e.g. BYOL's target EMA) and, on logging steps,
:meth:`Method.log_metrics`. Evaluation encodes images with :meth:`Method.features`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from optim.configs import ConfigModel
from ssl_toolkit.data import TwoViewAugment

__all__ = ["Embeddings", "HeadConfig", "Method", "MethodConfig", "at_least_fp32", "two_views"]

Embeddings = Tensor | dict[str, Any] | tuple[Any, ...]
"""What :meth:`Method.embed` returns: a tensor, or a dict / tuple (possibly nested) of
tensors whose first dimension is the batch."""


class MethodConfig(ConfigModel):
    """Keys every method shares; a method's config subclasses it with a literal ``name``
    (unknown keys, non-finite numbers and booleans as numbers are errors)."""

    name: str = Field(description="the registered method to pretrain with")


class HeadConfig(ConfigModel):
    """An MLP head: hidden width, output width, number of linear layers."""

    hidden_dim: int = Field(2048, ge=1, description="width of the hidden layers")
    out_dim: int = Field(128, ge=1, description="width of the output")
    num_layers: int = Field(2, ge=1, description="number of linear layers")


class Method(nn.Module):
    """Base class of every method; register subclasses with ``register_method(name, config)``.

    A subclass implements :meth:`build`, :meth:`embed`, :meth:`loss` and :meth:`augmentation`;
    it keeps the backbone at ``self.backbone`` (or overrides :meth:`features`) and overrides
    the hooks it needs. Nothing in :meth:`embed` may couple the samples of a batch except
    batch-norm layers, whose statistics are per micro-batch under accumulation.
    """

    backbone: nn.Module

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

    def features(self, images: Tensor) -> Tensor:
        """Backbone features, the representation that is evaluated."""
        return self.backbone(images)

    def trainable_module(self) -> nn.Module:
        """The module whose ``named_parameters()`` the optimizer gets (default: all of it)."""
        return self

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after optimizer step ``step`` (1-based) of ``total_steps``; a no-op here."""

    def log_metrics(self) -> dict[str, Tensor | float]:
        """Extra ``method/*`` metrics for the log rows (tensors are fine: one transfer)."""
        return {}


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
