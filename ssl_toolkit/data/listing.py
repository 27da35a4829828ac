"""Listing the images of a folder fast, at a million files, and keeping the listing.

An ImageNet-sized folder holds 1.28 M files in 1,000 class folders. :func:`find_images` lists
it with ``os.scandir``, whose entries know whether they are files or folders without a stat
per file, and keeps paths as strings (a ``Path`` object per file costs more than the listing).
The listing is kept in an index file, beside the folder when its parent is writable (a hidden
``.NAME.ssl-toolkit-index.json``, which leaves the folder as other tools see it), else in
``index_dir`` (the run directory). A later start reads the index instead of listing, after
checking that no folder of the tree changed its modification time: adding, removing or
renaming an image changes its folder's. A folder changed in the last seconds is listed again
next time rather than trusted, as file systems with coarse timestamps could hide a second
change in the same tick.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_toolkit.checkpoint import atomic_write_first

__all__ = ["IMAGE_SUFFIXES", "INDEX_SUFFIX", "ImageFiles", "find_images"]

TORCHVISION_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif"})
# torchvision.io cannot decode these; PIL can, and is installed with torchvision (a dependency).
PIL_SUFFIXES = frozenset({".bmp", ".tif", ".tiff", ".ppm", ".pgm"})
IMAGE_SUFFIXES = TORCHVISION_SUFFIXES | PIL_SUFFIXES
"""File endings read as images: JPEG, PNG, WebP and GIF (``torchvision.io``), BMP, TIFF and
PPM/PGM (PIL)."""

# Image formats neither decoder reads here: such files are ignored with a warning, not silently.
_UNSUPPORTED_IMAGE_SUFFIXES = frozenset(
    {".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k", ".ico", ".svg", ".psd", ".exr", ".dng"}
)

INDEX_SUFFIX = ".ssl-toolkit-index.json"
"""The ending of an index file's name."""
_INDEX_VERSION = 1
# A folder modified this recently may change again within its timestamp's resolution.
_RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class ImageFiles:
    """The images of a folder: paths (strings), labels (-1 when unlabelled) and class names."""

    paths: list[str]
    labels: list[int]
    classes: list[str]

    @property
    def labelled(self) -> bool:
        """True when the folder has class sub-folders."""
        return bool(self.classes)


def _entries(folder: str) -> list[os.DirEntry[str]]:
    """The entries of ``folder``. A folder that cannot be listed, or a symbolic link to nothing
    in it, raises ``OSError`` naming it: nothing unreadable is left out without a word."""
    try:
        with os.scandir(folder) as listing:
            entries = list(listing)
    except OSError as error:
        raise OSError(f"cannot list the folder {folder}: {error.strerror or error}") from error
    for entry in entries:
        if entry.is_symlink() and not os.path.exists(entry.path):
            raise FileNotFoundError(
                f"cannot read {entry.path}: a symbolic link to {os.readlink(entry.path)}, "
                "which does not exist"
            )
    return entries


class _Found:
    """What a walk of a tree found: image paths and, by suffix, files in formats not read."""

    def __init__(self) -> None:
        self.images: list[str] = []
        self.unsupported: Counter[str] = Counter()
        self.folders = 0  # folders walked: with one, its paths sort as plain strings

    def sorted_images(self) -> list[str]:
        """The images in the order of sorted ``Path`` objects."""
        if self.folders <= 1:  # one folder: one prefix, so string order is that order
            return sorted(self.images)
        return sorted(self.images, key=lambda path: path.split(os.sep))

    def add(self, entry: os.DirEntry[str]) -> None:
        name = entry.name
        dot = name.rfind(".")
        # As os.path.splitext: leading dots start a name (".jpg" has no suffix), not a suffix.
        suffix = name[dot:].lower() if dot > 0 and name[:dot].lstrip(".") else ""
        if suffix in IMAGE_SUFFIXES:
            self.images.append(entry.path)
        elif suffix in _UNSUPPORTED_IMAGE_SUFFIXES:
            self.unsupported[suffix] += 1


def _walk(folder: str, found: _Found, folders: dict[str, int], outer: frozenset[str]) -> None:
    """Every file under ``folder`` at any depth into ``found``, following symbolic links to
    folders (``outer``: the real paths of the folders around it, so that a link back into them
    is an error). Each folder listed goes into ``folders`` with its modification time, read
    before its entries."""
    real = os.path.realpath(folder)
    if real in outer:
        raise OSError(f"cannot read {folder}: a symbolic link back into a folder around it")
    folders[folder] = os.stat(folder).st_mtime_ns
    found.folders += 1
    for entry in _entries(folder):
        if entry.is_dir():
            _walk(entry.path, found, folders, outer | {real})
        elif entry.is_file():
            found.add(entry)


