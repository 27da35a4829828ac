"""What a self-supervised method is to the trainer: a config, a module with a loss, and hooks.

The trainer names no method. It builds one from its config (:meth:`Method.build`), asks it for
its two-view augmentation, calls it on each pair of views for the loss, steps the optimizer on
:meth:`Method.trainable_module`, then calls the hooks: :meth:`Method.after_optimizer_step` (e.g.
BYOL's target EMA) and, on logging steps, :meth:`Method.log_metrics`. Evaluation encodes images
with :meth:`Method.embed`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field
from torch import Tensor, nn

from optim.configs import ConfigModel

if TYPE_CHECKING:
    from ssl_toolkit.config import DataConfig
    from ssl_toolkit.data import TwoViewAugment

__all__ = ["HeadConfig", "Method", "MethodConfig", "at_least_fp32"]


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

    A subclass implements :meth:`build`, ``forward(view_a, view_b) -> loss`` and
    :meth:`augmentation`; it keeps the backbone at ``self.backbone`` (or overrides
    :meth:`embed`) and overrides the hooks it needs.
    """

    backbone: nn.Module

    @classmethod
    def build(cls, config: MethodConfig, backbone: nn.Module) -> Method:
        """The method described by ``config`` on top of ``backbone`` (heads built here)."""
        raise NotImplementedError(f"{cls.__name__} must implement build(config, backbone)")

    def augmentation(self, data: DataConfig, generator: torch.Generator) -> TwoViewAugment:
        """The method's default two-view augmentation for images of ``data``."""
        raise NotImplementedError(f"{type(self).__name__} must implement augmentation()")

    def embed(self, x: Tensor) -> Tensor:
        """Backbone features, the representation that is evaluated."""
        return self.backbone(x)

    def trainable_module(self) -> nn.Module:
        """The module whose ``named_parameters()`` the optimizer gets (default: all of it)."""
        return self

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after optimizer step ``step`` (1-based) of ``total_steps``; a no-op here."""

    def log_metrics(self) -> dict[str, Tensor | float]:
        """Extra ``method/*`` metrics for the log rows (tensors are fine: one transfer)."""
        return {}


def at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in fp32 if it is half precision; fp32 and fp64 stay as they are.

    Losses call it under ``autocast(enabled=False)``: similarities divided by a small
    temperature, or squared cross-correlations summed over thousands of entries, overflow or
    lose all precision in fp16 / bf16.
    """
    return t.to(torch.promote_types(t.dtype, torch.float32))
