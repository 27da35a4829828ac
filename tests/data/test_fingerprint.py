"""The record of what a run trains on: the same for the same listing wherever the data lies,
and a change named in counts where counts differ."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ssl_toolkit.data import build_dataset
from ssl_toolkit.data.fingerprint import data_changes, data_record
from tests.data.test_folders import _class_folders


def _folder_record(root: Path) -> dict:
    return data_record(build_dataset("imagefolder", root=root, image_size=8))


def test_a_folder_moved_elsewhere_is_the_same_data(tmp_path: Path) -> None:
    _class_folders(tmp_path / "a", {"cat": 10, "dog": 10})
    record = _folder_record(tmp_path / "a")
    assert (record["kind"], record["count"], record["classes"]) == ("images", 16, 2)
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    assert _folder_record(tmp_path / "elsewhere" / "b") == record
    assert data_changes(record, _folder_record(tmp_path / "elsewhere" / "b")) is None


def test_a_renamed_image_or_a_new_class_is_named(tmp_path: Path) -> None:
    """The same count with another path: the digest says so; a class more: the counts."""
    _class_folders(tmp_path, {"cat": 10, "dog": 10})
    before = _folder_record(tmp_path)
    (tmp_path / "cat" / "3.jpg").rename(tmp_path / "cat" / "33.jpg")
    assert data_changes(before, _folder_record(tmp_path)) == (
        "the same 16 images, other paths or labels"
    )
    _class_folders(tmp_path, {"cat": 0, "dog": 0, "emu": 10})
    assert data_changes(before, _folder_record(tmp_path)) == "16 -> 24 images, 2 -> 3 classes"


def test_in_memory_datasets_are_recorded_by_their_shape_and_labels(tmp_path: Path) -> None:
    digits = data_record(build_dataset("digits"))
    assert digits == data_record(build_dataset("digits"))  # a fixed set: always the same
    assert (digits["kind"], digits["count"]) == ("tensors", 1438)  # 80% of each class
    fewer = data_record(build_dataset("synthetic", length=128))
    assert data_changes(data_record(build_dataset("synthetic")), fewer) == "256 -> 128 images"
    _class_folders(tmp_path, {"cat": 10, "dog": 10})
    assert data_changes(digits, _folder_record(tmp_path)) == (
        "1438 images in memory -> 16 images in a folder"
    )


def test_shards_relabelled_or_with_other_keys_at_the_same_sizes_are_other_data(
    tmp_path: Path,
) -> None:
    """Names, sizes and counts alike: the labels and the keys' digests tell."""
    from tests.data.test_shard_index import _flip_labels_in_place, _rename_keys_in_place
    from tests.data.test_shards import sharded

    root = sharded(tmp_path, {"cat": 20, "dog": 20}, shard_size=8)
    before = data_record(build_dataset("shards", root=root, image_size=8))
    assert (before["kind"], before["count"], before["shards"]) == ("shards", 32, 4)
    shard = root / "train" / "train-000001.tar"
    _flip_labels_in_place(shard)
    os.utime(shard)  # a rewrite with a new time: indexed afresh
    relabelled = data_record(build_dataset("shards", root=root, image_size=8))
    assert data_changes(before, relabelled) == (
        "the same 32 images, other shard names, sizes, sample counts, keys or labels"
    )
    _flip_labels_in_place(shard)
    os.utime(shard)
    assert data_record(build_dataset("shards", root=root, image_size=8)) == before
    _rename_keys_in_place(shard)
    os.utime(shard)
    assert data_record(build_dataset("shards", root=root, image_size=8)) != before
