"""Where the indexes of listings and shards are kept, and how one is sealed and opened.

An index only saves work: a listing or a shard set is always what the files say, and an
index is believed only as far as it is checked. It is kept where the user said
(``data.index_dir``), else in a per-user cache (``$XDG_CACHE_HOME/ssl-toolkit``, or
``~/.cache/ssl-toolkit``), never in a folder the user did not name, such as the parent of a
dataset on a team share. Each index carries a SHA-256 checksum of its content, so that an
edited or cut one is refused (with one warning naming it) rather than read.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from ssl_toolkit.checkpoint import atomic_write_first

__all__ = ["IndexRefused", "cache_dir", "index_folder", "keep_index", "open_index", "refused"]


class IndexRefused(ValueError):
    """An index that is not one this toolkit wrote intact: why, in a few words."""


def cache_dir() -> Path:
    """The per-user cache of indexes: ``$XDG_CACHE_HOME/ssl-toolkit`` (an absolute path, as the
    XDG specification asks), else ``~/.cache/ssl-toolkit``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "ssl-toolkit"


def index_folder(index_dir: str | Path | None) -> Path:
    """Where indexes are kept: ``index_dir`` (``data.index_dir``) when given, else
    :func:`cache_dir`."""
    return Path(index_dir) if index_dir is not None else cache_dir()


def _checksum(content: dict[str, Any]) -> str:
    text = json.dumps(content, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def keep_index(places: list[Path], content: dict[str, Any]) -> Path | None:
    """Write ``content`` with its checksum, atomically, at the first of ``places`` that can be
    written; where, or ``None`` (an index is only a shortcut)."""
    sealed = {"checksum": _checksum(content), **content}
    return atomic_write_first(places, json.dumps(sealed, separators=(",", ":")).encode())


def open_index(place: Path, version: int) -> dict[str, Any] | None:
    """The content of the index at ``place``; ``None`` when there is none, or one of another
    ``version`` (an older toolkit's, to be replaced). :class:`IndexRefused` for a file that
    cannot be read, is not JSON, or whose checksum does not match its content."""
    try:
        text = place.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise IndexRefused(f"it cannot be read ({error.strerror or error})") from None
    try:
        index = json.loads(text)
    except ValueError:
        raise IndexRefused("it is not JSON (cut short?)") from None
    if not isinstance(index, dict):
        raise IndexRefused("it is not an index")
    if index.get("version") != version:
        return None
    claimed = index.pop("checksum", None)
    if claimed != _checksum(index):
        raise IndexRefused("its checksum does not match its content (edited or cut short)")
    return index


def refused(place: Path, error: IndexRefused, instead: str) -> None:
    """One warning line: the index at ``place`` is not used, why, and what is done instead."""
    warnings.warn(f"ignoring the index {place}: {error}; {instead}", RuntimeWarning, stacklevel=3)
