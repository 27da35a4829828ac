"""Reading an offline W&B run back: the history rows of its ``.wandb`` files.

Tests and scripts use :func:`read_offline_history` to check what was logged without a W&B
server; :func:`run_file_complete` tells when a finished run's file has been flushed.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["read_offline_history", "read_offline_summary", "run_file_complete"]

# The .wandb transaction log uses LevelDB's log format: a 7-byte file header, then 32 KiB
# blocks of records, each with a 7-byte header (CRC-32 of type byte + payload, length, type);
# payloads are serialised wandb ``Record`` protobufs, possibly split over several records.
_FILE_HEADER = struct.Struct("<4sHB")
_FILE_IDENT, _FILE_MAGIC, _FILE_VERSION = b":W&B", 0xBEE1, 0
_RECORD_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _iter_payloads(data: bytes, path: Path, start: int = 0) -> Iterator[bytes]:
    """Yield the payloads in a ``.wandb`` file's bytes; stop at a truncated tail.

    ``start`` is 0 (the whole file, header checked) or a block boundary, for reading only the
    end of a large file; fragments of a record that began before ``start`` are skipped.
    """
    if start == 0:
        header = data[: _FILE_HEADER.size]
        if len(header) < _FILE_HEADER.size or _FILE_HEADER.unpack(header) != (
            _FILE_IDENT,
            _FILE_MAGIC,
            _FILE_VERSION,
        ):
            raise ValueError(f"{path} is not a W&B transaction log (.wandb file)")
    pos = max(start, _FILE_HEADER.size)
    pending: bytearray | None = None
    while pos + _RECORD_HEADER.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD_HEADER.size:
            pos += left_in_block  # block trailer padding
            continue
        checksum, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        begin = pos + _RECORD_HEADER.size
        payload = data[begin : begin + length]
        if kind == 0 or len(payload) < length:
            return  # pre-allocated zeros or a write cut short: the log ends here
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != checksum:
            raise ValueError(f"{path}: checksum mismatch in the record at byte {pos}")
        pos = begin + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pending = bytearray(payload)
        elif kind == _MIDDLE and pending is not None:
            pending += payload
        elif kind == _LAST and pending is not None:
            yield bytes(pending + payload)
            pending = None


def _records(path: Path, start: int = 0) -> Iterator[Any]:
    """Parse the ``Record`` protobufs of a ``.wandb`` file, from ``start`` (a block boundary)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    # Offsets inside ``data`` must keep their position relative to the 32 KiB blocks.
    padded = bytes(start) + data if start else data
    for payload in _iter_payloads(padded, path, start):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def run_file_complete(path: Path) -> bool:
    """True once the run's exit record is in its ``.wandb`` file (the run was finished and the
    service flushed the file). Reads only the last two blocks, since the exit record is the last
    one written and is small.
    """
    try:
        size = path.stat().st_size
        start = max(0, (size - 1) // _BLOCK - 1) * _BLOCK
        return any(r.WhichOneof("record_type") == "exit" for r in _records(path, start))
    except (OSError, ValueError):
        return False


def _history_row(history: Any) -> dict[str, Any]:
    """Decode a ``HistoryRecord``: keys such as ``a/b`` stay flat, nested values (histograms)
    become dicts, e.g. ``row["lars/trust_ratio_hist"] == {"_type": "histogram", ...}``."""
    row: dict[str, Any] = {}
    for item in history.item:
        path = list(item.nested_key) or [item.key]
        node = row
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return row


def read_offline_history(run_dir: Path) -> list[dict[str, Any]]:
    """Return the history rows (one dict per ``log`` call) of the offline W&B runs in ``run_dir``.

    ``run_dir`` is a directory searched recursively for ``.wandb`` files, or one such file. A
    resumed run has one file per session; sessions are ordered by the ``_timestamp`` of their
    first row (directory names only have one-second resolution). Each row maps metric names to
    decoded JSON values and includes W&B's ``_step``, ``_runtime`` and ``_timestamp``. Raises
    ``FileNotFoundError`` if there is no ``.wandb`` file.
    """
    sessions = []
    for path in _run_files(run_dir):
        rows = [
            _history_row(r.history)
            for r in _records(path)
            if r.WhichOneof("record_type") == "history"
        ]
        if rows:
            sessions.append(rows)
    sessions.sort(key=lambda rows: rows[0].get("_timestamp", 0.0))
    return [row for rows in sessions for row in rows]


def _run_files(run_dir: Path) -> list[Path]:
    """``run_dir`` itself if it is a ``.wandb`` file, else the ones under it."""
    run_dir = Path(run_dir)
    files = (
        [run_dir] if run_dir.is_file() else sorted({p.resolve() for p in run_dir.rglob("*.wandb")})
    )
    if not files:
        raise FileNotFoundError(f"no W&B run file (*.wandb) under {run_dir}")
    return files


def read_offline_summary(run_dir: Path) -> dict[str, Any]:
    """The run summary of the offline W&B runs in ``run_dir``: every summary key's last value
    (``knn/top1`` is ``{"max": ...}`` since the logger asks W&B for the best in each session;
    ``knn/best`` is the best over every session). Sessions of a resumed run are read in
    file-name (start-time) order."""
    summary: dict[str, Any] = {}
    for path in _run_files(run_dir):
        for record in _records(path):
            if record.WhichOneof("record_type") != "summary":
                continue
            for item in record.summary.update:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                summary[key] = json.loads(item.value_json)
    return summary
