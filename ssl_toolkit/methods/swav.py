"""SwAV (Caron et al., NeurIPS 2020, arXiv:2006.09882): predict the cluster assignment of one
crop from every other crop, with assignments balanced over prototypes by Sinkhorn-Knopp.

The loss as facebookresearch/swav ``main_swav.py`` computes it: for each crop used for
assignment, the codes ``q`` are Sinkhorn-Knopp's equipartition of its prototype scores (without
gradient, its sums taken over every process as ``distributed_sinkhorn`` does, optionally with
queued embeddings' scores in front), and every other crop predicts them with a softmax of its
own scores at temperature 0.1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_toolkit.distributed import all_reduce_sum_, world_size

from .base import at_least_fp32, check_temperature

__all__ = ["sinkhorn", "swav_loss"]


@torch.no_grad()
def sinkhorn(scores: Tensor, *, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Soft assignments ``(B, K)`` of ``B`` samples to ``K`` prototypes from their scores.

    ``exp(scores / epsilon)`` is scaled alternately so that every prototype gets ``1/K`` of the
    mass and every sample ``1/B`` (``B`` counts the samples of every process); then each row is
    scaled to sum to 1. The sums over samples are all-reduced across processes, so the codes of
    ``N`` processes are those of one process on the joined batch. Computes in at least fp32.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn expects (batch, prototypes) scores, got {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"need epsilon > 0 and iterations >= 1, got {epsilon}, {iterations}")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        q = torch.exp(at_least_fp32(scores) / epsilon).t()  # K x B, as in the paper
        samples = q.shape[1] * world_size()
        prototypes = q.shape[0]
        q /= all_reduce_sum_(q.sum())
        for _ in range(iterations):
            q /= all_reduce_sum_(q.sum(dim=1, keepdim=True))  # each prototype: 1/K
            q /= prototypes
            q /= q.sum(dim=0, keepdim=True)  # each sample: 1/B
            q /= samples
        q *= samples  # each sample's codes sum to 1
        return q.t()


def swav_loss(
    scores: Sequence[Tensor],
    *,
    crops_for_assign: Sequence[int] = (0, 1),
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    queued: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """SwAV's swapped prediction loss over crops.

    ``scores[v]`` is crop ``v``'s ``(B, K)`` prototype scores (normalised embeddings times the
    normalised prototypes). For each crop in ``crops_for_assign``, its codes are
    :func:`sinkhorn` of its scores (with ``queued[i]``, the scores of queued embeddings, in
    front; the last ``B`` rows are kept); every other crop's cross-entropy against them is
    averaged over those crops, then over the assigned crops. Computes in at least fp32.
    """
    check_temperature(temperature)
    if len(scores) < 2:
        raise ValueError(f"swav_loss needs at least 2 crops, got {len(scores)}")
    if any(s.shape != scores[0].shape or s.ndim != 2 for s in scores):
        raise ValueError(
            f"every crop's scores must be one (B, K) shape, got {[tuple(s.shape) for s in scores]}"
        )
    if not crops_for_assign or any(not 0 <= c < len(scores) for c in crops_for_assign):
        raise ValueError(
            f"crops_for_assign {list(crops_for_assign)} must index the {len(scores)} crops"
        )
    batch = scores[0].shape[0]
    with torch.autocast(device_type=scores[0].device.type, enabled=False):
        log_p = [F.log_softmax(at_least_fp32(s) / temperature, dim=1) for s in scores]
        loss = scores[0].new_zeros((), dtype=log_p[0].dtype)
        for i, crop in enumerate(crops_for_assign):
            assigned = scores[crop].detach()
            extra = queued[i] if queued is not None else None
            if extra is not None:
                assigned = torch.cat((extra.detach().to(assigned.dtype), assigned))
            q = sinkhorn(assigned, epsilon=epsilon, iterations=sinkhorn_iterations)[-batch:]
            others = [v for v in range(len(scores)) if v != crop]
            subloss = sum(-(q * log_p[v]).sum(dim=1).mean() for v in others)
            loss = loss + subloss / len(others)
        return loss / len(crops_for_assign)
