"""Listing the images of a folder fast, at a million files, and keeping the listing as a hint.

An ImageNet-sized folder holds 1.28 M files in 1,000 class folders. :func:`find_images` lists
it with ``os.scandir``, whose entries know whether they are files or folders without a stat
per file, and keeps paths as strings (a ``Path`` object per file costs more than the listing).

The folder is the truth: every start walks the tree again, as modification times prove
nothing (``touch -r``, ``tar x`` and ``rsync -a`` add or move images and put the folders' old
times back). The sorted listing is kept in an index (``data.index_dir``, else the per-user
cache: see :mod:`~ssl_toolkit.data.indexes`), with a checksum of its content; it is used only
when every path in it is relative and inside the folder (no ``..``), its class counts add up
(checked before anything is built from them), every image lies in its class's folder, and each
class holds exactly the images the walk found. An index that fails a check of its own is
refused with one warning naming it; one that no longer matches the folder is replaced
silently. What it still saves is the sort of each class's paths in ``Path`` order: as costly
as the walk when class folders hold sub-folders (a sort by components), a few per cent of it
for flat ones, where a start from the index, checks included, takes as long as listing afresh
(0.25 s for 50,000 files in 1,000 folders either way, against 0.02 s when folder times were
trusted). File sizes are not compared: they do not change the listing, and a stat per file
would triple the time of every start.

A run directory of this toolkit (a folder holding its ``.run.lock``, or ``config.yaml``
beside ``checkpoints/``) is never data: it is left out with everything under it, so that a run
written inside an image folder does not train the next run on its report pictures.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_toolkit.data.indexes import IndexRefused, index_folder, keep_index, open_index, refused
from ssl_toolkit.run_lock import LOCK_FILE

__all__ = [
    "IMAGE_SUFFIXES",
    "INDEX_SUFFIX",
    "ImageFiles",
    "find_images",
    "warn_if_run_inside",
]

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
_INDEX_VERSION = 2
# What cannot be in paths joined between separators (see _unsafe): an empty path or component
# (or an absolute path), a "." or ".." component, a NUL.
_UNSAFE_PARTS = ("//", "/./", "/../", "\x00")
# The files that make a folder a run directory of this toolkit.
_RUN_MARKERS = frozenset({LOCK_FILE, "config.yaml", "checkpoints"})


@dataclass(frozen=True)
class ImageFiles:
    """The images of a folder: paths (strings), labels (-1 when unlabelled), class names, and
    the folder ``root`` that holds the class folders (each image lies in its class's)."""

    paths: list[str]
    labels: list[int]
    classes: list[str]
    root: str

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


def _run_directory(entries: list[os.DirEntry[str]]) -> bool:
    """True for the entries of a run directory: our lock, or ``config.yaml`` and
    ``checkpoints/``."""
    found = {entry.name: entry for entry in entries if entry.name in _RUN_MARKERS}
    if LOCK_FILE in found:
        return True
    return "config.yaml" in found and "checkpoints" in found and found["checkpoints"].is_dir()


def _real(entry: os.DirEntry[str], folder_real: str) -> str:
    """The real path of the folder ``entry`` in the folder whose real path is ``folder_real``:
    resolved only for a symbolic link (a folder's own entry is where it says)."""
    if entry.is_symlink():
        return os.path.realpath(entry.path)
    return os.path.join(folder_real, entry.name)


def _walk(folder: str, real: str, found: _Found, outer: frozenset[str]) -> None:
    """Every file under ``folder`` (real path ``real``) at any depth into ``found``, following
    symbolic links to folders (``outer``: the real paths of the folders around it, so that a
    link back into them is an error); a run directory is left out."""
    if real in outer:
        raise OSError(f"cannot read {folder}: a symbolic link back into a folder around it")
    entries = _entries(folder)
    if _run_directory(entries):
        return
    found.folders += 1
    around = outer | {real}
    for entry in entries:
        if entry.is_dir():
            _walk(entry.path, _real(entry, real), found, around)
        elif entry.is_file():
            found.add(entry)


@dataclass
class _Tree:
    """What a walk of a folder found, unsorted: its own images and those under each of its
    sub-folders, and the count of files in each unsupported image format."""

    own: _Found
    under: dict[str, _Found]

    @property
    def classes(self) -> list[str]:
        """The sub-folders that hold images, sorted: the classes."""
        return sorted(name for name, found in self.under.items() if found.images)

    def unsupported(self) -> dict[str, int]:
        """Files in unsupported image formats, by suffix (those directly in a labelled folder
        count too)."""
        return dict(sum((found.unsupported for found in self.under.values()), self.own.unsupported))


def _walk_tree(folder: str) -> _Tree:
    """The walk of ``folder``: its own files, then each sub-folder's (run directories left
    out)."""
    entries = _entries(folder)
    own = _Found()
    for entry in entries:
        if entry.is_file():
            own.add(entry)
    real = os.path.realpath(folder)
    under: dict[str, _Found] = {}
    for entry in entries:
        if entry.is_dir():
            under[entry.name] = _Found()
            _walk(entry.path, _real(entry, real), under[entry.name], frozenset({real}))
    return _Tree(own, under)


def _sorted_listing(folder: str, tree: _Tree) -> ImageFiles:
    """The listing of a walk: classes in name order, each one's images in ``Path`` order."""
    classes = tree.classes
    if not classes:
        paths = tree.own.sorted_images()
        return ImageFiles(paths, [-1] * len(paths), [], folder)
    paths, labels = [], []
    for label, name in enumerate(classes):
        images = tree.under[name].sorted_images()
        paths += images
        labels += [label] * len(images)
    return ImageFiles(paths, labels, classes, folder)


def _index_path(folder: str, index_dir: str | Path | None) -> Path:
    """Where the index of ``folder`` is kept: named by a digest of its real path."""
    digest = hashlib.sha256(os.path.realpath(folder).encode()).hexdigest()[:16]
    return index_folder(index_dir) / f"listing-{digest}{INDEX_SUFFIX}"


def _unsafe(paths: list[str]) -> str | None:
    """The first of ``paths`` that is not a plain relative path inside the folder (absolute,
    empty, with an empty, ``.`` or ``..`` component, a NUL or a line break); ``None`` when all
    are plain. The paths are checked at once, as one string of components (POSIX paths)."""
    if not paths:
        return None
    joined = "\n".join(paths)
    if joined.count("\n") != len(paths) - 1:
        return next(path for path in paths if "\n" in path)
    # Every path between separators: "//" is an empty path or component, or an absolute path.
    parts = "/" + joined.replace("\n", "/") + "/"
    found = [parts.find(bad) for bad in _UNSAFE_PARTS]
    if max(found) < 0:
        return None
    at = min(where for where in found if where >= 0)  # parts[i + 1] is joined[i]
    return paths[joined.count("\n", 0, at)]


def _checked(index: dict[str, Any], folder: str) -> tuple[list[str], list[int], list[str]]:
    """The classes, counts and relative paths of ``index`` once its own checks pass (types,
    lengths before anything is built from them, plain paths inside the folder);
    :class:`IndexRefused` saying which failed."""
    if index.get("folder") != os.path.realpath(folder):
        raise IndexRefused(f"it lists {index.get('folder')!r}, not {folder}")
    classes, counts, paths = index.get("classes"), index.get("counts"), index.get("paths")
    if not isinstance(paths, list) or not isinstance(classes, list):
        raise IndexRefused("its paths or classes are not lists")
    if not isinstance(counts, list) or not all(type(n) is int and n >= 0 for n in counts):
        raise IndexRefused("its counts are not a list of whole numbers")
    if len(counts) != len(classes) or (classes and sum(counts) != len(paths)):
        raise IndexRefused(
            f"its {len(counts)} counts adding up to {sum(counts)} do not fit its "
            f"{len(classes)} classes and {len(paths)} paths"
        )
    try:
        unsafe = _unsafe(paths) or _unsafe(classes)
    except TypeError:  # joined, they hold something other than a string
        raise IndexRefused("its paths or classes are not all strings") from None
    if unsafe is not None:
        raise IndexRefused(f"{unsafe!r} is not a relative path inside {folder} (without ..)")
    return classes, counts, paths


def _stray(classes: list[str], counts: list[int], paths: list[str]) -> None:
    """:class:`IndexRefused` naming an image that the index lists outside its class's folder
    (counts or classes edited), or in a sub-folder of an unlabelled folder."""
    start = 0
    for name, count in zip(classes, counts, strict=True):
        prefix = name + os.sep
        stray = next((p for p in paths[start : start + count] if not p.startswith(prefix)), None)
        if stray is not None:
            raise IndexRefused(f"it lists {stray!r} in the class {name!r}")
        start += count
    if not classes and any(os.sep in path for path in paths):
        raise IndexRefused("it lists images in sub-folders of an unlabelled folder")


def _same_images(paths: list[str], counts: list[int], found: list[list[str]]) -> bool:
    """True when each run of ``counts[i]`` of ``paths`` holds exactly the images ``found[i]``."""
    start = 0
    for images, count in zip(found, counts, strict=True):
        if count != len(images) or set(paths[start : start + count]) != set(images):
            return False
        start += count
    return True


def _from_index(index: dict[str, Any], folder: str, tree: _Tree) -> ImageFiles | None:
    """The listing kept in ``index`` when it passes its checks (:class:`IndexRefused` if not)
    and each class holds exactly the images of the walk ``tree``; ``None`` when the folder
    changed since."""
    classes, counts, relative = _checked(index, folder)
    prefix = folder + os.sep
    paths = [prefix + path for path in relative]
    if classes != tree.classes:
        matches = False
    elif classes:
        matches = _same_images(paths, counts, [tree.under[name].images for name in classes])
    else:
        matches = _same_images(paths, [len(paths)], [tree.own.images])
    if not matches:  # not the walk's listing: edited, or the folder changed since
        _stray(classes, counts, relative)
        return None
    if not classes:
        return ImageFiles(paths, [-1] * len(paths), [], folder)
    labels: list[int] = []
    for label, count in enumerate(counts):
        labels += [label] * count
    return ImageFiles(paths, labels, classes, folder)


def _keep(place: Path, folder: str, files: ImageFiles) -> None:
    """Keep the listing ``files`` of ``folder`` in an index at ``place``."""
    start = len(folder) + 1
    counts = Counter(files.labels)
    content: dict[str, Any] = {
        "version": _INDEX_VERSION,
        "folder": os.path.realpath(folder),
        "classes": files.classes,
        "counts": [counts[label] for label in range(len(files.classes))],
        "paths": [path[start:] for path in files.paths],
    }
    keep_index([place], content)


def find_images(folder: str | Path, *, index_dir: str | Path | None = None) -> ImageFiles:
    """The images under ``folder``: one sub-folder per class, or the images directly in it.

    Class sub-folders that hold images (at any depth, following symbolic links) make the folder
    labelled (images directly in it are then ignored, as torchvision's ``ImageFolder`` does);
    otherwise its own images are unlabelled. Files with other suffixes are ignored, with one
    warning counting those in image formats that are not read (HEIC, AVIF, ...); run
    directories are left out. A folder that cannot be listed, or a symbolic link to nothing,
    raises ``OSError`` naming it; no image at all raises ``FileNotFoundError``. The sorted
    listing is kept in an index in ``index_dir`` (else the per-user cache) and read back when
    it matches the walk (see the module).
    """
    folder = os.path.normpath(os.fspath(folder))
    tree = _walk_tree(folder)
    place = _index_path(folder, index_dir)
    files = None
    try:
        index = open_index(place, _INDEX_VERSION)
        if index is not None:
            files = _from_index(index, folder, tree)
    except IndexRefused as error:
        refused(place, error, f"listing {folder} afresh")
    if files is None:
        files = _sorted_listing(folder, tree)
        if files.paths:
            _keep(place, folder, files)
    unsupported = tree.unsupported()
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


def warn_if_run_inside(run_dir: str | Path, root: str | Path | None) -> None:
    """One warning when the run directory ``run_dir`` is inside ``root`` (``data.root``; the
    config refuses the two the same), real paths: listings leave run directories out, but
    other tools would take its checkpoints and pictures for data."""
    if root is None:
        return
    run, data = os.path.realpath(run_dir), os.path.realpath(root)
    if os.path.commonpath([run, data]) == data:
        warnings.warn(
            f"trainer.output_dir={str(run_dir)!r} is inside data.root={str(root)!r}: the run "
            "directory is never listed as data, but keep runs out of the data folder",
            RuntimeWarning,
            stacklevel=2,
        )
