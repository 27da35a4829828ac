"""The shard index is a hint: sealed by a checksum, checked against the shards' names, sizes and
times, and every sample read checked against it, so that an edited index or a shard rewritten
with the same size and time never trains mislabelled."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import warnings
from pathlib import Path

import pytest

from ssl_toolkit.data import DatasetNotFoundError, build_dataset
from ssl_toolkit.data.loader import WorkerBatchLoader
from ssl_toolkit.data.shards import SHARD_INDEX, find_shards, index_shards
from tests.data.test_shards import _tar, sharded


def _edit(place: Path, change) -> None:
    """Apply ``change`` to the index at ``place`` and seal it again with a checksum of its own
    (the SHA-256 of its content as sorted, compact JSON), so that only the other checks stand."""
    index = json.loads(place.read_text())
    index.pop("checksum", None)
    change(index)
    text = json.dumps(index, separators=(",", ":"), sort_keys=True)
    index["checksum"] = hashlib.sha256(text.encode()).hexdigest()
    place.write_text(json.dumps(index))


def _cut(place: Path, change) -> None:
    """Apply ``change`` to the index at ``place`` and leave its checksum as it was."""
    index = json.loads(place.read_text())
    change(index)
    place.write_text(json.dumps(index))


def _labels(dataset) -> list[int]:
    return [int(label) for label in dataset.targets.tolist()]


def _fresh_labels(folder: Path) -> list[int]:
    """The labels the shards themselves hold, indexed afresh."""
    index = index_shards(find_shards(str(folder)))
    return [label for name in sorted(index["shards"]) for label in index["shards"][name]["labels"]]


def _flip_labels_in_place(shard: Path) -> int:
    """Rewrite ``shard`` with every ``.cls`` label 0 <-> 1, byte for byte in place (the tar
    headers and the size unchanged), and its modification time put back; how many flipped."""
    stat = os.stat(shard)
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        members = [m for m in tar if m.name.endswith(".cls")]
    for member in members:
        assert member.size == 1
        data[member.offset_data] = ord("1") if data[member.offset_data] == ord("0") else ord("0")
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(shard).st_size == stat.st_size
    return len(members)


def test_a_shard_rewritten_with_the_same_size_and_time_is_a_stale_index(tmp_path: Path) -> None:
    root = sharded(tmp_path, {"cat": 20, "dog": 20}, shard_size=8)
    train = root / "train"
    before = build_dataset("shards", root=root, image_size=8)
    assert _labels(before) == _fresh_labels(train)
    shard = train / "train-000001.tar"
    assert _flip_labels_in_place(shard) == 8
    dataset = build_dataset("shards", root=root, image_size=8)
    assert len(dataset) == len(before)
    stale = re.escape(f"{shard}:") + r".*" + re.escape(f"its index {train / SHARD_INDEX}")
    with pytest.raises(DatasetNotFoundError, match=stale + r".*the index is stale") as info:
        for i in range(len(dataset)):
            dataset[i]
    assert "\n" not in str(info.value)
    loader = WorkerBatchLoader(dataset, 4, shuffle=False, num_workers=2, skip_bad=True)
    with pytest.raises(DatasetNotFoundError, match="the index is stale") as info:
        list(loader)  # not skipped as a bad image: one error, in the main process
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("sealed", [False, True])
def test_a_cut_label_list_is_refused_or_stale_never_a_shorter_epoch(
    tmp_path: Path, sealed: bool
) -> None:
    root = sharded(tmp_path, {"cat": 16, "dog": 16}, shard_size=32)
    train = root / "train"
    full = len(_fresh_labels(train))

    def change(index: dict) -> None:
        del index["shards"]["train-000000.tar"]["labels"][full - 5 :]

    (_edit if sealed else _cut)(train / SHARD_INDEX, change)
    if not sealed:
        with pytest.warns(RuntimeWarning, match=f"ignoring the index {train / SHARD_INDEX}: "):
            dataset = build_dataset("shards", root=root, image_size=8)
        assert len(dataset.files) == full and dataset.files.labels == _fresh_labels(train)
        return
    dataset = build_dataset("shards", root=root, image_size=8)
    with pytest.raises(DatasetNotFoundError, match=f"holds {full} samples, but its index"):
        dataset[0]


def test_flipped_val_labels_in_the_index_are_refused(tmp_path: Path) -> None:
    root = sharded(tmp_path, {"cat": 10, "dog": 10}, shard_size=4)
    val = root / "val"
    truth = _fresh_labels(val)

    def flip(index: dict) -> None:
        for entry in index["shards"].values():
            entry["labels"] = [1 - label for label in entry["labels"]]

    _cut(val / SHARD_INDEX, flip)
    with pytest.warns(RuntimeWarning, match="its checksum does not match its content"):
        dataset = build_dataset("shards", root=root, train=False, image_size=8)
    assert _labels(dataset) == truth
    assert sorted(os.listdir(val)) == sorted([SHARD_INDEX, *(p.name for p in val.glob("*.tar"))])
    _edit(val / SHARD_INDEX, lambda index: None)  # the flipped labels sealed: read, but
    # no sample read agrees with them
    dataset = build_dataset("shards", root=root, train=False, image_size=8)
    with pytest.raises(
        DatasetNotFoundError, match=r"the shard labels it \d, its index .*the index is stale"
    ):
        dataset[0]


def test_an_index_for_other_shards_goes_to_index_dir_and_is_read_back(
    tmp_path: Path, _own_index_cache: Path
) -> None:
    source = sharded(tmp_path, {"a": 3, "b": 3}, 5) / "train"
    foreign = tmp_path / "wds"
    foreign.mkdir()
    for shard in source.glob("*.tar"):
        with tarfile.open(shard) as tar:
            _tar(foreign / shard.name, {m.name: tar.extractfile(m).read() for m in tar})
    chosen = tmp_path / "indexes"
    first = build_dataset("shards", root=foreign, image_size=8, index_dir=chosen)
    (kept,) = chosen.glob("shards-*.ssl-toolkit-index.json")
    assert sorted(os.listdir(foreign)) == sorted(p.name for p in source.glob("*.tar"))
    assert not list(_own_index_cache.glob("shards-*"))  # the folder's listing is there
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = build_dataset("shards", root=foreign, image_size=8, index_dir=chosen)
    assert again.files.labels == first.files.labels and kept.is_file()
    _cut(kept, lambda index: index.__setitem__("classes", ["b", "a"]))
    with pytest.warns(RuntimeWarning, match=f"ignoring the index {kept}: its checksum"):
        build_dataset("shards", root=foreign, image_size=8, index_dir=chosen)


def _rename_keys_in_place(shard: Path) -> None:
    """Rewrite ``shard`` with each sample's key reversed, byte for byte in place (the names in
    the tar and PAX headers, their checksums recomputed; the size unchanged) and its
    modification time put back: the members and labels stay as they were."""
    stat = os.stat(shard)
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        members = list(tar)
    for key in {member.name.partition(".")[0] for member in members}:
        data = data.replace(f"{key}.".encode(), f"{key[::-1]}.".encode())
    for header in {m.offset for m in members} | {m.offset_data - 512 for m in members}:
        data[header + 148 : header + 156] = b" " * 8
        data[header + 148 : header + 156] = b"%06o\0 " % sum(data[header : header + 512])
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(shard).st_size == stat.st_size
    with tarfile.open(shard) as tar:
        assert sorted(m.name for m in tar) != sorted(m.name for m in members)


def test_a_shard_whose_keys_changed_with_the_same_size_and_time_is_a_stale_index(
    tmp_path: Path,
) -> None:
    root = sharded(tmp_path, {"cat": 20, "dog": 20}, shard_size=8)
    train = root / "train"
    build_dataset("shards", root=root, image_size=8)
    shard = train / "train-000002.tar"
    _rename_keys_in_place(shard)
    # Labels and sample counts still agree with the index: only the keys tell.
    assert _fresh_labels(train) == [
        label
        for name in sorted(os.listdir(train))
        if name.endswith(".tar")
        for label in index_shards([str(train / name)])["shards"][name]["labels"]
    ]
    dataset = build_dataset("shards", root=root, image_size=8)
    stale = re.escape(
        f"{shard}: its samples' keys are not the ones its index {train / SHARD_INDEX}"
    )
    with pytest.raises(DatasetNotFoundError, match=stale + r".*the index is stale") as info:
        for i in range(len(dataset)):
            dataset[i]
    assert "\n" not in str(info.value)
