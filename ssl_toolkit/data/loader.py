"""Batch iteration with an explicit random generator, sharding, and exact mid-epoch resume.

:class:`EpochBatchSampler` decides which indices form each batch: one permutation per epoch
drawn from a ``torch.Generator``, sliced by rank for distributed training. Its state (epoch,
position in the epoch, generator state at the start of the epoch) is enough to replay the rest
of an epoch. :class:`TensorBatchLoader` uses it to cut batches out of an in-memory uint8 tensor
with one indexing op, with no worker processes and no per-item Python work;
:class:`WorkerBatchLoader` decodes image folders in worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from ssl_toolkit.data.folders import BadImageError, DatasetNotFoundError, StaleIndexError
from ssl_toolkit.preemption import outlive_stop_signals


class EpochBatchSampler:
    """Yield batches of dataset indices (int64 tensors), one shuffled pass per epoch.

    Every rank must be given a generator in the same state (e.g. the same seed): all ranks then
    draw the same permutation and rank r takes positions r, r + world_size, ... of it. The
    permutation is first cut to a multiple of ``world_size`` so that ranks see equal counts;
    with ``world_size=1`` nothing is cut. ``drop_last`` drops the last incomplete batch.

    Iterating yields the rest of the current epoch, then moves to the next one; breaking out
    and iterating again continues where it stopped. ``state_dict()`` / ``load_state_dict()``
    save and restore (epoch, position, generator state) to resume exactly mid-epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, {world_size=}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self._epoch_start_state: Tensor | None = None
        self._indices: Tensor | None = None
        if len(self) == 0:
            raise ValueError(
                f"no complete batch: {self.shard_size} samples on this rank, {batch_size=}, "
                f"{drop_last=}"
            )

    @property
    def shard_size(self) -> int:
        """Number of samples this rank sees per epoch."""
        return self.num_samples // self.world_size

    def __len__(self) -> int:
        """Number of batches per epoch on this rank."""
        if self.drop_last:
            return self.shard_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        # Drawing the permutation first also advances a restored generator past this epoch.
        indices = self._epoch_indices()
        if self.position >= len(self):
            self._next_epoch()
            indices = self._epoch_indices()
        while self.position < len(self):
            start = self.position * self.batch_size
            self.position += 1
            yield indices[start : start + self.batch_size]
        self._next_epoch()

    def state_dict(self) -> dict[str, Any]:
        """Epoch, batches already yielded in it, the generator state at its start, and the
        batch size and world size those batches were counted in."""
        generator_state = (
            self._epoch_start_state if self._indices is not None else self.generator.get_state()
        )
        return {
            "epoch": self.epoch,
            "position": self.position,
            "generator": generator_state,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next iteration continues that epoch exactly.

        A state saved with another batch size or number of processes keeps the images seen
        in the epoch: the position becomes the whole batches of this sampler that hold no
        more images than were seen (states without those two keys count as this sampler's).
        """
        images = int(state["position"]) * int(state.get("batch_size", self.batch_size))
        images *= int(state.get("world_size", self.world_size))
        self.epoch = int(state["epoch"])
        self.position = images // (self.batch_size * self.world_size)
        self.generator.set_state(state["generator"])
        self._epoch_start_state = None
        self._indices = None

    def seek(self, position: int) -> None:
        """Continue the current epoch from batch ``position`` (after a resume that rescaled
        the position, to start on a whole optimizer step)."""
        if not 0 <= position <= len(self):
            raise ValueError(f"position must be in [0, {len(self)}], got {position}")
        self.position = position

    def _epoch_indices(self) -> Tensor:
        if self._indices is None:
            self._epoch_start_state = self.generator.get_state()
            if self.shuffle:
                order = torch.randperm(
                    self.num_samples, generator=self.generator, device=self.generator.device
                ).cpu()
            else:
                order = torch.arange(self.num_samples)
            total = self.shard_size * self.world_size
            self._indices = order[self.rank : total : self.world_size]
        return self._indices

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.position = 0
        self._indices = None


class ShardBatchSampler(EpochBatchSampler):
    """:class:`EpochBatchSampler` for samples stored in shards, read front to back by one reader
    each: ``groups`` holds the dataset indices of each shard.

    Every epoch draws an order of the shards from the seed and the epoch; rank r takes shards
    r, r + world_size, ... of it, and hands them to its ``readers`` (DataLoader workers) in
    turn, each reader's shards one after the other, every shard's samples in an order drawn
    from the seed, the epoch and the shard. Whole batches come from the readers in turn, so
    that while every reader has shards left, batch b of an epoch is read by worker
    b mod ``readers`` from its own shards; the samples left over at the end of each reader's
    shards (less than a batch each) come last. Every rank takes the
    same number of samples each epoch: as many as its fewest shards could hold (its share of
    the smallest ones), so that a few samples of the largest shards wait for another epoch.
    The order depends on nothing but (seed, epoch, rank, world size, readers, batch size),
    so the state of :class:`EpochBatchSampler` resumes it exactly.
    """

    def __init__(
        self,
        groups: list[np.ndarray],
        batch_size: int,
        *,
        drop_last: bool = True,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
        readers: int = 1,
    ) -> None:
        share = len(groups) // world_size
        if share == 0:
            raise DatasetNotFoundError(
                f"{len(groups)} shards for {world_size} processes: every process needs shards "
                "of its own; write smaller shards (scripts/make_shards.py --shard-size)"
            )
        self.groups = groups
        self.readers = max(1, readers)
        self._per_rank = sum(sorted(len(group) for group in groups)[:share])
        if drop_last and batch_size > self._per_rank:
            raise DatasetNotFoundError(
                f"data.batch_size: {batch_size} is more than the {self._per_rank} images a "
                f"process reads an epoch from its {share} shards (its share of the smallest); "
                "use a smaller batch or more, smaller shards (scripts/make_shards.py "
                "--shard-size)"
            )
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.seed = generator.initial_seed()
        super().__init__(
            sum(len(group) for group in groups),
            batch_size,
            shuffle=True,
            drop_last=drop_last,
            generator=generator,
            rank=rank,
            world_size=world_size,
        )

    @property
    def shard_size(self) -> int:
        """Number of samples this rank sees per epoch."""
        return self._per_rank

    def _draw(self, *keys: int) -> torch.Generator:
        seed = self.seed
        for key in keys:
            seed = (seed * 1_000_003 + key) % 2**63
        return torch.Generator().manual_seed(seed)

    def _stream(self, shards: list[int], epoch: int) -> np.ndarray:
        """The dataset indices one reader takes this epoch: its shards one after the other,
        each in an order drawn from (seed, epoch, shard)."""
        parts = [
            self.groups[shard][
                torch.randperm(len(self.groups[shard]), generator=self._draw(epoch, shard)).numpy()
            ]
            for shard in shards
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _epoch_indices(self) -> Tensor:
        if self._indices is None:
            self._epoch_start_state = self.generator.get_state()
            epoch = self.epoch
            order = torch.randperm(len(self.groups), generator=self._draw(epoch)).tolist()
            mine = order[self.rank :: self.world_size]
            streams = [self._stream(mine[r :: self.readers], epoch) for r in range(self.readers)]
            # Whole batches of each reader's stream in turn, then the streams' remainders.
            size = self.batch_size
            whole = [
                stream[: len(stream) - len(stream) % size].reshape(-1, size) for stream in streams
            ]
            turns = [w[t] for t in range(max(map(len, whole))) for w in whole if t < len(w)]
            tails = [stream[len(stream) - len(stream) % size :] for stream in streams]
            taken = np.concatenate([*turns, *tails])[: self._per_rank]
            self._indices = torch.from_numpy(taken.astype(np.int64))
        return self._indices


class TensorBatchLoader:
    """Iterate ``(images, labels)`` batches of an in-memory dataset by tensor indexing.

    ``dataset`` needs ``images`` (N, ...) and ``targets`` (N,) tensors, as the in-memory datasets
    of :func:`~ssl_toolkit.data.datasets.build_dataset` have; batches stay on the tensors'
    device and dtype (uint8 images), ready for batched augmentation. Order, sharding and
    resume follow :class:`EpochBatchSampler`; ``state_dict()`` / ``load_state_dict()``
    delegate to it.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dataset = dataset
        self.images: Tensor = dataset.images
        self.targets: Tensor = dataset.targets
        self.batch_sampler = EpochBatchSampler(
            self.images.shape[0],
            batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            generator=generator,
            rank=rank,
            world_size=world_size,
        )

    @property
    def epoch(self) -> int:
        """Index of the current epoch (starts at 0)."""
        return self.batch_sampler.epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch handed out so far."""
        return self.batch_sampler.position

    def seek(self, position: int) -> None:
        """See :meth:`EpochBatchSampler.seek`."""
        self.batch_sampler.seek(position)

    @property
    def skipped(self) -> list[str]:
        """Always empty: in-memory images were decoded when loaded (see
        :attr:`WorkerBatchLoader.skipped`)."""
        return []

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for index in self.batch_sampler:
            index = index.to(self.images.device)
            yield self.images.index_select(0, index), self.targets.index_select(0, index)

    def state_dict(self) -> dict[str, Any]:
        """See :meth:`EpochBatchSampler.state_dict`."""
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """See :meth:`EpochBatchSampler.load_state_dict`."""
        self.batch_sampler.load_state_dict(state)


class _EpochTagged:
    """The batch sampler a ``DataLoader`` pulls from: lists of indices, or of ``(index, epoch)``
    for datasets whose items depend on the epoch (fresh random crops each epoch, reproducible
    on resume). It records the sampler's state where each pass starts, before any batch of
    that pass reaches the consumer, however far the workers prefetch."""

    def __init__(self, sampler: EpochBatchSampler, tag: bool) -> None:
        self.sampler = sampler
        self.tag = tag
        self.pass_start: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[Any]]:
        for batch in self.sampler:
            if self.pass_start is None:  # the sampler has begun (or rolled into) its epoch
                state = self.sampler.state_dict()
                self.pass_start = {**state, "position": state["position"] - 1}
            indices = batch.tolist()
            yield [(i, self.sampler.epoch) for i in indices] if self.tag else indices


def _moved(item: Any, offset: int, length: int) -> Any:
    """The dataset index ``offset`` places after ``item``, wrapping around at ``length``; an
    ``(index, epoch)`` item keeps its epoch."""
    if isinstance(item, tuple):
        index, epoch = item
        return (index + offset) % length, epoch
    return (item + offset) % length


class _Decoding(Dataset):
    """The dataset as the workers read it: each item with the paths of the images skipped to
    get it, or, for an image that does not decode, the error for the main process to raise (one
    line naming the file, where a worker's own exception would come wrapped in its traceback).

    With ``skip_bad``, an image that does not decode gives its place to the next one that does
    (index + 1, + 2, ... wrapping around), so that every batch stays full and the same on a
    resume."""

    def __init__(self, dataset: Dataset, skip_bad: bool) -> None:
        self.dataset = dataset
        self.skip_bad = skip_bad
        self._bad: dict[int, BadImageError] = {}  # known in this worker: not decoded twice

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Any) -> tuple[Any, list[str]] | DatasetNotFoundError:
        skipped: list[str] = []
        first: BadImageError | None = None
        for offset in range(len(self)):
            moved = _moved(item, offset, len(self))
            index = moved[0] if isinstance(moved, tuple) else moved
            try:
                if index in self._bad:
                    raise self._bad[index]
                return self.dataset[moved], skipped
            except StaleIndexError as error:  # the listing's fault, not the image's: no skip
                return error
            except BadImageError as error:
                if not self.skip_bad:
                    return error
                self._bad[index] = error
                first = first or error
                skipped.append(str(error.path))
        return DatasetNotFoundError(
            f"data.skip_bad=true, but none of the {len(self)} images decodes ({first.path}: "
            f"{first.reason})"
        )


def _collate(results: list[Any]) -> tuple[Any, list[str]] | DatasetNotFoundError:
    """A batch and the paths skipped to fill it, or the first error among its items."""
    for result in results:
        if isinstance(result, DatasetNotFoundError):
            return result
    items, skipped = zip(*results, strict=True)
    return default_collate(list(items)), [path for paths in skipped for path in paths]


class WorkerBatchLoader:
    """Batches decoded in ``DataLoader`` worker processes, resumable at any batch.

    Order, sharding and epochs follow :class:`EpochBatchSampler`. The sampler runs ahead of
    the consumer by the batches the workers prefetch, so the state saved is not the sampler's
    but the batches actually handed out: ``state_dict()`` gives the epoch, the batches
    consumed in it and the generator state at its start. Datasets with ``takes_epoch = True``
    are indexed by ``(index, epoch)``.

    An image that does not decode stops the iteration with its
    :class:`~ssl_toolkit.data.folders.BadImageError`, raised in the main process. With
    ``skip_bad``, the next image that decodes takes its place instead (index + 1, + 2, ...,
    wrapping around: batches stay full and a resume sees the same ones), and
    :attr:`skipped` lists it.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        skip_bad: bool = False,
    ) -> None:
        self.dataset = dataset
        groups = getattr(getattr(dataset, "files", None), "groups", None)
        common = {"drop_last": drop_last, "generator": generator}
        common |= {"rank": rank, "world_size": world_size}
        if shuffle and groups is not None:  # shards: each read by one reader
            self.batch_sampler: EpochBatchSampler = ShardBatchSampler(
                groups(), batch_size, readers=num_workers, **common
            )
        else:
            self.batch_sampler = EpochBatchSampler(
                len(dataset), batch_size, shuffle=shuffle, **common
            )
        self._batches = _EpochTagged(self.batch_sampler, getattr(dataset, "takes_epoch", False))
        # A DataLoader draws its workers' base seed when it starts them (each epoch, without
        # workers) from the generator it is given, else from torch's global one: that draw
        # would come after a resume restores the global state, and every draw of the model
        # (dropout, drop path) would be one off from then on.
        seed = (self.batch_sampler.generator.initial_seed() + rank) % 2**63
        seeds = torch.Generator().manual_seed(seed)
        self._loader = DataLoader(
            _Decoding(dataset, skip_bad),
            batch_sampler=self._batches,
            num_workers=num_workers,
            collate_fn=_collate,
            persistent_workers=num_workers > 0,
            worker_init_fn=outlive_stop_signals,
            generator=seeds,
        )
        self._epoch_state = self.batch_sampler.state_dict()
        self._consumed = 0
        self._skipped: dict[str, None] = {}  # insertion-ordered, each path once

    @property
    def epoch(self) -> int:
        """Index of the current epoch (starts at 0): that of the batches handed out, not of
        the sampler, which runs ahead by the batches the workers prefetch."""
        return self._epoch_state["epoch"]

    @property
    def skipped(self) -> list[str]:
        """The images skipped so far because they do not decode (``skip_bad``), each once, in
        the order they were met; those of this process's shard only."""
        return list(self._skipped)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Any]:
        self._epoch_state, self._consumed = self.batch_sampler.state_dict(), 0
        self._batches.pass_start = None
        for result in self._loader:
            if isinstance(result, DatasetNotFoundError):
                raise result
            batch, skipped = result
            self._skipped.update(dict.fromkeys(skipped))
            if self._consumed == 0 and self._batches.pass_start is not None:
                self._epoch_state = self._batches.pass_start
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Epoch, batches handed out in it, and the generator state at its start."""
        return {**self._epoch_state, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (see :meth:`EpochBatchSampler.load_state_dict`); the
        next iteration continues that epoch exactly."""
        self.batch_sampler.load_state_dict(state)
        self._epoch_state = self.batch_sampler.state_dict()
        self._consumed = 0

    @property
    def position(self) -> int:
        """Batches of the current epoch handed out so far."""
        return self._epoch_state["position"] + self._consumed

    def seek(self, position: int) -> None:
        """See :meth:`EpochBatchSampler.seek`."""
        self.batch_sampler.seek(position)
        self._epoch_state = self.batch_sampler.state_dict()
        self._consumed = 0


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    drop_last: bool = True,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    skip_bad: bool = False,
) -> TensorBatchLoader | WorkerBatchLoader:
    """Pick the batch iterator for a dataset from :func:`build_dataset`.

    In-memory datasets get a :class:`TensorBatchLoader`. Others (image folders) get a
    :class:`WorkerBatchLoader` that decodes in ``num_workers`` processes and, with
    ``skip_bad``, puts the next good image in the place of one that does not decode. Both
    resume exactly at any batch, and both list the images skipped in ``skipped``.
    """
    kwargs = {"shuffle": shuffle, "drop_last": drop_last, "generator": generator}
    kwargs |= {"rank": rank, "world_size": world_size}
    if hasattr(dataset, "images") and hasattr(dataset, "targets"):
        return TensorBatchLoader(dataset, batch_size, **kwargs)
    return WorkerBatchLoader(
        dataset, batch_size, num_workers=num_workers, skip_bad=skip_bad, **kwargs
    )
