"""Contrastive and regression losses for SimCLR and BYOL.

Both losses work on L2-normalised embeddings and compute in at least fp32, even under autocast:
cosine similarities divided by a small temperature overflow or lose all precision in fp16/bf16.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["byol_loss", "nt_xent"]


def _upcast(t: Tensor) -> Tensor:
    """Return ``t`` in fp32 if it is a half-precision tensor; keep fp32 and fp64 as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _world_size() -> int:
    """Number of ranks taking part in the loss: 1 unless a process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns the SUM over ranks of each slice's gradient.

    Rank r's rows are candidates in the loss of every rank, so the gradient of the sum of all
    ranks' losses with respect to those rows is the sum of what each rank's backward computes for
    them. The backward all-reduces (sums) the gradient of the whole gathered tensor and keeps this
    rank's slice. Keeping the slice without summing drops every other rank's contribution and
    gives gradients off by the world size.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        tensor = tensor.contiguous()
        chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, tensor)
        ctx.rows = tensor.shape[0]
        ctx.rank = dist.get_rank()
        return torch.cat(chunks)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Autograd may reuse grad elsewhere: reduce a copy, never the incoming tensor.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def _gather_with_grad(z: Tensor) -> Tensor:
    """Concatenate ``z`` from all ranks (rank order) with gradients flowing back to every rank."""
    return _AllGatherWithGrad.apply(z)


def nt_xent(z_a: Tensor, z_b: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent loss (normalised temperature-scaled cross entropy) over 2N views.

    ``z_a[i]`` and ``z_b[i]`` are the projections of two augmented views of image ``i``, shape
    ``(n, d)``. Each of the 2n views is an anchor whose positive is the other view of the same
    image and whose negatives are all remaining views; self-similarity is masked out. The loss
    is the mean over anchors of ``-log softmax(cos(anchor, candidates) / temperature)[positive]``.

    Distributed: when a process group with world size W > 1 is initialised, the candidates are
    the views of all ranks, gathered with gradients, while the anchors are this rank's 2n views
    and the result is their mean. Every rank must pass the same n. The global loss over the
    joined batch is then the mean of the W local losses, and after DDP averages the parameter
    gradients over ranks they equal the gradients of one process on the joined batch of W·n
    images.

    The computation runs in at least fp32, also under autocast.
    """
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise ValueError(
            f"nt_xent expects two (n, d) tensors of equal shape, got {tuple(z_a.shape)} "
            f"and {tuple(z_b.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n = z_a.shape[0]
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        anchors = F.normalize(_upcast(torch.cat([z_a, z_b])), dim=1)
        world = _world_size()
        if world > 1:
            candidates = _gather_with_grad(anchors)
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


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss: the batch mean of ``2 - 2·cos(p, z)``, in [0, 4].

    ``p`` is the online prediction and ``z`` the target projection, shape ``(n, d)``. ``z`` is
    detached here, so the target never receives a gradient whatever the caller does. Computes in
    at least fp32, also under autocast.
    """
    if p.shape != z.shape or p.ndim != 2:
        raise ValueError(
            f"byol_loss expects two (n, d) tensors of equal shape, got {tuple(p.shape)} "
            f"and {tuple(z.shape)}"
        )
    with torch.autocast(device_type=p.device.type, enabled=False):
        p = F.normalize(_upcast(p), dim=1)
        z = F.normalize(_upcast(z.detach()), dim=1)
        return (2 - 2 * (p * z).sum(dim=1)).mean()
