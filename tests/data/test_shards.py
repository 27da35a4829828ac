"""Tar shards: written from a folder, read back image for image, each shard read by one rank
and one worker, resumed exactly, and broken shards named."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.make_shards import main as make_shards
from ssl_toolkit.cli import main
from ssl_toolkit.data import BadImageError, CropViews, DatasetNotFoundError, build_dataset
from ssl_toolkit.data.indexes import cache_dir
from ssl_toolkit.data.loader import ShardBatchSampler, WorkerBatchLoader
from ssl_toolkit.data.shards import SHARD_INDEX, find_shards
from tests.data.test_folders import _class_folders, unlabelled_folder


def sharded(tmp_path: Path, counts: dict[str, int], shard_size: int) -> Path:
    """A labelled folder of small JPEGs written as shards; the shards' folder."""
    _class_folders(tmp_path / "folder", counts)
    assert (
        make_shards(
            [str(tmp_path / "folder"), str(tmp_path / "shards"), "--shard-size", str(shard_size)]
        )
        == 0
    )
    return tmp_path / "shards"


def _tar(path: Path, members: dict[str, bytes]) -> None:
    """A tar of ``members`` written by the standard library."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shards_hold_the_images_and_labels_of_the_folder(tmp_path: Path) -> None:
    root = sharded(tmp_path, {"cat": 10, "dog": 15}, shard_size=6)
    assert sorted(os.listdir(root)) == ["train", "val"]
    for train in (True, False):
        folder = build_dataset("imagefolder", root=tmp_path / "folder", train=train, image_size=8)
        shards = build_dataset("shards", root=root, train=train, image_size=8)
        assert shards.classes == folder.classes == ["cat", "dog"]
        assert len(shards) == len(folder) == (20 if train else 5)
        # The same images with the same labels, in the shuffled order of the shards.
        ours = sorted((shards[i][0].flatten().tolist(), shards[i][1]) for i in range(len(shards)))
        theirs = sorted((folder[i][0].flatten().tolist(), folder[i][1]) for i in range(len(folder)))
        assert ours == theirs
    train = sorted(os.listdir(root / "train"))
    assert train == [SHARD_INDEX] + [f"train-{i:06d}.tar" for i in range(4)]
    index = json.loads((root / "train" / SHARD_INDEX).read_text())
    assert [len(e["labels"]) for e in index["shards"].values()] == [6, 6, 6, 2]
    # Shuffled before writing: the first shard mixes the classes.
    assert set(index["shards"]["train-000000.tar"]["labels"]) == {0, 1}


def test_an_unlabelled_folder_gives_unlabelled_shards(tmp_path: Path) -> None:
    unlabelled_folder(tmp_path / "folder", 7)
    assert make_shards([str(tmp_path / "folder"), str(tmp_path / "out"), "--shard-size", "3"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["train"]
    dataset = build_dataset("shards", root=tmp_path / "out", image_size=8)
    assert len(dataset) == 7 and (dataset.targets == -1).all() and dataset.classes == []


def test_a_brace_pattern_names_the_shards_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    root = sharded(tmp_path, {"cat": 10, "dog": 10}, shard_size=4)
    pattern = str(root / "train" / "train-{000000..000002}.tar")
    assert len(find_shards(pattern)) == 3
    files = build_dataset("shards", root=pattern, image_size=8).files
    assert files.shards == find_shards(pattern)  # the three, split 80/20 as a folder is
    missing = str(root / "train" / "train-{000003..000009}.tar")
    with pytest.raises(
        DatasetNotFoundError, match=r"train-000004\.tar does not exist \(and 5 more\)"
    ):
        find_shards(missing)


def test_foreign_shards_are_indexed_once_and_the_index_kept(tmp_path: Path) -> None:
    """Shards written by other tools, without an index: read, then indexed into the per-user
    cache, never beside them (a folder the user did not name)."""
    (tmp_path / "wds").mkdir()
    image = (sharded(tmp_path, {"a": 1, "b": 1}, 5) / "train").glob("*.tar")
    with tarfile.open(next(image)) as tar:
        jpeg = tar.extractfile(next(m for m in tar if m.name.endswith(".jpg"))).read()
    _tar(
        tmp_path / "wds" / "part-0.tar",
        {"x1.jpg": jpeg, "x1.cls": b"1", "x2.jpg": jpeg, "x2.cls": b"0"},
    )
    _tar(tmp_path / "wds" / "part-1.tar", {"y1.jpg": jpeg, "y1.cls": b"1"})
    dataset = build_dataset("shards", root=tmp_path / "wds", train=True, image_size=8)
    assert dataset.classes == ["0", "1"] and len(dataset) == 1 + 2  # 80% of 1 and of 2
    assert sorted(os.listdir(tmp_path / "wds")) == ["part-0.tar", "part-1.tar"]
    assert len(list(cache_dir().glob("shards-*.ssl-toolkit-index.json"))) == 1


def _sampler(groups, rank: int, world: int, readers: int, batch: int = 4) -> ShardBatchSampler:
    return ShardBatchSampler(
        groups,
        batch,
        generator=torch.Generator().manual_seed(5),
        rank=rank,
        world_size=world,
        readers=readers,
    )


GROUPS = [
    np.arange(start, start + size)
    for start, size in zip([0, 8, 16, 24, 31, 39, 47], [8, 8, 8, 7, 8, 8, 6], strict=True)
]


@pytest.mark.parametrize("world,readers", [(1, 1), (2, 2), (3, 1), (2, 3)])
def test_every_shard_is_read_by_one_rank_and_one_worker(world: int, readers: int) -> None:
    shard_of = {int(i): s for s, group in enumerate(GROUPS) for i in group}
    per_rank = sum(sorted(len(g) for g in GROUPS)[: len(GROUPS) // world])
    for epoch in range(3):
        owner: dict[int, tuple[int, int]] = {}
        seen: list[int] = []
        for rank in range(world):
            sampler = _sampler(GROUPS, rank, world, readers)
            sampler.epoch = epoch
            checked = readers * _full_batches(sampler)
            batches = list(sampler)
            assert sampler.shard_size == per_rank and len(batches) == per_rank // 4
            assert all(len(b) == 4 for b in batches)  # the last incomplete batch dropped
            for b, batch in enumerate(batches):
                shards = {shard_of[i] for i in batch.tolist()}
                for shard in shards:
                    reader = owner.setdefault(shard, (rank, b % readers))
                    assert reader[0] == rank  # a shard's samples come from one rank
                    if b < checked:
                        assert reader[1] == b % readers  # and from one worker
                seen += batch.tolist()
        assert len(seen) == len(set(seen)) == world * (per_rank // 4) * 4
    orders = [torch.cat(list(_sampler(GROUPS, 0, world, readers))).tolist() for _ in range(2)]
    assert orders[0] == orders[1]


def _full_batches(sampler: ShardBatchSampler) -> int:
    """Whole batches of the reader with the fewest this epoch: while every reader has one
    left, batch b is worker b mod readers's."""
    order = torch.randperm(len(GROUPS), generator=sampler._draw(sampler.epoch)).tolist()
    mine = order[sampler.rank :: sampler.world_size]
    return min(
        sum(len(GROUPS[s]) for s in mine[r :: sampler.readers]) // sampler.batch_size
        for r in range(sampler.readers)
    )


