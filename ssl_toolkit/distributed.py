"""Process placement: which device this process uses, its rank, and who writes files.

Everything rank-dependent (device choice, process-group init, "only the main rank writes the
checkpoint, config and W&B run") is decided here once, from the environment variables that
``torchrun`` sets, so the rest of the toolkit only reads a :class:`DistContext`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DEVICES",
    "Device",
    "DeviceUnavailableError",
    "DistContext",
    "all_gather_rows",
    "all_reduce_mean",
    "all_reduce_sum_",
    "cleanup_distributed",
    "gather_objects",
    "gather_with_grad",
    "is_main_process",
    "resolve_device",
    "setup_distributed",
    "sum_over_ranks",
    "world_size",
]

Device = Literal["auto", "cpu", "cuda"]
"""Where to train: ``auto`` is ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
DEVICES: tuple[str, ...] = get_args(Device)
"""The values of :data:`Device`."""


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist on this machine (e.g. ``cuda`` without CUDA)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process runs and which part of the job it is.

    ``rank`` is the global rank, ``local_rank`` the rank on this node (it selects the GPU), and
    ``device`` the device that models and batches go to. A single-process run is
    ``DistContext(0, 1, 0, device)``.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files (checkpoints, config, W&B) and prints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when several processes train together and collectives are needed."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    """Read an integer environment variable set by torchrun, with a clear error if malformed."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """The concrete device for a ``trainer.device`` setting and this process's local rank."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "device 'cuda' was requested but CUDA is not available on this machine "
            "(use device 'auto' or 'cpu')"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceUnavailableError(
            f"LOCAL_RANK={local_rank} needs GPU {local_rank} but only {count} GPU(s) are visible"
        )
    return torch.device("cuda", local_rank)


def setup_distributed(device: str = "auto", timeout: timedelta | None = None) -> DistContext:
    """Decide this process's device and rank, and join the process group when there are peers.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (defaults 0, 1, 0, i.e. a plain
    ``python`` run). ``device`` is ``"auto"`` (``cuda:LOCAL_RANK`` if CUDA is available, else
    CPU), ``"cpu"`` or ``"cuda"`` (raises :class:`DeviceUnavailableError` without CUDA). The
    default process group (NCCL on CUDA, gloo on CPU, rendezvous from ``MASTER_ADDR`` /
    ``MASTER_PORT``) is initialised only when ``WORLD_SIZE > 1`` and not already initialised;
    ``timeout`` bounds every collective (torch's default when ``None``).
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent RANK={rank} / WORLD_SIZE={world_size}")
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        backend: dict[str, Any] = (
            {"backend": "nccl", "device_id": resolved}
            if resolved.type == "cuda"
            else {"backend": "gloo"}
        )
        dist.init_process_group(**backend, rank=rank, world_size=world_size, timeout=timeout)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def is_main_process() -> bool:
    """True in a plain run and on rank 0 of a ``torchrun`` job, before or after joining."""
    return _env_int("RANK", 0) == 0


def cleanup_distributed(*, sync: bool = False) -> None:
    """Leave the process group if one was joined; a no-op in single-process runs.

    Safe in ``finally`` blocks: by default it does not wait for the other ranks, which may be
    gone after an error. At the normal end of a run pass ``sync=True`` so all ranks first meet
    at a barrier and no rank tears down its connections while a peer is still using them.
    """
    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    """Number of ranks training together: 1 unless a process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of a floating-point tensor over all ranks, as a new tensor (``t`` is untouched).

    Used for logging values that each rank computes on its own shard (the loss). Returns ``t``
    itself when not running distributed.
    """
    if world_size() == 1:
        return t
    if not t.is_floating_point():
        raise TypeError(f"all_reduce_mean needs a floating-point tensor, got {t.dtype}")
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(dist.get_world_size())


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks in place and return it, outside autograd: for statistics that
    carry no gradient (Sinkhorn-Knopp's sums, DINO's centre). ``t`` itself when not
    distributed."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def all_gather_rows(t: Tensor) -> Tensor:
    """``t`` of every rank concatenated along dim 0, in rank order; shapes must be equal."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` when not running distributed)."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def sum_over_ranks(t: Tensor) -> Tensor:
    """Sum of ``t`` over all ranks, differentiable: the backward sums the gradients too.

    Every rank computing the same loss from the sum then gets, for its own inputs, the gradient
    of the sum of all ranks' losses, i.e. world size times the gradient of the one global loss.
    DDP's mean over ranks turns that into the gradient of one process on the joined batch.
    Returns ``t`` itself when not running distributed.
    """
    if world_size() == 1:
        return t
    return _SumOverRanks.apply(t)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces (sums) the gradient too."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


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


def gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from all ranks (rank order) with gradients flowing back to every rank."""
    return _AllGatherWithGrad.apply(t)
