"""How a process computes: its random streams, deterministic algorithms, and mixed precision.

The trainer sets these up once and the rest of the code reads none of them: the random
streams of every rank (:class:`RandomStreams`, saved and restored as a checkpoint component),
determinism (:func:`set_deterministic`), autocast (:func:`autocast`) and the fp16 loss scaler
(:class:`LossScaler`).
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssl_toolkit.checkpoint import capture_rng_state, restore_rng_state
from ssl_toolkit.distributed import gather_objects

__all__ = [
    "LossScaler",
    "PerRankMethodState",
    "RandomStreams",
    "augment_seed",
    "autocast",
    "seed_everything",
    "set_deterministic",
]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def set_deterministic(enabled: bool) -> None:
    """Deterministic algorithms where torch has them, or torch's defaults (process-wide).

    ``warn_only``: a few CUDA kernels have no deterministic version (the backward of
    ``AdaptiveAvgPool2d``, which every ResNet has, among them); torch warns on those instead of
    stopping the run, and they stay the one source of run-to-run differences on GPU.
    """
    if enabled:
        # cuBLAS needs a fixed workspace to be deterministic; set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (this process's own streams)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def augment_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s augmentation generator: a stream of its own."""
    return seed * 1_000_003 + rank + 1


class RandomStreams:
    """This rank's random streams: the global generators (Python, NumPy, torch: dropout and
    drop-path) and the augmentation generator, seeded per rank from one seed.

    As a checkpoint component, :meth:`state_dict` gathers every rank's streams (collective)
    and :meth:`load_state_dict` gives each rank its own back, so a resumed run continues bit
    for bit. A checkpoint of another number of processes has no streams for this one: they
    are left to the caller to :meth:`reseed`, and :attr:`saved_world_size` says how many
    processes wrote it.
    """

    def __init__(self, seed: int, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.augment_generator = torch.Generator()
        """The generator of this rank's augmentation (crops, jitter, blur draws)."""
        self.saved_world_size: int | None = None
        """The number of processes of the checkpoint last loaded (``None`` before any)."""
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Seed every stream of this rank from ``seed``: the global generators with
        ``seed + rank``, the augmentation with :func:`augment_seed`."""
        seed_everything(seed + self.rank)
        self.augment_generator.manual_seed(augment_seed(seed, self.rank))

    def state_dict(self) -> list[dict[str, Any]]:
        """Every rank's streams, in rank order (every rank must call it)."""
        own = {"augment_generator": self.augment_generator.get_state()}
        own["rng"] = capture_rng_state()
        return gather_objects(own)

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        """Take this rank's streams back when ``state`` has one per process of this run;
        otherwise leave them for :meth:`reseed`."""
        self.saved_world_size = len(state)
        if self.restored:
            self.augment_generator.set_state(state[self.rank]["augment_generator"])
            restore_rng_state(state[self.rank]["rng"])

    @property
    def restored(self) -> bool:
        """True when the last :meth:`load_state_dict` gave this rank its streams back."""
        return self.saved_world_size == self.world_size


class PerRankMethodState:
    """A checkpoint component: the method's :meth:`~ssl_toolkit.methods.Method.rank_state_dict`
    of every process (SwAV's queue, each rank's own), gathered like :class:`RandomStreams`.

    A checkpoint of another number of processes has none for this one: each process then
    starts without it (an empty state), as a fresh run would.
    """

    def __init__(self, method: Any, rank: int, world_size: int) -> None:
        self.method = method
        self.rank = rank
        self.world_size = world_size

    def state_dict(self) -> list[dict[str, Any]]:
        """Every rank's state, in rank order (every rank must call it)."""
        return gather_objects(self.method.rank_state_dict())

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        """Give this rank its own state back, or an empty one (another number of processes)."""
        own = state[self.rank] if len(state) == self.world_size else {}
        self.method.load_rank_state_dict(own)


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context of ``trainer.precision`` (``fp32``: a disabled one)."""
    return torch.autocast(
        device.type, dtype=_AMP_DTYPES.get(precision), enabled=precision != "fp32"
    )


class LossScaler(torch.amp.GradScaler):
    """torch's ``GradScaler`` that also says, without a host sync, whether a step was skipped.

    Enabled for fp16 only (``enabled``); disabled, it passes the loss and the step through.
    """

    def step_and_update(self, optimizer: torch.optim.Optimizer) -> Tensor | None:
        """``step(optimizer)`` then ``update()``; returns a boolean tensor on the device, True
        when an overflow made the step a skip (the scale went down), or ``None`` when
        disabled."""
        before = self._scale.clone() if self.is_enabled() and self._scale is not None else None
        self.step(optimizer)
        self.update()
        return None if before is None else self._scale < before
