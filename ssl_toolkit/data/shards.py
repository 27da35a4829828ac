"""WebDataset tar shards, read by sample index so that the exact-resume loader works on them.

A shard is a ``.tar`` of samples in the WebDataset layout: the members of a sample share a
key, ``key.jpg`` (or another image suffix) and, when labelled, ``key.cls`` (the class index as
text). ``wids`` (webdataset's indexed reader) opens a shard by memory-mapping it and indexing
its members, then hands out a sample's members by position, so that a sample is read by its
index like a file of a folder, and the batch order, sharding and exact resume of
:class:`~ssl_toolkit.data.loader.WorkerBatchLoader` hold unchanged. The order keeps each shard
to one process and worker (:class:`~ssl_toolkit.data.loader.ShardBatchSampler`), so every
shard is read front to back by one reader.

The samples and labels of every shard are kept in an index. ``scripts/make_shards.py``
writes ``.ssl-toolkit-shards.json`` into the folder of shards it makes (its own output); an
index made here for other shards is kept in ``data.index_dir``, else the per-user cache
(:mod:`~ssl_toolkit.data.indexes`), never beside them. An index is a hint: it is read only
when its checksum matches its content (else refused with one warning naming it, and the
shards indexed afresh) and it lists exactly these shards, each of the size and modification
time it had; every shard opened must then hold the samples the index says (their number
and a digest of their keys), and every sample read must carry the label the index gives it,
else :class:`StaleIndexError` names the
shard, the sample and the index, as a shard rewritten with the same size and time would
otherwise train mislabelled.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from braceexpand import braceexpand
from wids.wids import IndexedTarSamples

from ssl_toolkit.data.folders import BadImageError, DatasetNotFoundError, StaleIndexError
from ssl_toolkit.data.indexes import IndexRefused, index_folder, keep_index, open_index, refused
from ssl_toolkit.data.listing import IMAGE_SUFFIXES, INDEX_SUFFIX
from ssl_toolkit.data.splits import fixed_split

__all__ = [
    "SHARD_INDEX",
    "ShardFiles",
    "find_shards",
    "index_shards",
    "keep_shard_index",
    "read_shard_index",
    "shard_classes",
    "shard_split",
]

SHARD_INDEX = ".ssl-toolkit-shards.json"
"""The name of the shard index in a folder of shards."""
_INDEX_VERSION = 3
_OPEN_SHARDS = 4  # per process: a reader's current shard and the few before it


def find_shards(root: str) -> list[str]:
    """The shards ``root`` names: every ``.tar`` in a folder (sorted), or the expansion of a
    brace pattern such as ``data/train-{000000..000146}.tar``. A missing folder, shard or an
    empty folder raises :class:`DatasetNotFoundError` naming it."""
    if os.path.isdir(root):
        shards = sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".tar"))
        if not shards:
            raise DatasetNotFoundError(f"data.root={root!r} holds no .tar shards")
        return shards
    shards = list(braceexpand(root))
    missing = [shard for shard in shards if not os.path.isfile(shard)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetNotFoundError(
            f"data.root={root!r}: the shard {missing[0]} does not exist{more}; data.root is a "
            "folder of .tar shards or a brace pattern of them"
        )
    return shards


def _open(path: str) -> IndexedTarSamples:
    """The shard at ``path``, indexed; wids's own prints about odd members are kept quiet."""
    with contextlib.redirect_stdout(io.StringIO()):
        return IndexedTarSamples(path=path)


def _member_suffix(name: str) -> str:
    """What a member is (``.jpg``, ``.cls``, ...): its name's last suffix, lower-cased."""
    return name[name.rfind(".") :].lower()


def _key(name: str) -> str:
    """The sample key of a member, by the WebDataset rule that ``wids`` groups members by: its
    name up to the first dot after the last slash (``s0.v1.jpg`` is a member of ``s0``)."""
    dot = name.find(".", name.rfind("/") + 1)
    return name if dot < 0 else name[:dot]


