"""Learning-rate scaling with batch size, and the per-step warmup + cosine schedule."""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["LRScaling", "scale_lr", "set_lr", "warmup_cosine"]

LRScaling = Literal["linear", "sqrt", "none"]
"""How the peak lr follows the global batch: ``x batch / 256``, ``x sqrt(batch)``, or not."""


def scale_lr(base_lr: float, global_batch: int, rule: LRScaling) -> float:
    """The SimCLR rules: ``base_lr * batch / 256`` (linear) or ``base_lr * sqrt(batch)`` (sqrt)."""
    if rule == "linear":
        return base_lr * global_batch / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch)
    return base_lr


def warmup_cosine(
    step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float = 0.0
) -> float:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then cosine to ``final_lr``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times the group's ``lr_scale`` (1 if absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