def _list(folder: str) -> tuple[ImageFiles, dict[str, int], dict[str, int]]:
    """The images of ``folder``, the folders listed with their modification times, and the
    count of files in each unsupported image format."""
    folders = {folder: os.stat(folder).st_mtime_ns}
    entries = _entries(folder)
    own = _Found()
    for entry in entries:
        if entry.is_file():
            own.add(entry)
    real = frozenset({os.path.realpath(folder)})
    under: dict[str, _Found] = {}
    for entry in entries:
        if entry.is_dir():
            under[entry.name] = _Found()
            _walk(entry.path, under[entry.name], folders, real)
    classes = sorted(name for name, found in under.items() if found.images)
    if classes:
        paths, labels = [], []
        for label, name in enumerate(classes):
            images = under[name].sorted_images()
            paths += images
            labels += [label] * len(images)
    else:
        paths = own.sorted_images()
        labels = [-1] * len(paths)
    unsupported = sum((found.unsupported for found in under.values()), own.unsupported)
    return ImageFiles(paths, labels, classes), folders, dict(unsupported)


def _index_paths(folder: str, index_dir: Path | None) -> list[Path]:
    """Where the index of ``folder`` may be: beside it, then in ``index_dir``."""
    real = os.path.realpath(folder)
    places = [Path(os.path.dirname(real)) / f".{os.path.basename(real)}{INDEX_SUFFIX}"]
    if index_dir is not None:
        digest = hashlib.sha256(real.encode()).hexdigest()[:16]
        places.append(Path(index_dir) / f"listing-{digest}{INDEX_SUFFIX}")
    return places


def _read_index(place: Path, folder: str) -> tuple[ImageFiles, dict[str, int]] | None:
    """The listing kept at ``place``, if it is an index of ``folder`` whose folders all have
    the modification times it recorded; ``None`` otherwise (missing, stale or unreadable:
    an index is only ever a shortcut)."""
    try:
        index = json.loads(place.read_text())
        if index["version"] != _INDEX_VERSION or index["folder"] != os.path.realpath(folder):
            return None
        prefix = folder + os.sep
        for relative, mtime in index["folders"]:
            if os.stat(prefix + relative if relative else folder).st_mtime_ns != mtime:
                return None
        paths = [prefix + relative for relative in index["paths"]]
        classes = index["classes"]
        labels = [label for label, n in enumerate(index["counts"]) for _ in range(n)]
        if not classes:
            labels = [-1] * len(paths)
        if len(labels) != len(paths):
            return None
        return ImageFiles(paths, labels, classes), index["unsupported"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_index(
    places: list[Path],
    folder: str,
    files: ImageFiles,
    folders: dict[str, int],
    unsupported: dict[str, int],
) -> None:
    """Keep the listing at the first of ``places`` that can be written, atomically; not at all
    when a folder changed too recently to be sure of its timestamp."""
    now = time.time_ns()
    if any(now - mtime < _RACY_NS for mtime in folders.values()):
        return
    start = len(folder) + 1
    counts = Counter(files.labels)
    index: dict[str, Any] = {
        "version": _INDEX_VERSION,
        "folder": os.path.realpath(folder),
        "folders": [[path[start:], mtime] for path, mtime in folders.items()],
        "classes": files.classes,
        "counts": [counts[label] for label in range(len(files.classes))],
        "paths": [path[start:] for path in files.paths],
        "unsupported": unsupported,
    }
    atomic_write_first(places, json.dumps(index, separators=(",", ":")).encode())


def find_images(folder: str | Path, *, index_dir: str | Path | None = None) -> ImageFiles:
    """The images under ``folder``: one sub-folder per class, or the images directly in it.

    Class sub-folders that hold images (at any depth, following symbolic links) make the folder
    labelled (images directly in it are then ignored, as torchvision's ``ImageFolder`` does);
    otherwise its own images are unlabelled. Files with other suffixes are ignored, with one
    warning counting those in image formats that are not read (HEIC, AVIF, ...). A folder that
    cannot be listed, or a symbolic link to nothing, raises ``OSError`` naming it; no image at
    all raises ``FileNotFoundError``. The listing is kept in an index (see the module) and read
    back while no folder of the tree has changed.
    """
    folder = os.path.normpath(os.fspath(folder))
    places = _index_paths(folder, Path(index_dir) if index_dir is not None else None)
    for place in places:
        kept = _read_index(place, folder)
        if kept is not None:
            files, unsupported = kept
            break
    else:
        files, folders, unsupported = _list(folder)
        if files.paths:
            _write_index(places, folder, files, folders, unsupported)
    if unsupported:
        warnings.warn(
            f"{sum(unsupported.values())} files with unsupported suffixes "
            f"({', '.join(sorted(unsupported))}) ignored in {folder}; the suffixes read "
            f"are {', '.join(sorted(IMAGE_SUFFIXES))}",
            RuntimeWarning,
            stacklevel=2,
        )
    if not files.paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files