def _label(shard: IndexedTarSamples, member: int, where: str) -> int:
    """The class index in the ``.cls`` member ``member``: a whole number >= 0."""
    text = shard.reader.get_at_index(member)[1]
    try:
        label = int(text.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise DatasetNotFoundError(
            f"{where}: the label {bytes(text[:20])!r} is not a whole number (a .cls member "
            "holds the class index as text)"
        ) from None
    if label < 0:
        raise DatasetNotFoundError(
            f"{where}: the label {label} is negative; a .cls member holds the class index, "
            "0, 1, ..."
        )
    return label


def _shard_entry(path: str) -> dict[str, Any]:
    """What the index keeps of one shard: its size and time (to know it unchanged), its
    samples, and their labels (-1 without a ``.cls`` member). A sample with two images or two
    labels (members that one key holds, as ``s0.v0.jpg`` and ``s0.v1.jpg``), a key that comes
    back after other samples, or a label that is not a whole number >= 0 raises
    :class:`DatasetNotFoundError` naming ``SHARD:KEY``: read on, the sample would lose an
    image or a label without a word."""
    stat = os.stat(path)
    shard = _open(path)
    try:
        labels, keys, seen = [], [], set()
        for members in shard.samples:
            names = [shard.reader.by_index[member][0] for member in members]
            key = _key(names[0])
            keys.append(key)
            where = f"{path}:{key}"
            if key in seen:
                raise DatasetNotFoundError(
                    f"{where}: the key comes back after other samples; a sample's members "
                    "must follow each other in the shard"
                )
            seen.add(key)
            images = [name for name in names if _member_suffix(name) in IMAGE_SUFFIXES]
            classes = [
                m for m, n in zip(members, names, strict=True) if _member_suffix(n) == ".cls"
            ]
            if len(images) > 1 or len(classes) > 1:
                what = f"{len(images)} images" if len(images) > 1 else f"{len(classes)} labels"
                raise DatasetNotFoundError(
                    f"{where}: one sample with {what} ({', '.join(names)}): a key ends at the "
                    "first dot after the last slash (the WebDataset rule), so these members are "
                    "one sample; give every image its own key, without dots"
                )
            labels.append(_label(shard, classes[0], where) if classes else -1)
    finally:
        shard.close()
    return {
        "size": stat.st_size,
        "mtime": stat.st_mtime_ns,
        "labels": labels,
        "keys": _keys_digest(keys),
    }


def _keys_digest(keys: Sequence[str]) -> str:
    """A digest of a shard's sample keys in order: what the index keeps of them, as a key per
    sample would cost more memory than the samples' labels, and is checked when the shard is
    opened."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def _shard_keys(shard: IndexedTarSamples) -> list[str]:
    """The sample keys of an open shard, in order."""
    return [_key(shard.reader.by_index[members[0]][0]) for members in shard.samples]


def _index_places(shards: Sequence[str], index_dir: str | Path | None) -> list[Path]:
    """Where the index of ``shards`` may be, in order: the :data:`SHARD_INDEX` that
    ``make_shards.py`` wrote beside them (when they are all the shards of their folder), then
    the one kept in ``index_dir`` (else the per-user cache), the last place, where an index
    made here is kept: never the shards' own folder."""
    real = [os.path.realpath(shard) for shard in shards]
    folder = os.path.dirname(real[0])
    digest = hashlib.sha256("\n".join(real).encode()).hexdigest()[:16]
    kept = index_folder(index_dir) / f"shards-{digest}{INDEX_SUFFIX}"
    whole = sorted(real) == sorted(
        os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".tar")
    )
    return [Path(folder) / SHARD_INDEX, kept] if whole else [kept]


def _names(shards: Sequence[str]) -> list[str]:
    """The shards' file names, which key the index (so that the folder may move)."""
    names = [os.path.basename(shard) for shard in shards]
    if len(set(names)) != len(names):
        raise DatasetNotFoundError(
            f"shards of the same name in different folders ({shards[0]}, ...): give each "
            "shard its own name"
        )
    return names


def _check_entries(index: dict[str, Any], names: list[str]) -> None:
    """:class:`IndexRefused` unless ``index`` has class names (or none) and, for each of
    ``names``, a size, a time and a list of labels (each -1 or a whole number)."""
    classes, entries = index.get("classes"), index.get("shards")
    if classes is not None and not (
        isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    ):
        raise IndexRefused("its classes are not a list of names")
    if not isinstance(entries, dict):
        raise IndexRefused("it lists no shards")
    for name in names:
        entry = entries.get(name)
        if not isinstance(entry, dict) or not all(
            type(entry.get(key)) is int for key in ("size", "mtime")
        ):
            raise IndexRefused(f"its entry of {name} has no size and time")
        if not isinstance(entry.get("keys"), str):
            raise IndexRefused(f"its entry of {name} has no digest of the sample keys")
        labels = entry.get("labels")
        if not isinstance(labels, list) or not all(
            type(label) is int and label >= -1 for label in labels
        ):
            raise IndexRefused(f"the labels of {name} are not -1 or class numbers")


