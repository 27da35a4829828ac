"""What a run trains on, in a few numbers and a digest, so that a resume on other data is caught.

A checkpoint keeps the saved order of an epoch as a generator state and a batch position: on
another listing (images added to a folder, a shard added to a set) the same state draws an
order of other images, and the run would go on without a word. :func:`data_record` describes
the training set cheaply, from what is listed rather than from the image bytes: an image
folder by the paths (relative to the folder, so that the data may move) and labels of its
images, shards by the names, sizes, sample counts and key digests of the shards and the
samples' labels, an in-memory dataset by
its shape and labels. :func:`data_changes` says what differs between two records.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from ssl_toolkit.data.listing import ImageFiles
from ssl_toolkit.data.shards import ShardFiles

__all__ = ["data_changes", "data_record"]

_WHAT = {
    "images": "paths or labels",
    "shards": "shard names, sizes, sample counts, keys or labels",
    "tensors": "labels or image shapes",
}
"""What the digest of each kind of record covers, to say what changed when only it differs."""


def data_record(dataset: Any) -> dict[str, Any]:
    """A description of ``dataset`` (from :func:`~ssl_toolkit.data.datasets.build_dataset`)
    for a checkpoint: ``kind``, the image ``count``, ``classes`` or ``shards``, and a
    ``digest`` of the listing; plain numbers and strings."""
    files = getattr(dataset, "files", None)
    digest = hashlib.sha256()
    if isinstance(files, ShardFiles):
        samples = np.bincount(files.shard_of, minlength=len(files.shards)).tolist()
        for path, count, keys in zip(files.shards, samples, files.keys, strict=True):
            name, size = os.path.basename(path), os.path.getsize(path)
            digest.update(f"{name}\t{size}\t{count}\t{keys}\n".encode())
        digest.update(np.asarray(files.labels, dtype=np.int64).tobytes())
        return {
            "kind": "shards",
            "shards": sum(1 for count in samples if count),
            "count": len(files),
            "digest": digest.hexdigest(),
        }
    if isinstance(files, ImageFiles):
        start = len(os.path.join(files.root, ""))
        for path, label in zip(files.paths, files.labels, strict=True):
            digest.update(f"{path[start:]}\t{label}\n".encode())
        return {
            "kind": "images",
            "count": len(files.paths),
            "classes": len(files.classes),
            "digest": digest.hexdigest(),
        }
    images, targets = dataset.images, dataset.targets
    digest.update(repr(tuple(images.shape)).encode())
    digest.update(targets.detach().cpu().numpy().astype(np.int64).tobytes())
    return {"kind": "tensors", "count": int(images.shape[0]), "digest": digest.hexdigest()}


def data_changes(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between the record of a checkpoint and this run's (``24 -> 26 images``,
    ``10 -> 11 shards, 160 -> 176 images``); ``None`` when they describe the same data."""
    if saved == current:
        return None
    kind = current["kind"]
    if saved.get("kind") != kind:
        return f"{_describe(saved)} -> {_describe(current)}"
    changed = [
        f"{saved.get(key)} -> {current[key]} {key if key != 'count' else 'images'}"
        for key in ("shards", "count", "classes")
        if key in current and saved.get(key) != current[key]
    ]
    return ", ".join(changed) or f"the same {current['count']} images, other {_WHAT[kind]}"


def _describe(record: dict[str, Any]) -> str:
    """``24 images in a folder``, ``160 images in 10 shards``, ``1437 images in memory``."""
    where = {
        "images": "in a folder",
        "shards": f"in {record.get('shards')} shards",
        "tensors": "in memory",
    }
    return f"{record.get('count')} images {where.get(record.get('kind'), '')}".strip()
