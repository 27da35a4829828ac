"""Checks made before the first step, so that a run that cannot work fails at once, naming the
key to change, rather than after minutes of set-up or mid-training with a traceback."""

from __future__ import annotations

from collections.abc import Sequence

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
    view_sizes: Sequence[int],
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
    sizes_from: str = "data.image_size",
) -> None:
    """Embed blank views of ``view_sizes`` pixels (one per crop) with ``method`` and take their
    loss, so that a model that cannot take them (a timm ViT at another size) is a
    :class:`ConfigError` before training, naming ``sizes_from``, the key that set the sizes.

    It runs in eval mode, without gradients and with the random generators forked, so nothing
    of the run changes: no batch-norm statistics, no random stream. Every process must call it
    (a method's loss may gather across processes).
    """
    views = [
        torch.zeros(2, 3, size, size, device=device).contiguous(memory_format=memory_format)
        for size in view_sizes
    ]
    cuda = [device.index or 0] if device.type == "cuda" else []
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            method.loss(method(views))
    except torch.OutOfMemoryError:
        raise  # a real limit of the device, not a shape the model cannot take
    except (RuntimeError, AssertionError, ValueError) as error:
        reason = one_line((str(error).strip().splitlines() or [error])[0])
        raise ConfigError(
            [
                f"model.backbone: {backbone} cannot take {sizes_from}={_sides(view_sizes)} "
                f"images ({reason})"
            ]
        ) from None
    finally:
        method.train(was_training)


def _sides(sizes: Sequence[int]) -> str:
    """``32`` or ``[224, 96]``: the distinct view sides, in order."""
    distinct = list(dict.fromkeys(sizes))
    return str(distinct[0]) if len(distinct) == 1 else str(distinct)