def read_shard_index(
    places: Sequence[Path], shards: Sequence[str]
) -> tuple[dict[str, Any], Path] | None:
    """The first index at ``places`` that describes exactly ``shards``, each of the size and
    modification time it had when indexed, and where it is; ``None`` if there is none. An
    index that is not intact (see :func:`~ssl_toolkit.data.indexes.open_index`) or not
    well-formed is passed over with one warning naming it."""
    names = _names(shards)
    for place in places:
        try:
            index = open_index(place, _INDEX_VERSION)
            if index is None or sorted(index.get("shards") or {}) != sorted(names):
                continue
            _check_entries(index, names)
        except IndexRefused as error:
            refused(place, error, "indexing the shards afresh")
            continue
        entries = index["shards"]
        try:
            current = all(
                (stat := os.stat(shard)).st_size == entries[name]["size"]
                and stat.st_mtime_ns == entries[name]["mtime"]
                for shard, name in zip(shards, names, strict=True)
            )
        except OSError:
            continue
        if current:
            return index, place
    return None


def index_shards(
    shards: Sequence[str],
    classes: list[str] | None = None,
    progress: Any = None,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """The index of ``shards``: each one's samples and labels; ``classes`` names the labels.
    ``progress()`` is called after each shard. A shard that cannot be indexed raises
    :class:`DatasetNotFoundError` naming it; with ``skip_bad`` it is left out of the index
    (listed under ``"skipped"`` with its reason) instead. A sample laid out wrongly (see
    :func:`_shard_entry`) is an error even with ``skip_bad``: a whole shard would go."""
    entries, skipped = {}, {}
    for shard, name in zip(shards, _names(shards), strict=True):
        try:
            entries[name] = _shard_entry(shard)
        except DatasetNotFoundError:
            raise
        except Exception as error:  # headers that do not parse
            reason = f"it is not a readable WebDataset tar ({type(error).__name__}: {error})"
            if not skip_bad:
                raise DatasetNotFoundError(f"cannot index the shard {shard}: {reason}") from error
            skipped[shard] = reason
        if progress is not None:
            progress()
    index = {"version": _INDEX_VERSION, "classes": classes, "shards": entries}
    return index | ({"skipped": skipped} if skipped else {})


def keep_shard_index(places: Sequence[Path], index: dict[str, Any]) -> Path | None:
    """Write ``index`` with its checksum, atomically, at the first of ``places`` that can be
    written; where (``None`` if nowhere)."""
    return keep_index(list(places), index)


def _index(
    shards: list[str], index_dir: str | Path | None, skip_bad: bool
) -> tuple[dict[str, Any], Path | None]:
    """The index of ``shards`` and where it is kept: the one kept, or one made now (with a
    progress bar) and kept in ``index_dir`` (else the per-user cache); one that leaves out
    unreadable shards (``skip_bad``) says so and is not kept, so that a run without
    ``skip_bad`` meets them again."""
    from rich.progress import Progress

    places = _index_places(shards, index_dir)
    found = read_shard_index(places, shards)
    if found is not None:
        return found
    with Progress(transient=True) as bar:
        task = bar.add_task(f"indexing {len(shards)} shards", total=len(shards))
        index = index_shards(shards, progress=lambda: bar.advance(task), skip_bad=skip_bad)
    skipped = index.get("skipped", {})
    place = None
    if not skipped:
        place = keep_shard_index(places[-1:], index)
    elif len(skipped) == len(shards):
        raise DatasetNotFoundError(
            f"data.skip_bad=true, but none of the {len(shards)} shards can be read "
            f"({next(iter(skipped))}: {next(iter(skipped.values()))})"
        )
    else:
        shown = "; ".join(f"{shard}: {why}" for shard, why in list(skipped.items())[:3])
        warnings.warn(
            f"data.skip_bad=true: {len(skipped)} of {len(shards)} shards cannot be read "
            f"and are left out ({shown}{'; ...' if len(skipped) > 3 else ''})",
            RuntimeWarning,
            stacklevel=2,
        )
    return index, place


class ShardFiles:
    """The samples of some tar shards, by index: labels (-1 when unlabelled), class names, and
    :meth:`read` to read one's image; ``index`` is their :func:`index_shards`, kept at
    ``where`` (named when a shard disagrees with it)."""

    def __init__(self, shards: list[str], index: dict[str, Any], where: Path | None) -> None:
        self.shards = shards
        self.where = where
        entries = [index["shards"][name] for name in _names(shards)]
        labels = [entry["labels"] for entry in entries]
        self.keys = [entry["keys"] for entry in entries]  # a digest per shard
        sizes = np.array([len(shard_labels) for shard_labels in labels], dtype=np.int64)
        self.counts = sizes  # samples per shard, as indexed
        shard_of = np.repeat(np.arange(len(shards), dtype=np.int32), sizes)
        inner = np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(
            np.cumsum(sizes) - sizes, sizes
        )
        flat = [label for shard_labels in labels for label in shard_labels]
        self.shard_of, self.inner = shard_of, inner.astype(np.int32)
        self.labels: list[int] = flat
        # Without class names, as many classes as distinct labels (never the largest label,
        # which may be any number): shard_classes checks that the labels fit them.
        count = len({label for label in flat if label >= 0})
        self.classes: list[str] = index.get("classes") or [str(c) for c in range(count)]
        self._open: OrderedDict[int, IndexedTarSamples | DatasetNotFoundError] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labelled(self) -> bool:
        """True when the samples have labels."""
        return bool(self.classes)

    def subset(self, keep: Sequence[int]) -> ShardFiles:
        """The samples at the sorted positions ``keep`` of these."""
        other = object.__new__(ShardFiles)
        other.shards, other.classes = self.shards, self.classes
        other.where, other.counts, other.keys = self.where, self.counts, self.keys
        keep = np.asarray(keep, dtype=np.int64)
        other.shard_of, other.inner = self.shard_of[keep], self.inner[keep]
        other.labels = [self.labels[i] for i in keep.tolist()]
        other._open, other._pid = OrderedDict(), os.getpid()
        return other

    def groups(self) -> list[np.ndarray]:
        """The positions of the samples of each shard (that has any), shard by shard: the
        units that :class:`~ssl_toolkit.data.loader.ShardBatchSampler` hands to one reader."""
        order = np.argsort(self.shard_of, kind="stable")
        bounds = np.cumsum(np.bincount(self.shard_of, minlength=len(self.shards)))
        return [g for g in np.split(order, bounds[:-1]) if len(g)]

    def __getstate__(self) -> dict[str, Any]:
        # Open shards (memory maps) stay in the process that opened them.
        return {**self.__dict__, "_open": OrderedDict()}

    def _shard(self, number: int) -> IndexedTarSamples:
        if self._pid != os.getpid():  # a worker forked with the parent's open shards
            self._open, self._pid = OrderedDict(), os.getpid()
        shard = self._open.get(number)
        if shard is None:
            path = self.shards[number]
            try:
                shard = _open(path)
            except Exception as error:  # a shard whose headers do not parse
                reason = f"it is not a readable tar file ({type(error).__name__}: {error})"
                shard = BadImageError(path, reason)
            if not isinstance(shard, BadImageError) and len(shard.samples) != self.counts[number]:
                shard.close()
                shard = StaleIndexError(
                    f"{path} holds {len(shard.samples)} samples, but its index {self.where} "
                    f"lists {self.counts[number]}: {self._stale}"
                )
            elif not isinstance(shard, Exception) and (
                _keys_digest(_shard_keys(shard)) != self.keys[number]
            ):
                shard.close()
                shard = StaleIndexError(
                    f"{path}: its samples' keys are not the ones its index {self.where} "
                    f"lists: {self._stale}"
                )
            self._open[number] = shard
            if len(self._open) > _OPEN_SHARDS:
                _, closed = self._open.popitem(last=False)
                if not isinstance(closed, Exception):
                    closed.close()
        self._open.move_to_end(number)
        if isinstance(shard, Exception):
            raise shard
        return shard

    @property
    def _stale(self) -> str:
        """What a shard that disagrees with the index means, and what to do."""
        return (
            "the index is stale (the shard changed since it was indexed); delete the index "
            "to index the shards afresh"
        )

    def read(self, index: int) -> tuple[bytes, str, str]:
        """Sample ``index``'s image member: its bytes, ``shard:member`` and its suffix (what
        :func:`~ssl_toolkit.data.folders.decode_bytes` takes). :class:`BadImageError` naming
        the shard and member for a sample that is missing, cut short or has no image member;
        :class:`StaleIndexError` for one whose label is not the index's."""
        path, inner = self.shards[int(self.shard_of[index])], int(self.inner[index])
        shard = self._shard(int(self.shard_of[index]))
        if inner >= len(shard.samples):
            raise BadImageError(
                f"{path}:#{inner}", f"the shard has {len(shard.samples)} samples, not {inner + 1}"
            )
        size = len(shard.reader.mmapped_file)
        members = [shard.reader.by_index[m] for m in shard.samples[inner]]
        images = [m for m in members if _member_suffix(m[0]) in IMAGE_SUFFIXES]
        if not images:
            names = ", ".join(name for name, _, _ in members)
            raise BadImageError(f"{path}:{names}", "the sample has no image member")
        name, offset, length = images[0]
        where = f"{path}:{name}"
        numbers = shard.samples[inner]
        cls = [
            m for m, (n, _, _) in zip(numbers, members, strict=True) if _member_suffix(n) == ".cls"
        ]
        label = _label(shard, cls[0], where) if cls else -1
        if label != self.labels[index]:
            raise StaleIndexError(
                f"{path}:{_key(name)}: the shard labels it {label}, its index {self.where} "
                f"{self.labels[index]}: {self._stale}"
            )
        if offset + 512 + length > size:
            raise BadImageError(where, "the shard ends inside it (a truncated shard)")
        return (
            shard.reader.mmapped_file[offset + 512 : offset + 512 + length],
            where,
            (_member_suffix(name)),
        )


def _sample_name(files: ShardFiles, position: int) -> str:
    """``SHARD:KEY`` of the sample at ``position`` of ``files``, for an error (the index keeps
    only a digest of the keys: the shard is opened again to read it)."""
    path, inner = files.shards[int(files.shard_of[position])], int(files.inner[position])
    try:
        shard = _open(path)
        try:
            return f"{path}:{_key(shard.reader.by_index[shard.samples[inner][0]][0])}"
        finally:
            shard.close()
    except Exception:  # changed since it was indexed: its place in the shard says it
        return f"{path}:#{inner}"


def shard_classes(files: ShardFiles, num_classes: int | None = None) -> list[str]:
    """The class names of ``files``, once every label is checked to be one of them: the
    index's names (``make_shards.py``), ``num_classes`` numbered ones when it is declared
    (``data.num_classes``), else one per distinct label, which must then be 0..K-1. Every
    sample is labelled or none is. A label that breaks this raises
    :class:`DatasetNotFoundError` naming ``SHARD:KEY``, before a run trains to fail at its
    probes (or to allocate a class count of the largest label)."""
    labels = np.asarray(files.labels, dtype=np.int64)
    names = files.classes
    numbered = names == [str(c) for c in range(len(names))]  # no names, or names of numbers
    if num_classes is not None and len(names) != num_classes:
        if names and not numbered:
            raise DatasetNotFoundError(
                f"data.num_classes={num_classes}, but the index of the shards "
                f"({files.shards[0]}, ...) names {len(names)} classes ({', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''}): leave data.num_classes unset"
            )
        names = [str(c) for c in range(num_classes)]
    if not len(labels) or (not names and (labels == -1).all()):
        return names
    if (labels == -1).any():
        where = _sample_name(files, int(np.argmax(labels == -1)))
        raise DatasetNotFoundError(
            f"{where}: the sample has no label (.cls member), but the shards have "
            f"{len(names)} classes: label every sample or none"
        )
    wrong = (labels < 0) | (labels >= len(names))
    if wrong.any():
        position = int(np.argmax(wrong))
        if num_classes is not None:
            allowed = f"data.num_classes={num_classes} allows 0..{num_classes - 1}"
        elif numbered:
            allowed = (
                f"the labels count {len(names)} classes, which are 0..{len(names) - 1}: number "
                "the classes from 0 without gaps, or declare their number in data.num_classes"
            )
        else:
            allowed = f"the index names {len(names)} classes, 0..{len(names) - 1}"
        raise DatasetNotFoundError(
            f"{_sample_name(files, position)}: the label {labels[position]} is not a class; "
            f"{allowed}"
        )
    return names


def shard_split(
    root: str, train: bool, index_dir: str | Path | None, skip_bad: bool = False
) -> ShardFiles:
    """The samples of one split of the shards at ``root``: its ``train/`` and ``val/`` folders
    of shards when it has both (``val/`` with ``train/``'s class names), else all its shards,
    labelled ones split 80/20 per class with the fixed seed that image folders use. With
    ``skip_bad``, shards that cannot be read are left out with a warning."""

    def files(where: str) -> ShardFiles:
        shards = find_shards(where)
        index, place = _index(shards, index_dir, skip_bad)
        names = _names(shards)
        return ShardFiles(
            [s for s, n in zip(shards, names, strict=True) if n in index["shards"]], index, place
        )

    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        chosen = files(train_dir if train else val_dir)
        if not train:
            chosen.classes = files(train_dir).classes
        return chosen
    chosen = files(train_dir if os.path.isdir(train_dir) else root)
    if not chosen.labelled:
        return chosen
    return chosen.subset(fixed_split(torch.tensor(chosen.labels), train).tolist())
