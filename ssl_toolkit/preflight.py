"""Checks made before the first step, so that a run that cannot work fails at once, naming the
key to change, rather than after minutes of set-up or mid-training with a traceback."""

from __future__ import annotations

import torch
from torch import nn

from optim import ConfigError
from optim.errors import one_line

__all__ = ["check_accumulation", "check_batch_fits", "dry_forward"]


def check_batch_fits(images: int, batch_size: int, world_size: int) -> None:
    """Raise :class:`ConfigError` unless every process gets at least one whole batch of the
    ``images`` training images."""
    per_process = images // world_size
    if batch_size > per_process:
        shared = f", {per_process} for each of {world_size} processes" if world_size > 1 else ""
        raise ConfigError(
            [
                f"data.batch_size: {batch_size} is larger than the training set "
                f"({images} images{shared}); the largest value allowed is {per_process}"
            ]
        )


def check_accumulation(accumulate: int, batches_per_epoch: int, batch_size: int) -> None:
    """Raise :class:`ConfigError` when a step would accumulate more micro-batches than an
    epoch has: the global batch, and the lr scaled for it, would count images never seen."""
    if accumulate > batches_per_epoch:
        raise ConfigError(
            [
                f"trainer.accumulate_grad_batches: {accumulate} is more than the "
                f"{batches_per_epoch} batches of an epoch (data.batch_size={batch_size}); the "
                f"largest value allowed is {batches_per_epoch}"
            ]
        )


def dry_forward(
    method: nn.Module,
    *,
    backbone: str,
    image_size: int,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> None:
    """Embed two blank views of ``image_size`` pixels with ``method`` and take their loss, so
    that a model that cannot take them (a timm ViT at another size) is a :class:`ConfigError`
    before training.

    It runs in eval mode, without gradients and with the random generators forked, so nothing
    of the run changes: no batch-norm statistics, no random stream. Every process must call it
    (a method's loss may gather across processes).
    """
    views = torch.zeros(2, 3, image_size, image_size, device=device)
    views = views.contiguous(memory_format=memory_format)
    cuda = [device.index or 0] if device.type == "cuda" else []
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            method.loss(method([views, views]))
    except torch.OutOfMemoryError:
        raise  # a real limit of the device, not a shape the model cannot take
    except (RuntimeError, AssertionError, ValueError) as error:
        reason = one_line((str(error).strip().splitlines() or [error])[0])
        raise ConfigError(
            [
                f"model.backbone: {backbone} cannot take data.image_size={image_size} images "
                f"({reason})"
            ]
        ) from None
    finally:
        method.train(was_training)
