"""Batch norm with statistics over the global batch, or over groups of ranks, on every device.

The SSL papers compute batch-norm statistics over all processes' images: with small per-GPU
batches, per-rank statistics change the method, and let SimCLR tell the views of a rank apart
by their shared statistics. ``torch.nn.SyncBatchNorm`` does this on GPUs only (and DDP refuses
it on CPU); :class:`CPUSyncBatchNorm` does the same computation for CPU processes (gloo),
written with differentiable sums over ranks. SwAV's scripts synchronise within groups of 8
consecutive ranks instead (apex's ``create_syncbn_process_group``): :func:`sync_bn_group`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from timm.layers import BatchNormAct2d
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.nn.modules.batchnorm import _BatchNorm

from ssl_toolkit.distributed import world_size

__all__ = [
    "CPUSyncBatchNorm",
    "CPUSyncBatchNormAct",
    "SyncBNSetting",
    "convert_sync_batchnorm",
    "sync_bn_group",
    "sync_bn_groups",
    "wants_sync_bn",
]

SyncBNSetting = Literal["auto"] | bool
"""``model.sync_bn``: ``auto`` synchronises batch norm when more than one process trains."""


def wants_sync_bn(setting: SyncBNSetting, world_size: int) -> bool:
    """Whether ``model.sync_bn`` asks for synchronised batch norm at this world size."""
    return world_size > 1 if setting == "auto" else bool(setting)


def sync_bn_groups(world_size: int, group_size: int | None) -> list[list[int]]:
    """The ranks of each batch-norm group: all of them (``group_size=None``), or runs of
    ``group_size`` consecutive ranks, as apex's ``create_syncbn_process_group`` forms them
    (``ValueError`` unless ``group_size`` divides ``world_size``)."""
    if group_size is None:
        return [list(range(world_size))]
    if group_size < 1 or world_size % group_size:
        raise ValueError(f"{group_size} does not divide the {world_size} processes")
    return [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]


def sync_bn_group(group_size: int | None) -> ProcessGroup | None:
    """This process's batch-norm group (``None``: every process, the default group).

    Collective: every rank creates every group (``torch.distributed.new_group`` asks all of
    them to), then keeps its own."""
    world = world_size()
    groups = sync_bn_groups(world, group_size)
    if len(groups) == 1:
        return None
    created = [dist.new_group(ranks) for ranks in groups]
    return created[dist.get_rank() // len(groups[0])]


class CPUSyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics cover every rank's batch, for CPU processes.

    With more than one rank in ``process_group`` (``None``: all ranks), the mean and the
    biased variance are taken over the batches of its ranks (two all-reduces; gradients flow
    through them as through torch's ``SyncBatchNorm``), and the running variance gets the
    unbiased estimate over the group's count. Otherwise it is a plain batch norm. Statistics
    are computed in at least fp32.
    """

    process_group: ProcessGroup | None = None

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` (N, C, ...) with global batch statistics when training."""
        if not (self.training and self._group_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        local = torch.cat([x.sum(dims), x.new_full((1,), input.numel() // input.shape[1])])
        totals = self._sum_over_group(local)
        count = totals[-1]
        mean = totals[:-1] / count
        centred = x - mean.view(shape)
        var = self._sum_over_group(centred.square().sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        # Either may be None: SimCLR's head learns a scale without a shift.
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out.to(input.dtype)

    def _group_size(self) -> int:
        if world_size() == 1:
            return 1
        return dist.get_world_size(self.process_group)

    def _sum_over_group(self, t: Tensor) -> Tensor:
        """The sum over the group's ranks; its backward sums the gradients over them too."""
        return dist_nn.all_reduce(t, group=self.process_group)

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


def convert_sync_batchnorm(
    module: nn.Module, device: torch.device, process_group: ProcessGroup | None = None
) -> nn.Module:
    """Replace every batch norm in ``module`` by one synchronised over ``process_group``
    (``None``: all processes; see :func:`sync_bn_group`), in place.

    On CUDA that is timm's converter (``torch.nn.SyncBatchNorm``, and ``SyncBatchNormAct`` for
    timm's norm + activation layers); elsewhere :class:`CPUSyncBatchNorm` (or
    :class:`CPUSyncBatchNormAct`). Parameters and buffers are kept (the same objects), so
    optimizers and EMA copies see the same tensors. Returns ``module``, or the replacement when
    ``module`` is itself a batch norm.
    """
    if device.type == "cuda":
        return timm_convert_sync_batchnorm(module, process_group)
    if isinstance(module, _BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        return _converted(module, process_group)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device, process_group))
    return module


def _converted(bn: _BatchNorm, process_group: ProcessGroup | None) -> CPUSyncBatchNorm:
    cls = CPUSyncBatchNormAct if isinstance(bn, BatchNormAct2d) else CPUSyncBatchNorm
    sync = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    sync.process_group = process_group
    if isinstance(bn, BatchNormAct2d):
        sync.drop, sync.act = bn.drop, bn.act
    if bn.affine:
        sync.weight, sync.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
        sync.num_batches_tracked = bn.num_batches_tracked
    sync.train(bn.training)
    return sync
