"""Write an image folder as WebDataset tar shards that ``data.name=shards`` reads.

``python scripts/make_shards.py FOLDER OUT [--shard-size N] [--seed S] [--overwrite]
[--skip-bad]``

The folder is read as ``data.name=imagefolder`` reads it (class sub-folders or not, ``train/``
and ``val/`` or a fixed 80/20 split of a labelled folder), and each split is written to
``OUT/train/`` and ``OUT/val/`` (unlabelled: ``OUT/train/`` only) as shards of ``N`` samples,
``train-000000.tar``, ...: every sample is ``KEY.<suffix>``, the image file's bytes as they
are, and ``KEY.cls``, its class index, when labelled. The samples are shuffled (seeded)
before they are written, so that every shard mixes the classes, as a shard is read front to
back. Each split gets its index (``.ssl-toolkit-shards.json``), with the class names. A split
is written into a temporary folder and moved into place when complete, so an interrupted run
leaves no half-written split.

Nothing the tool did not write is deleted or overwritten: an ``OUT`` that is the folder, or
inside it, or holds it, is refused; so is an ``OUT/<split>`` that holds anything but a
finished shard set of ours, unless ``--overwrite``, which then replaces only our shards and
index there and keeps every other file. An image that cannot be read stops the run naming it,
or is left out and counted with ``--skip-bad``. Every refusal is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
import webdataset as wds
from rich.progress import Progress

from ssl_toolkit.data import DatasetNotFoundError, build_dataset
from ssl_toolkit.data.listing import INDEX_SUFFIX, ImageFiles
from ssl_toolkit.data.shards import SHARD_INDEX, index_shards, keep_shard_index

# The files of ours in a split's folder: its shards, the index written with them, the index
# of a subset of them that earlier versions of the shard reader kept beside them, and
# atomic_write's temporary files.
_OWN_INDEXES = rf"{re.escape(SHARD_INDEX)}|\.shards-[0-9a-f]{{16}}{re.escape(INDEX_SUFFIX)}"


class Refused(Exception):
    """What the tool will not do, or cannot read: one line for the user, exit code 2."""


def _own_files(folder: Path, split: str) -> tuple[list[Path], list[str]]:
    """The files of ours in ``folder`` (regular files with the names we write for the split
    ``split``), and the names of everything else in it."""
    name = rf"{re.escape(split)}-\d{{6}}\.tar|{_OWN_INDEXES}"
    ours = re.compile(rf"(?:{name})|\.(?:{name})\..+\.tmp")
    own, other = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if ours.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            own.append(Path(entry.path))
        else:
            other.append(entry.name)
    return own, other


def _finished(folder: Path, split: str) -> bool:
    """True when ``folder`` is a shard set that this tool finished: our shards and the index
    that lists exactly them, nothing else."""
    own, other = _own_files(folder, split)
    shards = sorted(p.name for p in own if p.suffix == ".tar")
    try:
        listed = sorted(json.loads((folder / SHARD_INDEX).read_text())["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return not other and listed == shards


def _check_place(folder: Path, split: str, overwrite: bool, temporary: bool = False) -> None:
    """Refuse to write ``folder`` (``OUT/<split>``, or one of our temporary folders beside it)
    when it holds what we did not write, unless ``overwrite`` keeps those files."""
    if not os.path.lexists(folder):
        return
    if folder.is_symlink() or not folder.is_dir():
        raise Refused(f"{folder} exists and is not a folder: choose another OUT")
    own, other = _own_files(folder, split)
    if temporary and other:
        raise Refused(
            f"{folder} holds files that make_shards did not write ({other[0]}, ...); it is "
            "where make_shards writes a split before moving it into place: move it away"
        )
    if temporary or overwrite or not (own or other) or _finished(folder, split):
        return
    what = (
        f"files that make_shards did not write ({other[0]}, ...)"
        if other
        else ("shards without the index that make_shards writes last (an unfinished set)")
    )
    raise Refused(
        f"{folder} holds {what}: choose another OUT, or pass --overwrite to replace only the "
        "shards and index there (other files are kept)"
    )


def _remove_own(folder: Path, split: str) -> None:
    """Delete our files in ``folder``, and the folder when nothing else is left in it."""
    own, other = _own_files(folder, split)
    for path in own:
        path.unlink()
    if not other:
        folder.rmdir()


def _temporary(out: Path, what: str) -> Path:
    """A folder of ours beside ``out``: ``partial`` (the split being written) or ``old`` (the
    set it replaces, while it is swapped)."""
    return out.with_name(f".{out.name}.make_shards-{what}")


def _read(path: str, skip_bad: bool, skipped: list[str]) -> bytes | None:
    """The bytes of the image at ``path``; ``None`` (listed in ``skipped``) when it cannot be
    read and ``skip_bad``, else :class:`Refused` naming it."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        if not skip_bad:
            raise Refused(
                f"cannot read the image {path}: {reason}; fix it, or pass --skip-bad to leave "
                "out the images that cannot be read"
            ) from error
        skipped.append(f"{path}: {reason}")
        return None


