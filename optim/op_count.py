"""Count aten ops, host syncs and peak tensor memory of a callable, deterministically, on CPU.

Wall-clock time on a shared machine is noisy; the number of aten ops an optimizer step
dispatches and the number of device-to-host reads it makes are not, nor are the bytes of the
tensors a computation holds at once. A host sync is any op whose
result Python must see: reading a value (``item``, ``tolist``), the truth value of a tensor (a
Python ``if`` on it), or an op with a data-dependent output shape.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["OpCount", "count_ops", "peak_bytes"]

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


class _LiveBytes(TorchDispatchMode):
    """Tracks the storages that ops allocate while they are referenced by a live tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors]
        self.now = 0
        self.peak = 0

    def _release(self, address: int) -> None:
        entry = self.live[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if _is_tensor(t)
        }
        for tensor in filter(_is_tensor, tree_leaves(out)):
            storage = tensor.untyped_storage()
            address = storage.data_ptr()
            if storage.nbytes() == 0 or (address in given and address not in self.live):
                continue  # nothing allocated, or written in place into a tensor from outside
            entry = self.live.setdefault(address, [storage.nbytes(), 0])
            if entry[1] == 0:
                self.now += entry[0]
                self.peak = max(self.peak, self.now)
            entry[1] += 1
            weakref.finalize(tensor, self._release, address)
        return out


def _is_tensor(value: Any) -> bool:
    return isinstance(value, Tensor)


def peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` once: its result, and the most bytes that tensors it allocated (views
    counted once) held at one time. Tensors given to ``fn`` from outside do not count."""
    tracker = _LiveBytes()
    with tracker:
        result = fn()
    return result, tracker.peak
