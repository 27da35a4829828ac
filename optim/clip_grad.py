"""Gradient clipping on the device: per parameter (DINO's ``clip_gradients``) or by the norm of
all gradients together (``torch.nn.utils.clip_grad_norm_``), with no host sync.

The reference implementations decide with a Python ``if`` on a tensor whether to clip, which
waits for the GPU; here the coefficient is ``min(max_norm / (norm + 1e-6), 1)`` computed on the
device and every gradient is multiplied by it (by exactly 1 when it is not clipped). Sharded
(FSDP2) gradients are clipped by the norms of the whole tensors, and gradients that a
GradScaler has not unscaled yet are clipped by their unscaled norms (``grad_scale``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .lars import _shard_group

__all__ = ["clip_grad_norms_"]

_EPS = 1e-6  # as both references add to the norm


def clip_grad_norms_(
    grads: Sequence[Tensor],
    max_norm: float,
    *,
    per_parameter: bool = False,
    grad_scale: Tensor | None = None,
) -> Tensor:
    """Clip ``grads`` in place to ``max_norm``; returns the norms before clipping.

    ``per_parameter``: each tensor to its own norm (one norm per tensor returned), else all of
    them by their total norm (a 0-d tensor). ``grad_scale``: the gradients are still multiplied
    by it (a GradScaler that lets the optimizer unscale), so norms are divided by it.
    """
    if not grads:
        return torch.zeros(0)
    buckets: dict[tuple, list[int]] = {}
    for index, grad in enumerate(grads):
        group = _shard_group(grad)
        buckets.setdefault((grad.device, grad.dtype, group), []).append(index)
    local = [g.to_local() if _shard_group(g) is not None else g for g in grads]
    norms_by_bucket = []
    for (_, dtype, group), indices in buckets.items():
        norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        norms = torch.stack(torch._foreach_norm([local[i] for i in indices], 2, dtype=norm_dtype))
        if group is not None:
            norms = norms.square_()
            dist.all_reduce(norms, group=group)
            norms = norms.sqrt_()
        if grad_scale is not None:
            norms = norms / grad_scale.to(norms.device)
        norms_by_bucket.append(norms)
    device = norms_by_bucket[0].device
    if per_parameter:
        for (_, dtype, _), indices, norms in zip(buckets, buckets.values(), norms_by_bucket):
            coefs = _coefficients(norms, max_norm).to(dtype)
            torch._foreach_mul_([local[i] for i in indices], list(coefs.unbind()))
        norms = torch.cat([n.to(device) for n in norms_by_bucket])
        order = [i for indices in buckets.values() for i in indices]
        if order != sorted(order):  # several devices or dtypes: back to the order of `grads`
            norms = norms[[order.index(i) for i in range(len(order))]]
        return norms
    total = torch.stack([n.to(device).square().sum() for n in norms_by_bucket]).sum().sqrt()
    coef = _coefficients(total, max_norm)
    for (tensor_device, dtype, _), indices in buckets.items():
        torch._foreach_mul_([local[i] for i in indices], coef.to(tensor_device, dtype))
    return total


def _coefficients(norms: Tensor, max_norm: float) -> Tensor:
    """``min(max_norm / (norm + 1e-6), 1)``: what each gradient is multiplied by."""
    return torch.clamp(max_norm / (norms + _EPS), max=1.0)
