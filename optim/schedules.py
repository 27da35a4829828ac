"""Learning-rate scaling with batch size, the per-step warmup + cosine schedule, the half-cosine
ramp it decays on (also BYOL's target EMA decay), and setting any scheduled hyperparameter of
an optimizer's param groups."""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = [
    "LRScaling",
    "WarmupPeak",
    "cosine_ramp",
    "scale_lr",
    "set_hyperparameter",
    "set_lr",
    "warmup_cosine",
]

LRScaling = Literal["linear", "sqrt", "none"]
"""How the peak lr follows the global batch: ``x batch / 256``, ``x sqrt(batch)``, or not."""

WarmupPeak = Literal["last_warmup_step", "first_cosine_step"]
"""Where a warmup from 0 over ``W`` steps reaches the peak: at its last step (step ``s``, from
0, at ``peak·(s + 1)/W``), or at the first cosine step (``peak·s/W``: the first step's lr is 0,
as in the SimCLR, BYOL, Barlow Twins, VICReg and MoCo v3 code)."""
_WARMUP_OFFSET: dict[str, int] = {"last_warmup_step": 1, "first_cosine_step": 0}


def scale_lr(base_lr: float, global_batch: int, rule: LRScaling) -> float:
    """The SimCLR rules: ``base_lr * batch / 256`` (linear) or ``base_lr * sqrt(batch)`` (sqrt)."""
    if rule == "linear":
        return base_lr * global_batch / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch)
    return base_lr


def cosine_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """A half cosine from ``start`` at step 0 to ``end`` at ``total_steps``:
    ``end + (start - end)·(1 + cos(π·step/total))/2``. Steps outside ``[0, total_steps]`` are
    clamped, so the value stays within its two endpoints."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    peak_lr: float,
    final_lr: float = 0.0,
    warmup_from: float | None = None,
    warmup_peak_at: WarmupPeak = "last_warmup_step",
) -> float:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then cosine to ``final_lr``.

    Step ``step`` (0-based) of the warmup is ``peak_lr·(step + 1)/warmup_steps``, or with
    ``warmup_peak_at="first_cosine_step"`` ``peak_lr·step/warmup_steps`` (:data:`WarmupPeak`).
    With ``warmup_from`` it is ``numpy.linspace(warmup_from, peak_lr, warmup_steps)[step]``
    instead, as the SwAV and DINO code schedule it (its first step at ``warmup_from``, the peak
    at its last). Step ``warmup_steps + t`` is the cosine's step ``t``, whichever the warmup.
    """
    if warmup_from is not None and warmup_peak_at != "last_warmup_step":
        raise ValueError("warmup_from reaches the peak at the last warmup step (numpy.linspace)")
    if step < warmup_steps:
        if warmup_from is None:
            return peak_lr * (step + _WARMUP_OFFSET[warmup_peak_at]) / warmup_steps
        if warmup_steps == 1:
            return warmup_from
        return warmup_from + (peak_lr - warmup_from) * step / (warmup_steps - 1)
    return cosine_ramp(step - warmup_steps, max(1, total_steps - warmup_steps), peak_lr, final_lr)


def set_hyperparameter(optimizer: torch.optim.Optimizer, name: str, value: float) -> None:
    """Set every group's ``name`` (``lr``, ``weight_decay``, ``momentum``...) to ``value`` times
    the group's ``<name>_scale`` (1 if absent): the scales the parameter rules gave each group
    multiply the scheduled value, so a group without decay keeps none.

    A group without the hyperparameter, or whose scale is ``None`` (a rule's decay that is no
    multiple of the optimizer's), is a ``ValueError``: the schedule would otherwise not apply.
    """
    for index, group in enumerate(optimizer.param_groups):
        scale = group.get(f"{name}_scale", 1.0)
        if name not in group or scale is None:
            why = f"has no {name!r}" if name not in group else f"has a fixed {name}"
            raise ValueError(f"{type(optimizer).__name__} param group {index} {why} to schedule")
        group[name] = value * scale


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times the group's ``lr_scale`` (1 if absent)."""
    set_hyperparameter(optimizer, "lr", lr)