def write_split(
    paths: list[str],
    labels: list[int],
    classes: list[str],
    out: Path,
    shard_size: int,
    seed: int,
    progress: Progress,
    skip_bad: bool = False,
) -> tuple[int, list[str], list[str]]:
    """Write one split's images as shards in ``out``, replacing only our files there; the
    shard count, the images that could not be read (left out with ``skip_bad``) and the
    other files kept in ``out`` (``--overwrite``)."""
    partial = _temporary(out, "partial")
    if partial.exists():  # an interrupted run's (checked by main to hold only our files)
        _remove_own(partial, out.name)
    partial.mkdir(parents=True)
    skipped: list[str] = []
    try:
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))
        task = progress.add_task(f"{out.name}: {len(paths):,} images", total=len(paths))
        pattern = str(partial / f"{out.name}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as writer:
            for number, i in enumerate(order.tolist()):
                data = _read(paths[i], skip_bad, skipped)
                if data is not None:
                    suffix = os.path.splitext(paths[i])[1].lower().lstrip(".")
                    sample = {"__key__": f"{number:09d}", suffix: data}
                    if classes:
                        sample["cls"] = labels[i]
                    writer.write(sample)
                progress.advance(task)
        shards = sorted(str(p) for p in partial.glob("*.tar"))
        if not shards:
            raise Refused(f"{out}: none of the {len(paths):,} images can be read ({skipped[0]})")
        if keep_shard_index([partial / SHARD_INDEX], index_shards(shards, classes or None)) is None:
            raise Refused(f"cannot write the shard index in {partial}")
    except BaseException:
        _remove_own(partial, out.name)
        raise
    return len(shards), skipped, _move_into_place(partial, out)


def _move_into_place(partial: Path, out: Path) -> list[str]:
    """Put the finished split ``partial`` at ``out``: swapped in whole when ``out`` holds only
    our files (or nothing), else (``--overwrite`` keeping other files) our old files removed
    and the new ones moved in, the index last, so that the set is never listed half done;
    the names of the other files kept."""
    split = out.name
    if not os.path.lexists(out):
        os.replace(partial, out)
        return []
    own, other = _own_files(out, split)
    if not other:
        old = _temporary(out, "old")
        if old.exists():
            _remove_own(old, split)
        os.replace(out, old)
        os.replace(partial, out)
        _remove_own(old, split)
        return []
    for path in own:
        path.unlink()
    for path in sorted(partial.glob("*.tar")):
        os.replace(path, out / path.name)
    os.replace(partial / SHARD_INDEX, out / SHARD_INDEX)
    partial.rmdir()
    return other


def _check_folders(folder: Path, out: Path) -> None:
    """Refuse an output that is the image folder, inside it, or holds it (links resolved):
    writing it would put shards among the images, or replace them."""
    if not folder.is_dir():
        raise Refused(f"{folder} is not a folder")
    source, target = folder.resolve(), out.resolve()
    if source == target or source in target.parents or target in source.parents:
        raise Refused(
            f"the output {out} and the image folder {folder} overlap (the same folder, or one "
            "inside the other): write the shards to a folder outside the images"
        )
    if os.path.lexists(out) and not out.is_dir():
        raise Refused(f"the output {out} exists and is not a folder")


def main(argv: list[str] | None = None) -> int:
    """Convert the folder; 0 on success, 2 with one line for anything refused or unreadable."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an image folder, as data.name=imagefolder")
    parser.add_argument("out", type=Path, help="where the shards go (OUT/train, OUT/val)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the shuffle")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the shards and index in OUT/<split> that holds other files (kept)",
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="leave out images that cannot be read, counted"
    )
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be at least 1")
    try:
        _check_folders(args.folder, args.out)
        try:
            splits = {"train": build_dataset("imagefolder", root=args.folder).files}
            if splits["train"].labelled:
                splits["val"] = build_dataset("imagefolder", root=args.folder, train=False).files
        except (DatasetNotFoundError, OSError) as error:
            raise Refused(str(error)) from error
        splits = {name: files for name, files in splits.items() if files.paths}
        for name in splits:  # every refusal before anything is written
            out = args.out / name
            _check_place(out, name, args.overwrite)
            for what in ("partial", "old"):
                _check_place(_temporary(out, what), name, args.overwrite, temporary=True)
        _write(args, splits)
    except Refused as error:
        print(f"make_shards: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a folder that cannot be listed or written, a full disk
        where = f"{error.filename}: " if error.filename else ""
        print(
            f"make_shards: cannot write the shards: {where}{error.strerror or error}",
            file=sys.stderr,
        )
        return 2
    return 0


def _write(args: argparse.Namespace, splits: dict[str, ImageFiles]) -> None:
    """Write every split, saying what each holds and what was skipped."""
    with Progress() as progress:

        def say(text: str) -> None:
            progress.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)

        if "val" not in splits and splits["train"].labelled:
            say(f"{args.out / 'val'}: no images, not written")  # classes too small to hold out
        for name, files in splits.items():
            out = args.out / name
            count, skipped, kept = write_split(
                files.paths,
                files.labels,
                files.classes,
                out,
                args.shard_size,
                args.seed,
                progress,
                args.skip_bad,
            )
            written = len(files.paths) - len(skipped)
            say(f"{out}: {written:,} images, {count} shards")
            if skipped:
                shown = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
                noun = "image" if len(skipped) == 1 else "images"
                say(f"{out}: {len(skipped):,} {noun} that cannot be read skipped ({shown})")
            if kept:
                shown = ", ".join(kept[:3]) + (", ..." if len(kept) > 3 else "")
                noun = "file" if len(kept) == 1 else "files"
                say(f"{out}: kept {len(kept):,} {noun} that make_shards did not write ({shown})")


if __name__ == "__main__":
    sys.exit(main())
