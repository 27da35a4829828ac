"""One optimizer step's forward and backward over its micro-batches, exact or independent.

Exact accumulation is the cached-gradient technique of Gao et al. 2021 ("Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup", arXiv:2101.06983; see
``docs/design.md``). A method's loss couples the samples of its batch (negatives, a
cross-correlation), so the loss of a step is taken once, over the embeddings of all its
micro-batches:

1. every micro-batch is embedded without autograd, keeping only its embeddings;
2. the loss of the joined embeddings is computed and differentiated with respect to them;
3. every micro-batch is embedded again, with autograd, and its slice of those embedding
   gradients is back-propagated; gradients are exchanged between processes on the last one.

Pass 2 computes exactly what pass 1 did: each micro-batch's random state (dropout,
drop-path) is replayed, and the buffers that a forward updates (batch-norm running
statistics) are put back after it, so they move once per micro-batch. Batch-norm
*statistics* stay those of each micro-batch. The cost is one more forward pass per step; the
memory is the step's views and embeddings, never its activations. Everything learnable must
be in :meth:`~ssl_toolkit.methods.Method.embed`: the loss is differentiated with respect to
the embeddings only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ssl_toolkit.methods import Embeddings, Method, at_least_fp32
from ssl_toolkit.parallel import gradient_sync

__all__ = ["Accumulation", "accumulate"]

Accumulation = Literal["exact", "independent"]
"""``exact``: one loss over all micro-batches of a step; ``independent``: one per micro-batch."""


def accumulate(
    method: Method,
    micro_batches: Sequence[Sequence[Tensor]],
    *,
    exact: bool = True,
    model: nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> Tensor:
    """Forward and backward of one optimizer step; returns its loss (detached, in at least
    fp32).

    ``micro_batches`` is a list of micro-batches, each a list of views (batches of the same
    images). Gradients are added to the parameters' ``.grad``; the optimizer step is the
    caller's.

    - ``exact=True``: the loss is :meth:`Method.training_loss` of the embeddings of every
      micro-batch joined (and, inside the loss, of every process), so the step's gradients
      are those of one batch of all of them, except that batch-norm statistics are per
      micro-batch. Returns that loss. A single micro-batch takes one pass, as below.
    - ``exact=False``: each micro-batch has its own loss, divided by their number; the
      gradients are the mean of the micro-batches' ones. Returns the mean of their losses.

    ``model`` is what is called for the embeddings: ``method`` as
    :func:`~ssl_toolkit.parallel.parallelize` wrapped it and/or ``torch.compile`` compiled it
    (default ``method``). ``scaler`` scales the loss before the backward (fp16);
    ``autocast`` is entered around every forward and the loss.
    """
    if not micro_batches:
        raise ValueError("accumulate needs at least one micro-batch")
    model = model if model is not None else method
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    scale: Callable[[Tensor], Tensor] = scaler.scale if scaler is not None else _identity
    if exact and len(micro_batches) > 1:  # one micro-batch is its own joined batch
        return _exact(method, model, micro_batches, scale, autocast)
    count, losses = len(micro_batches), []
    for index, views in enumerate(micro_batches):
        with gradient_sync(model, enabled=index == count - 1):
            with autocast:
                loss = method.training_loss(model(views)) / count
            scale(loss).backward()
        losses.append(at_least_fp32(loss.detach()))
    return torch.stack(losses).sum()


def _exact(
    method: Method,
    model: nn.Module,
    micro_batches: Sequence[Sequence[Tensor]],
    scale: Callable[[Tensor], Tensor],
    autocast: contextlib.AbstractContextManager[Any],
) -> Tensor:
    devices = _cuda_devices(micro_batches[0])
    random_states, cached = [], []
    with torch.no_grad():
        for views in micro_batches:
            random_states.append(_random_state(devices))
            with autocast:
                cached.append(model(views))
    joined = _map(lambda *parts: torch.cat(parts).requires_grad_(), *cached)
    leaves = _leaves(joined)
    with autocast:
        loss = method.training_loss(joined)
    grads = torch.autograd.grad(scale(loss), leaves, allow_unused=True)
    after = _random_state(devices)  # the streams continue from here, as after one pass

    # Each micro-batch's rows of each embedding: its own offsets, from pass 1's shapes.
    rows = [[leaf.shape[0] for leaf in _leaves(part)] for part in cached]
    starts = [0] * len(leaves)
    last = len(micro_batches) - 1
    with _buffers_kept(method):
        for index, views in enumerate(micro_batches):
            _set_random_state(random_states[index], devices)
            with gradient_sync(model, enabled=index == last):
                with autocast:
                    outputs = _leaves(model(views))
                pairs = [
                    (output, grad[start : start + count])
                    for output, grad, start, count in zip(
                        outputs, grads, starts, rows[index], strict=True
                    )
                    if grad is not None and output.requires_grad
                ]
                if pairs:
                    torch.autograd.backward(*zip(*pairs, strict=True))
            starts = [start + count for start, count in zip(starts, rows[index], strict=True)]
    _set_random_state(after, devices)
    return at_least_fp32(loss.detach())


def _identity(t: Tensor) -> Tensor:
    return t


def _map(fn: Callable[..., Tensor], *trees: Embeddings) -> Embeddings:
    """``fn`` applied leaf by leaf to embeddings of the same structure."""
    first = trees[0]
    if isinstance(first, Tensor):
        return fn(*trees)
    if isinstance(first, dict):
        return {key: _map(fn, *(tree[key] for tree in trees)) for key in first}
    if isinstance(first, tuple | list):
        return tuple(_map(fn, *parts) for parts in zip(*trees, strict=True))
    raise TypeError(
        f"embeddings must be tensors, or dicts / tuples of them, got {type(first).__name__}"
    )


def _leaves(tree: Embeddings) -> list[Tensor]:
    """The tensors of embeddings, in a fixed order (that of :func:`_map`)."""
    if isinstance(tree, Tensor):
        return [tree]
    parts = tree.values() if isinstance(tree, dict) else tree
    return [leaf for part in parts for leaf in _leaves(part)]


def _cuda_devices(views: Sequence[Tensor]) -> list[torch.device]:
    """The CUDA devices a micro-batch runs on, whose random generators dropout draws from."""
    return sorted({v.device for v in views if v.device.type == "cuda"}, key=str)


def _random_state(cuda: list[torch.device]) -> tuple[Tensor, list[Tensor]]:
    """The CPU generator's state and that of each CUDA device in ``cuda``."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(device) for device in cuda]


def _set_random_state(state: tuple[Tensor, list[Tensor]], cuda: list[torch.device]) -> None:
    cpu, per_device = state
    torch.set_rng_state(cpu)
    for device, device_state in zip(cuda, per_device, strict=True):
        torch.cuda.set_rng_state(device_state, device)


@contextlib.contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    """Put every buffer of ``module`` back as it was on entry (batch-norm running statistics
    and their counters, which the replayed forward passes would update a second time)."""
    buffers = list(module.buffers())
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)
