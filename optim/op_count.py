"""Count aten ops and host syncs of a callable, deterministically and on CPU.

Wall-clock time on a shared machine is noisy; the number of aten ops an optimizer step
dispatches and the number of device-to-host reads it makes are not. A host sync is any op whose
result Python must see: reading a value (``item``, ``tolist``), the truth value of a tensor (a
Python ``if`` on it), or an op with a data-dependent output shape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCount", "count_ops"]

_SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense.default",
        "aten.is_nonzero.default",
        "aten.equal.default",
        "aten.nonzero.default",
        "aten.masked_select.default",
        "aten.unique.default",
        "aten._unique2.default",
        "aten.allclose.default",
    }
)


@dataclass(frozen=True)
class OpCount:
    """Aten ops dispatched and host syncs made by one call."""

    ops: int
    syncs: int
    by_op: dict[str, int]


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not name.startswith("profiler."):  # Optimizer.step's record_function markers
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> OpCount:
    """Run ``fn()`` once and count the aten ops and host syncs it dispatched."""
    recorder = _Recorder()
    with recorder:
        fn()
    syncs = sum(n for op, n in recorder.calls.items() if op in _SYNC_OPS)
    return OpCount(ops=sum(recorder.calls.values()), syncs=syncs, by_op=dict(recorder.calls))
