"""Noticing divergence without slowing training down.

Each step records, on the device, whether its loss was finite and, with fp16, whether the
GradScaler skipped it (an overflow lowers the scale). Nothing is read on the host until a
check: at logging steps and before every checkpoint, so that a checkpoint never holds a
diverged state. A non-finite loss in fp32 or bf16 stops training; fp16 keeps skipping
overflowing steps, as its scaler is meant to, and stops after ``max_skipped_steps`` skips in
a row.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ssl_toolkit.distributed import world_size

__all__ = ["Diverged", "TrainingHealth"]

_NONE = 2**62  # "no non-finite step yet"


class Diverged(RuntimeError):
    """Training stopped because it diverged; the message names the step."""


class TrainingHealth:
    """Device-side records of non-finite losses and skipped fp16 steps, checked on demand."""

    def __init__(self, device: torch.device, *, fp16: bool, max_skipped_steps: int) -> None:
        self.fp16 = fp16
        self.max_skipped_steps = max_skipped_steps
        self._first_nonfinite = torch.full((), _NONE, dtype=torch.int64, device=device)
        self._skipped_in_a_row = torch.zeros((), dtype=torch.int64, device=device)
        # The longest run since training began, so a run that ends between checks is seen.
        self._longest_run = torch.zeros((), dtype=torch.int64, device=device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._last_step = 0
        self._checked_step = -1

    def record(self, step: int, loss: Tensor, skipped: Tensor | None = None) -> None:
        """Note step ``step``'s loss and, with fp16, whether the scaler skipped it."""
        self._last_step = step
        if self.fp16:
            if skipped is not None:
                skipped = skipped.to(torch.int64)
                self._skipped = self._skipped + skipped
                self._skipped_in_a_row = (self._skipped_in_a_row + skipped) * skipped
                self._longest_run = torch.maximum(self._longest_run, self._skipped_in_a_row)
            return
        step_if_bad = torch.where(torch.isfinite(loss), _NONE, step)
        self._first_nonfinite = torch.minimum(self._first_nonfinite, step_if_bad)

    @property
    def skipped_steps(self) -> Tensor:
        """fp16 steps the scaler has skipped so far (a 0-d tensor, for the log)."""
        return self._skipped

    def check(self) -> None:
        """Raise :class:`Diverged` if training has diverged (a host sync; every rank must
        call it, and all of them raise or none). A second check with no step recorded in
        between costs nothing."""
        if self._checked_step == self._last_step:
            return
        self._checked_step = self._last_step
        if self.fp16:  # the scaler skips non-finite steps: only their runs matter
            run = self._reduced(self._longest_run, dist.ReduceOp.MAX)
            if run >= self.max_skipped_steps:
                raise Diverged(
                    f"fp16: {run} steps in a row skipped on overflow by step "
                    f"{self._last_step} (trainer.max_skipped_steps={self.max_skipped_steps})"
                )
            return
        first = self._reduced(self._first_nonfinite, dist.ReduceOp.MIN)
        if first != _NONE:
            raise Diverged(f"the loss became non-finite at step {first}")

    @staticmethod
    def _reduced(value: Tensor, op: dist.ReduceOp) -> int:
        """``value`` reduced over ranks with ``op``, read on the host."""
        value = value.clone()
        if world_size() > 1:
            dist.all_reduce(value, op=op)
        return int(value)
