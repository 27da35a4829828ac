"""Batch norm with statistics over the global batch, on every device.

The SSL papers compute batch-norm statistics over all processes' images: with small per-GPU
batches, per-rank statistics change the method, and let SimCLR tell the views of a rank apart
by their shared statistics. ``torch.nn.SyncBatchNorm`` does this on GPUs only (and DDP refuses
it on CPU); :class:`CPUSyncBatchNorm` does the same computation for CPU processes (gloo),
written with differentiable sums over ranks.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers import BatchNormAct2d
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ssl_toolkit.distributed import sum_over_ranks, world_size

__all__ = [
    "CPUSyncBatchNorm",
    "CPUSyncBatchNormAct",
    "SyncBNSetting",
    "convert_sync_batchnorm",
    "wants_sync_bn",
]

SyncBNSetting = Literal["auto"] | bool
"""``model.sync_bn``: ``auto`` synchronises batch norm when more than one process trains."""


def wants_sync_bn(setting: SyncBNSetting, world_size: int) -> bool:
    """Whether ``model.sync_bn`` asks for synchronised batch norm at this world size."""
    return world_size > 1 if setting == "auto" else bool(setting)


class CPUSyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics cover every rank's batch, for CPU processes.

    With more than one rank, the mean and the biased variance are taken over the batches of
    all ranks (two all-reduces; gradients flow through them as through torch's
    ``SyncBatchNorm``), and the running variance gets the unbiased estimate over the global
    count. Otherwise it is a plain batch norm. Statistics are computed in at least fp32.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` (N, C, ...) with global batch statistics when training."""
        if not (self.training and world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        local = torch.cat([x.sum(dims), x.new_full((1,), input.numel() // input.shape[1])])
        totals = sum_over_ranks(local)
        count = totals[-1]
        mean = totals[:-1] / count
        centred = x - mean.view(shape)
        var = sum_over_ranks(centred.square().sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        # Either may be None: SimCLR's head learns a scale without a shift.
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


class CPUSyncBatchNormAct(CPUSyncBatchNorm):
    """:class:`CPUSyncBatchNorm` followed by the dropout and activation of timm's
    ``BatchNormAct2d``, which it replaces."""

    drop: nn.Module
    act: nn.Module

    def forward(self, input: Tensor) -> Tensor:
        """Normalise as :class:`CPUSyncBatchNorm`, then apply dropout and the activation."""
        return self.act(self.drop(super().forward(input)))


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every batch norm in ``module`` by a synchronised one, in place.

    On CUDA that is timm's converter (``torch.nn.SyncBatchNorm``, and ``SyncBatchNormAct`` for
    timm's norm + activation layers); elsewhere :class:`CPUSyncBatchNorm` (or
    :class:`CPUSyncBatchNormAct`). Parameters and buffers are kept (the same objects), so
    optimizers and EMA copies see the same tensors. Returns ``module``, or the replacement when
    ``module`` is itself a batch norm.
    """
    if device.type == "cuda":
        return timm_convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        return _converted(module)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


def _converted(bn: _BatchNorm) -> CPUSyncBatchNorm:
    cls = CPUSyncBatchNormAct if isinstance(bn, BatchNormAct2d) else CPUSyncBatchNorm
    sync = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if isinstance(bn, BatchNormAct2d):
        sync.drop, sync.act = bn.drop, bn.act
    if bn.affine:
        sync.weight, sync.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
        sync.num_batches_tracked = bn.num_batches_tracked
    sync.train(bn.training)
    return sync
