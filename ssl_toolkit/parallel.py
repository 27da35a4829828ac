"""How a method is spread over processes: replicated (DDP) or sharded (FSDP2).

:func:`parallelize` wraps the method for ``trainer.strategy``; :func:`gradient_sync` skips the
gradient exchange on accumulation micro-batches; :func:`full_state` and :func:`load_full_state`
move model and optimizer state through ``torch.distributed.checkpoint``'s state-dict API as
full, unsharded tensors keyed by parameter name, so a checkpoint of either strategy (or of a
single process) resumes under the other.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ssl_toolkit.distributed import DistContext

__all__ = [
    "Strategy",
    "full_model_state",
    "full_state",
    "gradient_sync",
    "load_full_state",
    "parallelize",
    "shard_units",
]

Strategy = Literal["ddp", "fsdp2"]
"""``ddp``: every rank holds the whole model; ``fsdp2``: parameters are sharded over ranks."""

# ResNet stages (torchvision and timm), timm ViT blocks and timm stages.
_BLOCK_NAME = re.compile(r"(^|\.)(layer\d+|blocks\.\d+|stages\.\d+)$")
# Sub-networks a method calls on their own (``embed`` calls the backbone alone).
_NETWORK_NAME = re.compile(r"(^|\.)(backbone|projector|predictor)$")


def shard_units(method: nn.Module) -> list[str]:
    """Names of the modules FSDP2 shards as units, innermost first; the root (``""``) is last.

    Each block (ResNet stage, ViT block, timm stage and the blocks inside it) is a unit, and
    so is each network (``backbone``, ``projector``, ``predictor``, also inside a target
    copy). ``fully_shard`` must reach a module before any module that contains it.
    """
    names = [
        name
        for name, _ in method.named_modules()
        if name and (_BLOCK_NAME.search(name) or _NETWORK_NAME.search(name))
    ]
    return [*sorted(names, key=lambda name: -name.count(".")), ""]


def parallelize(method: nn.Module, ctx: DistContext, strategy: Strategy) -> nn.Module:
    """The module to call for the loss: the method itself, DDP around it, or the method
    sharded in place by FSDP2 (``fully_shard`` per unit of :func:`shard_units`)."""
    if not ctx.is_distributed:
        return method
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for name in shard_units(method):
            fully_shard(method.get_submodule(name))
        return method
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(method, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """With ``enabled=False``, the forward and backward passes inside keep gradients local
    (accumulation micro-batches). ``model`` is what :func:`parallelize` returned; the
    backward must run inside the block, since FSDP2 reads the setting after it."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)
_LOAD = StateDictOptions(full_state_dict=True)


def full_model_state(method: nn.Module) -> dict[str, Any]:
    """The full state of ``method`` (or of one of its submodules) keyed by parameter name,
    on the CPU; collective like
    :func:`full_state` (the main rank gets the tensors)."""
    return get_model_state_dict(method, options=_SAVE)


def full_state(method: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full model and optimizer state, keyed by parameter name, on the CPU.

    Every rank must call it (sharded parameters are gathered); in a multi-process run the
    main rank gets the tensors and the others empty dicts.
    """
    return {
        "model": full_model_state(method),
        "optimizer": get_optimizer_state_dict(method, optimizer, options=_SAVE),
    }


def load_full_state(
    method: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load :func:`full_state` output on every rank (each shards what it holds)."""
    set_model_state_dict(method, state["model"], options=_LOAD)
    set_optimizer_state_dict(method, optimizer, state["optimizer"], options=_LOAD)
