"""How a method is spread over processes: replicated (DDP) or sharded (FSDP2).

:func:`parallelize` wraps the method for ``trainer.strategy``; :func:`gradient_sync` skips the
gradient exchange on accumulation micro-batches; :class:`ModelState` and
:class:`OptimizerState`, the checkpoint components of the model and its optimizer, move their
state through ``torch.distributed.checkpoint``'s state-dict API as full, unsharded tensors
keyed by parameter name, so a checkpoint of either strategy (or of a single process) resumes
under the other.
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
    "ModelState",
    "OptimizerState",
    "Strategy",
    "full_model_state",
    "gradient_sync",
    "parallelize",
    "shard_units",
]

Strategy = Literal["ddp", "fsdp2"]
"""``ddp``: every rank holds the whole model; ``fsdp2``: parameters are sharded over ranks."""

# ResNet stages (torchvision and timm), timm ViT blocks and timm stages.
_BLOCK_NAME = re.compile(r"(^|\.)(layer\d+|blocks\.\d+|stages\.\d+)$")
# Sub-networks a method calls on their own (``features`` calls the backbone alone).
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
    """The module to call for the embeddings: the method itself, DDP around it, or the method
    sharded in place by FSDP2 (``fully_shard`` per unit of :func:`shard_units`).

    Calling it runs the method's ``forward``, which is its ``embed``; under FSDP2 ``embed``
    itself is registered as a forward method too, so calling it directly also gathers the
    root's parameters.
    """
    if not ctx.is_distributed:
        return method
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for name in shard_units(method):
            fully_shard(method.get_submodule(name))
        register_fsdp_forward_method(method, "embed")
        return method
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(method, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """With ``enabled=False``, the forward and backward passes inside keep gradients local
    (accumulation micro-batches). ``model`` is what :func:`parallelize` returned, compiled or
    not (``torch.compile``'s wrapper passes these methods through); the backward must run
    inside the block, since FSDP2 reads the setting after it."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
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
# Parameters frozen so far (`optim.freeze`) have no optimizer state yet, which is right.
_LOAD_WITH_FROZEN = StateDictOptions(full_state_dict=True, strict=False)


def full_model_state(method: nn.Module) -> dict[str, Any]:
    """The full state of ``method`` (or of one of its submodules) keyed by parameter name,
    on the CPU. Every rank must call it (sharded parameters are gathered); in a multi-process
    run the main rank gets the tensors and the others an empty dict."""
    return get_model_state_dict(method, options=_SAVE)


class ModelState:
    """The method's weights and buffers as a checkpoint component: full tensors keyed by
    parameter name (collective, like :func:`full_model_state`); loading shards them again."""

    def __init__(self, method: nn.Module) -> None:
        self.method = method

    def state_dict(self) -> dict[str, Any]:
        """See :func:`full_model_state`."""
        return full_model_state(self.method)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a full state on every rank (each keeps its shard)."""
        set_model_state_dict(self.method, state, options=_LOAD)


class OptimizerState:
    """The optimizer's state as a checkpoint component, keyed by parameter name and full
    (collective); load it after the :class:`ModelState` of the same method."""

    def __init__(self, method: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.method = method
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        """The full optimizer state on the CPU (the main rank's; others get empty dicts)."""
        return get_optimizer_state_dict(self.method, self.optimizer, options=_SAVE)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a full optimizer state on every rank (each keeps its shard).

        With frozen param groups, parameters without state are expected: they had not
        stepped when it was saved. torch's loader first steps the fresh optimizer (lr 0, zero
        gradients) to create its state, and a still-frozen group would skip that step: the
        loader then loses the paths of those parameters' saved scalar entries (AdamW's
        ``step``). So the groups are unfrozen for it (the saved groups bring their counts
        back), and the parameters the checkpoint has no state for lose the placeholder."""
        frozen = any("frozen_steps" in group for group in self.optimizer.param_groups)
        if not frozen:
            set_optimizer_state_dict(self.method, self.optimizer, state, options=_LOAD)
            return
        for group in self.optimizer.param_groups:
            group["frozen_steps"] = 0
        set_optimizer_state_dict(self.method, self.optimizer, state, options=_LOAD_WITH_FROZEN)
        for name, param in self.method.named_parameters():
            if name not in state["state"]:
                self.optimizer.state.pop(param, None)