def test_the_shard_order_changes_with_the_epoch_and_resumes_mid_epoch() -> None:
    sampler = _sampler(GROUPS, 0, 1, 2)
    first = [b.tolist() for b in sampler]
    second = iter(sampler)
    taken = [next(second).tolist() for _ in range(3)]
    state = sampler.state_dict()
    rest = [b.tolist() for b in second]
    assert len(first) == len(taken + rest) == len(sampler) and first != taken + rest
    resumed = _sampler(GROUPS, 0, 1, 2)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed][: len(rest)] == rest


def test_fewer_shards_than_processes_or_a_batch_larger_than_a_share_is_an_error() -> None:
    with pytest.raises(DatasetNotFoundError, match="7 shards for 8 processes: every process"):
        _sampler(GROUPS, 0, 8, 1)
    # 3 processes: 2 shards each, 6 + 7 images from the smallest.
    with pytest.raises(DatasetNotFoundError, match=r"data\.batch_size: 14 is more than the 13"):
        _sampler(GROUPS, 0, 3, 1, batch=14)
    assert len(_sampler(GROUPS, 0, 3, 1, batch=13)) == 1


def test_pretraining_views_from_shards_resume_exactly(tmp_path: Path) -> None:
    root = sharded(tmp_path, {"cat": 12, "dog": 12}, shard_size=5)
    views = build_dataset("shards", root=root, views=CropViews(size=8, seed=3))

    def loader() -> WorkerBatchLoader:
        return WorkerBatchLoader(
            views, 4, generator=torch.Generator().manual_seed(0), num_workers=2
        )

    straight = loader()
    batches = [torch.cat(b[0]) for _, b in zip(range(7), _forever(straight), strict=False)]
    cut = loader()
    head = [torch.cat(b[0]) for _, b in zip(range(3), _forever(cut), strict=False)]
    state = cut.state_dict()
    again = loader()
    again.load_state_dict(state)
    tail = [torch.cat(b[0]) for _, b in zip(range(4), _forever(again), strict=False)]
    for expected, got in zip(batches, head + tail, strict=True):
        assert torch.equal(expected, got)


