"""DINO (Caron et al., ICCV 2021, arXiv:2104.14294): a student matches the sharpened, centred
output distribution of its EMA teacher on other crops.

The loss as facebookresearch/dino ``main_dino.py`` (``DINOLoss``) computes it: the teacher sees
the global crops, its outputs are centred and sharpened with a temperature that warms up from
0.04 to 0.07 over the first epochs, and the student's softmax at temperature 0.1 on every other
crop is trained against them. The centre is an EMA (momentum 0.9) of the teacher's mean output
over every process's batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_toolkit.distributed import all_reduce_sum_, world_size

from .base import at_least_fp32, check_temperature

__all__ = ["dino_loss", "teacher_temperature", "updated_center"]


def dino_loss(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    center: Tensor,
    *,
    teacher_temp: float = 0.04,
    student_temp: float = 0.1,
) -> Tensor:
    """Cross-entropy of the student's crops against the teacher's centred, sharpened outputs.

    ``student[v]`` is crop ``v``'s ``(B, K)`` output, the global crops first; ``teacher[g]`` is
    the teacher's output of global crop ``g`` (no gradient flows into it); ``center`` is
    ``(1, K)``. Every (teacher crop ``g``, student crop ``v != g``) pair is one term; the loss is
    their mean. Computes in at least fp32.
    """
    check_temperature(teacher_temp)
    check_temperature(student_temp)
    if len(teacher) < 1 or len(student) < 2 or len(teacher) > len(student):
        raise ValueError(
            f"dino_loss needs teacher crops among at least 2 student crops, got "
            f"{len(teacher)} and {len(student)}"
        )
    shape = student[0].shape
    if any(t.shape != shape or t.ndim != 2 for t in (*student, *teacher)):
        raise ValueError(
            "every crop's output must be one (B, K) shape, got "
            f"{[tuple(t.shape) for t in (*student, *teacher)]}"
        )
    with torch.autocast(device_type=student[0].device.type, enabled=False):
        centre = at_least_fp32(center.detach())
        targets = [
            F.softmax((at_least_fp32(t.detach()) - centre) / teacher_temp, dim=-1) for t in teacher
        ]
        log_p = [F.log_softmax(at_least_fp32(s) / student_temp, dim=-1) for s in student]
        terms = [
            (-q * log_p[v]).sum(dim=-1).mean()
            for g, q in enumerate(targets)
            for v in range(len(log_p))
            if v != g
        ]
        return sum(terms) / len(terms)


@torch.no_grad()
def updated_center(center: Tensor, teacher: Sequence[Tensor], momentum: float = 0.9) -> Tensor:
    """DINO's centre after one step: ``momentum * center + (1 - momentum) * mean``, the mean
    of the teacher's outputs over every crop and every process's batch."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"center momentum must be in [0, 1], got {momentum}")
    outputs = torch.cat([at_least_fp32(t.detach()) for t in teacher])
    total = all_reduce_sum_(outputs.sum(dim=0, keepdim=True))
    batch_center = total / (outputs.shape[0] * world_size())
    return center * momentum + batch_center.to(center.dtype) * (1 - momentum)


def teacher_temperature(
    epoch: int, *, warmup_epochs: int = 30, start: float = 0.04, end: float = 0.07
) -> float:
    """The teacher temperature of ``epoch`` (0-based), as ``DINOLoss``'s schedule: evenly
    spaced from ``start`` at epoch 0 to ``end`` at epoch ``warmup_epochs - 1``, then ``end``."""
    if epoch >= warmup_epochs:
        return end
    if warmup_epochs == 1:
        return start
    return start + (end - start) * max(epoch, 0) / (warmup_epochs - 1)
