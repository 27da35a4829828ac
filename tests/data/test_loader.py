"""TensorBatchLoader / EpochBatchSampler / WorkerBatchLoader: coverage per epoch, sharding, exact
resume, no draw of the global generator."""

import io
import itertools

import pytest
import torch

from ssl_toolkit.data import (
    EpochBatchSampler,
    InMemoryImageDataset,
    TensorBatchLoader,
    WorkerBatchLoader,
)


def _indexed_dataset(n: int) -> InMemoryImageDataset:
    """Image i is filled with i % 256 and labelled i, so batches reveal their indices."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4)
    return InMemoryImageDataset(images.contiguous(), torch.arange(n))


def _loader(n=103, batch_size=10, seed=0, **kwargs) -> TensorBatchLoader:
    generator = torch.Generator().manual_seed(seed)
    return TensorBatchLoader(_indexed_dataset(n), batch_size, generator=generator, **kwargs)


def _epoch(loader) -> list[list[int]]:
    return [labels.tolist() for _, labels in loader]


def _flat(batches: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(batches))


def test_each_index_once_per_epoch_without_drop_last():
    loader = _loader(drop_last=False)
    assert len(loader) == 11
    for _ in range(3):
        batches = _epoch(loader)
        assert len(batches) == 11
        assert [len(b) for b in batches] == [10] * 10 + [3]
        assert sorted(_flat(batches)) == list(range(103))
    assert loader.epoch == 3


def test_batches_are_uint8_and_match_labels():
    images, labels = next(iter(_loader()))
    assert images.dtype == torch.uint8
    assert images.shape == (10, 3, 4, 4)
    assert torch.equal(images[:, 0, 0, 0].long(), labels % 256)


def test_drop_last_and_reshuffling():
    loader = _loader(drop_last=True)
    assert len(loader) == 10
    first, second = _flat(_epoch(loader)), _flat(_epoch(loader))
    assert len(first) == len(set(first)) == 100
    assert len(second) == len(set(second)) == 100
    assert first != second


def test_no_shuffle_keeps_order():
    assert _flat(_epoch(_loader(shuffle=False, drop_last=False))) == list(range(103))


def test_same_seed_same_order_different_seed_different_order():
    assert _epoch(_loader(seed=1)) == _epoch(_loader(seed=1))
    assert _epoch(_loader(seed=1)) != _epoch(_loader(seed=2))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_shards_are_disjoint_and_cover_the_dataset(world_size):
    n = 100
    shards = []
    for rank in range(world_size):
        loader = _loader(n, batch_size=5, rank=rank, world_size=world_size, drop_last=False)
        shards.append(set(_flat(_epoch(loader))))
        assert len(shards[-1]) == n // world_size
    union = set().union(*shards)
    assert sum(len(s) for s in shards) == len(union) == (n // world_size) * world_size


def test_shards_reshuffle_every_epoch_consistently():
    loaders = [_loader(64, batch_size=8, rank=r, world_size=2) for r in range(2)]
    for _ in range(2):
        epoch = [set(_flat(_epoch(loader))) for loader in loaders]
        assert epoch[0].isdisjoint(epoch[1])
        assert len(epoch[0] | epoch[1]) == 64


def _state_roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("consumed", [0, 3, 9])
def test_resume_mid_epoch_yields_the_same_remaining_batches(consumed):
    loader = _loader()
    _epoch(loader)  # finish epoch 0 so the generator has moved on
    iterator = iter(loader)
    for _ in range(consumed):
        next(iterator)
    state = _state_roundtrip(loader.state_dict())
    assert state["epoch"] == 1
    assert state["position"] == consumed
    expected = [labels.tolist() for _, labels in iterator] + _epoch(loader)

    resumed = _loader(seed=123)  # a different seed: the state must override it
    resumed.load_state_dict(state)
    assert [labels.tolist() for _, labels in resumed] + _epoch(resumed) == expected
    assert resumed.epoch == loader.epoch


def test_resume_from_state_saved_after_the_last_batch():
    loader = _loader()
    iterator = iter(loader)
    for _ in range(len(loader)):
        next(iterator)
    state = loader.state_dict()
    assert state["position"] == len(loader)
    expected = _epoch(loader)

    resumed = _loader(seed=7)
    resumed.load_state_dict(state)
    assert _epoch(resumed) == expected
    assert resumed.epoch == 2


def test_a_state_of_other_batches_keeps_the_images_seen():
    """Saved by 2 processes of 10 images after 3 batches (60 images of the epoch): a loader of
    one process and batch 25 continues after 2 whole batches (50 images), in that epoch;
    ``seek`` moves within it."""
    saved = _loader(batch_size=10, world_size=2)
    iterator = iter(saved)
    for _ in range(3):
        next(iterator)
    state = saved.state_dict()
    assert (state["batch_size"], state["world_size"], state["position"]) == (10, 2, 3)
    resumed = _loader(batch_size=25, seed=5)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (0, 2)
    order = _flat(_epoch(_loader(batch_size=25)))
    assert _flat(_epoch(resumed)) == order[50:100]  # the same permutation, from image 50
    resumed.seek(1)
    assert resumed.position == 1
    with pytest.raises(ValueError, match="position must be in"):
        resumed.seek(len(resumed) + 1)


def test_breaking_out_and_iterating_again_continues_the_epoch():
    reference = _epoch(_loader())
    loader = _loader()
    head = []
    for _, labels in loader:
        head.append(labels.tolist())
        if len(head) == 4:
            break
    assert head + _epoch(loader) == reference


def test_sampler_validates_arguments():
    with pytest.raises(ValueError, match="no complete batch"):
        EpochBatchSampler(10, 20, drop_last=True)
    with pytest.raises(ValueError, match="rank"):
        EpochBatchSampler(10, 2, rank=2, world_size=2)
    assert len(EpochBatchSampler(10, 20, drop_last=False)) == 1


class _Numbers(torch.utils.data.Dataset):
    """Item i is the tensor [i]: a dataset for worker loaders that needs no files."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([index])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_worker_loader_takes_no_draw_of_the_global_generator(num_workers):
    """Starting the DataLoader's iterator (once with workers, every epoch without) draws its
    workers' base seed: from a generator of its own, so that a model drawing from the global
    one (dropout, drop path) sees the same draws whether the run was resumed or not."""
    loader = WorkerBatchLoader(
        _Numbers(), 4, generator=torch.Generator().manual_seed(0), num_workers=num_workers
    )
    torch.manual_seed(0)
    before = torch.get_rng_state()
    batches = [batch.flatten().tolist() for _ in range(2) for batch in loader]
    assert sorted(_flat(batches[:3])) == sorted(_flat(batches[3:])) == list(range(12))
    assert torch.equal(torch.get_rng_state(), before)