def _forever(loader):
    while True:
        yield from loader


def _corrupt(root: Path, what: str) -> tuple[Path, str]:
    """Break the first shard of train/ in one way; the shard and the member broken."""
    shard = root / "train" / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    first = sorted(name for name in members if name.endswith(".jpg"))[0]
    if what == "garbage":
        members[first] = b"not a jpeg at all"
    elif what == "no image":  # in its place, so that the sample keeps its other members
        members = {n.replace(first, first[:-4] + ".txt"): d for n, d in members.items()}
    _tar(shard, members)
    if what == "truncated":
        data = shard.read_bytes()
        with tarfile.open(shard) as tar:
            last = [m for m in tar if m.name.endswith(".jpg")][-1]
        shard.write_bytes(data[: last.offset_data + last.size // 2])
        first = last.name
    return shard, first


@pytest.mark.parametrize("what", ["garbage", "no image", "truncated"])
def test_a_broken_member_is_one_error_naming_the_shard_and_member(
    tmp_path: Path, what: str
) -> None:
    root = sharded(tmp_path, {"cat": 6, "dog": 6}, shard_size=4)
    shard, member = _corrupt(root, what)
    dataset = build_dataset("shards", root=root / "train", image_size=8)
    files = dataset.files
    with pytest.raises(BadImageError) as info:
        for i in range(len(dataset)):
            dataset[i]
    message = str(info.value)
    assert message.startswith(f"cannot decode the image {shard}:")
    assert "\n" not in message
    if what != "no image":
        assert f"{shard}:{member}" in message
    if what == "truncated":
        assert "the shard ends inside it (a truncated shard)" in message
    loader = WorkerBatchLoader(
        dataset, 2, shuffle=False, drop_last=False, num_workers=0, skip_bad=True
    )
    assert sum(len(b[1]) for b in loader) == len(files) and len(loader.skipped) == 1


def test_a_shard_that_is_not_a_tar_is_named(tmp_path: Path) -> None:
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "bad.tar").write_bytes(b"\x01" * 1500)
    with pytest.raises(
        DatasetNotFoundError, match=f"cannot index the shard {tmp_path / 'wds' / 'bad.tar'}"
    ):
        build_dataset("shards", root=tmp_path / "wds", image_size=8)


def test_the_command_line_exits_2_naming_the_broken_member(tmp_path: Path, capsys) -> None:
    root = sharded(tmp_path, {"cat": 12, "dog": 12}, shard_size=5)
    shard, member = _corrupt(root, "garbage")
    code = main(
        [
            "--config",
            "simclr_lars",
            "model.backbone=timm/test_resnet",
            "method.projector={hidden_dim: 32, out_dim: 16}",
            "data.name=shards",
            f"data.root={root}",
            "data.batch_size=4",
            "data.image_size=16",
            "data.num_workers=2",
            "logging.wandb.mode=disabled",
            "trainer.device=cpu",
            "trainer.epochs=1",
            f"trainer.output_dir={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err
    assert errors == [errors[0]] and errors[0].startswith(
        f"error: cannot decode the image {shard}:{member}: "
    )


def test_skip_bad_leaves_out_a_shard_that_is_not_a_tar_with_a_warning(tmp_path: Path) -> None:
    root = sharded(tmp_path, {"cat": 10, "dog": 10}, shard_size=4)
    bad = root / "train" / "train-000001.tar"
    bad.write_bytes(b"\x01" * 1500)
    with pytest.warns(RuntimeWarning, match=r"1 of 4 shards cannot be read and are left out"):
        dataset = build_dataset("shards", root=root, image_size=8, skip_bad=True)
    assert str(bad) not in dataset.files.shards and len(dataset) == 12
    # Not kept as the index: without skip_bad the shard is an error again.
    with pytest.raises(DatasetNotFoundError, match="cannot index the shard"):
        build_dataset("shards", root=root, image_size=8)
