"""Stopping cleanly when the cluster or the user asks: SIGTERM (SLURM, Kubernetes) and SIGINT.

:class:`PreemptionGuard` replaces the two signal handlers while training runs: a signal only
records that a stop was asked for. The trainer asks :meth:`PreemptionGuard.requested` after
each step, finishes that step, saves a checkpoint at it and raises :class:`Preempted`; the
command line then exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), and
``--resume auto`` continues exactly. Across processes, ranks agree on the step to stop at
through one all-reduce of a CPU tensor per step over a gloo group: no device sync.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["STOP_SIGNALS", "Preempted", "PreemptionGuard", "outlive_stop_signals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""The signals that stop training after the step in flight."""


def outlive_stop_signals(worker_id: int = 0) -> None:
    """A ``DataLoader`` ``worker_init_fn``: decoding workers outlive the stop signals.

    Ctrl-C and SLURM signal every process of the group. A worker that died of it would make
    the loader raise in the main process, mid-step or at its next batch, before that process
    could save. So a worker ignores SIGINT, and SIGTERM from anyone but its parent (whose
    ``terminate()`` at exit must still end it): the main process decides when to stop.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from_parent, daemon=True).start()


def _exit_on_sigterm_from_parent() -> None:
    """Wait for SIGTERMs; the parent's ends the worker, anyone else's is dropped."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == os.getppid():
            os._exit(0)


class Preempted(Exception):
    """Training stopped on a signal after ``step``; the checkpoint at ``path`` continues it."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        self.signum = signum
        self.step = step
        self.path = path
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint saved to {path}; "
            "continue with --resume auto"
        )

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class PreemptionGuard:
    """A context manager that turns SIGTERM and SIGINT into a request to stop.

    Outside the main thread (where Python cannot install handlers) it does nothing. With
    ``distributed``, :meth:`requested` agrees across ranks (an all-reduce over a gloo group
    made at construction, which every rank must reach).
    """

    def __init__(self, distributed: bool = False) -> None:
        self._signum = 0
        self._previous: dict[int, Any] = {}
        self._group = dist.new_group(backend="gloo") if distributed else None

    def __enter__(self) -> PreemptionGuard:
        self._signum = 0  # a signal from an earlier ``fit`` was handled there
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._signum = self._signum or signum

    def requested(self) -> int:
        """The signal number that asked for a stop (the same on every rank), or 0."""
        if self._group is None:
            return self._signum
        flag = torch.tensor([self._signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())
