"""Write an image folder as WebDataset tar shards that ``data.name=shards`` reads.

``python scripts/make_shards.py FOLDER OUT [--shard-size N] [--seed S]``

The folder is read as ``data.name=imagefolder`` reads it (class sub-folders or not, ``train/``
and ``val/`` or a fixed 80/20 split of a labelled folder), and each split is written to
``OUT/train/`` and ``OUT/val/`` (unlabelled: ``OUT/train/`` only) as shards of ``N`` samples,
``train-000000.tar``, ...: every sample is ``KEY.<suffix>``, the image file's bytes as they
are, and ``KEY.cls``, its class index, when labelled. The samples are shuffled (seeded)
before they are written, so that every shard mixes the classes, as a shard is read front to
back. Each split gets its index (``.ssl-toolkit-shards.json``), with the class names. A split
is written into a temporary folder and moved into place when complete, so an interrupted run
leaves no half-written split. Exit 2, with one line, for a folder that is not one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
import webdataset as wds
from rich.progress import Progress

from ssl_toolkit.data import DatasetNotFoundError, build_dataset
from ssl_toolkit.data.shards import SHARD_INDEX, index_shards, keep_shard_index


def write_split(
    paths: list[str],
    labels: list[int],
    classes: list[str],
    out: Path,
    shard_size: int,
    seed: int,
    progress: Progress,
) -> int:
    """Write one split's images as shards in ``out`` (replacing it); returns the shard count."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    task = progress.add_task(f"{out.name}: {len(paths):,} images", total=len(paths))
    pattern = str(partial / f"{out.name}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as writer:
        for number, i in enumerate(order):
            path = paths[i]
            suffix = os.path.splitext(path)[1].lower().lstrip(".")
            with open(path, "rb") as file:
                sample = {"__key__": f"{number:09d}", suffix: file.read()}
            if classes:
                sample["cls"] = labels[i]
            writer.write(sample)
            progress.advance(task)
    shards = sorted(str(p) for p in partial.glob("*.tar"))
    index = index_shards(shards, classes or None)
    keep_shard_index([partial / SHARD_INDEX], index)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return len(shards)


def main(argv: list[str] | None = None) -> int:
    """Convert the folder; 0 on success, 2 with one line for a folder that cannot be read."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an image folder, as data.name=imagefolder")
    parser.add_argument("out", type=Path, help="where the shards go (OUT/train, OUT/val)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the shuffle")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be at least 1")
    if not args.folder.is_dir():
        print(f"make_shards: {args.folder} is not a folder", file=sys.stderr)
        return 2
    try:
        splits = {"train": build_dataset("imagefolder", root=args.folder).files}
        if splits["train"].labelled:
            splits["val"] = build_dataset("imagefolder", root=args.folder, train=False).files
    except (DatasetNotFoundError, OSError) as error:
        print(f"make_shards: {error}", file=sys.stderr)
        return 2
    with Progress() as progress:
        for name, files in splits.items():
            if not files.paths:  # a labelled folder of classes too small to hold out any
                progress.console.print(f"{args.out / name}: no images, not written")
                continue
            count = write_split(
                files.paths,
                files.labels,
                files.classes,
                args.out / name,
                args.shard_size,
                args.seed,
                progress,
            )
            progress.console.print(
                f"{args.out / name}: {len(files.paths):,} images, {count} shards"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
