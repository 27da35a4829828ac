"""Weights & Biases logging that never stops training.

:class:`WandbLogger` owns one W&B run stored under the experiment's run directory. Every metric
is logged together with ``global_step``, the x-axis of the ``train/*``, ``lars/*`` and ``knn/*``
panels (W&B's own ``_step`` only counts calls, and it drops rows whose step goes backwards, which
happens when a crashed run resumes from an older checkpoint). LARS trust ratios are logged as
``lars/trust_ratio/<param_name>`` plus one histogram, moved to the host in a single transfer.

:func:`read_offline_history` reads the history rows back from an offline run's ``.wandb`` file,
which lets tests and scripts check what was logged without a W&B server.
"""

from __future__ import annotations

import functools
import json
import struct
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["METRIC_PREFIXES", "WandbLogger", "read_offline_history", "trust_ratio_metrics"]

# Metric families plotted against ``global_step``.
METRIC_PREFIXES = ("train", "lars", "knn")

_MODES = ("online", "offline", "disabled")


def _host_floats(values: Sequence[Tensor]) -> list[float]:
    """Move scalar tensors to Python floats with one device-to-host transfer.

    ``.item()`` per tensor would synchronise with the device once per value (hundreds of times
    per step for per-layer trust ratios); stacking on the device first synchronises once.
    """
    first = values[0]
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in values))
    stacked = torch.stack([v.detach().reshape(()).to(first.device, dtype) for v in values])
    return [float(x) for x in stacked.cpu().tolist()]


def _to_python(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Replace tensor values by Python floats (one transfer); keep all other values as they are."""
    row = dict(metrics)
    tensor_keys = [k for k, v in row.items() if isinstance(v, Tensor)]
    if tensor_keys:
        row.update(zip(tensor_keys, _host_floats([row[k] for k in tensor_keys]), strict=True))
    return row


def trust_ratio_metrics(ratios: Mapping[str, Tensor]) -> dict[str, Any]:
    """W&B metrics for LARS trust ratios: ``lars/trust_ratio/<name>`` and a histogram.

    ``ratios`` maps parameter names to 0-d tensors (``LARS.trust_ratios()``). All values reach the
    host in one transfer. Returns an empty dict for empty input.
    """
    if not ratios:
        return {}
    import wandb

    values = _host_floats(list(ratios.values()))
    metrics: dict[str, Any] = {
        f"lars/trust_ratio/{name}": value for name, value in zip(ratios, values, strict=True)
    }
    metrics["lars/trust_ratio_hist"] = wandb.Histogram(values)
    return metrics


class WandbLogger:
    """One W&B run for one experiment, or a no-op on processes that must not log.

    ``enabled=False`` (non-main ranks) or ``mode="disabled"`` makes every method a no-op without
    importing or starting W&B. Otherwise ``wandb.init`` runs with the files under
    ``run_dir/wandb``, ``config`` as the run config, and ``resume="allow"`` when ``run_id`` is
    given, so a resumed experiment continues the same W&B run (store :attr:`run_id` in the
    checkpoint). If an online run cannot start (no network, no API key) the logger warns once
    and logs offline instead; upload later with ``wandb sync``. Failures while logging are
    warned about once and otherwise ignored.
    """

    def __init__(
        self,
        *,
        mode: str = "offline",
        project: str = "ssl-toolkit",
        entity: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        run_dir: Path,
        config: Mapping[str, Any],
        run_id: str | None = None,
        enabled: bool = True,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"W&B mode must be one of {', '.join(_MODES)}, got {mode!r}")
        self._run: Any = None
        self._log_failure_warned = False
        if not enabled or mode == "disabled":
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        init_kwargs = {
            "project": project,
            "entity": entity,
            "name": name,
            "tags": list(tags),
            "dir": str(run_dir),
            "config": dict(config),
            "allow_val_change": True,
            "id": run_id,
            "resume": "allow" if run_id is not None else None,
            # One run per process: a run an earlier logger left open is finished, never reused.
            "reinit": "finish_previous",
        }
        self._run = self._start(mode, init_kwargs)
        if self._run is None:
            return
        self._run.define_metric("global_step")
        for prefix in METRIC_PREFIXES:
            self._run.define_metric(f"{prefix}/*", step_metric="global_step")

    @staticmethod
    def _start(mode: str, init_kwargs: dict[str, Any]) -> Any:
        """Start the run; an online failure falls back to offline, any other failure to no-op."""
        import wandb

        if mode == "online":
            try:
                return wandb.init(mode="online", **init_kwargs)
            except Exception as exc:
                warnings.warn(
                    f"W&B online run could not start ({exc}); logging offline under "
                    f"{init_kwargs['dir']} instead (upload later with `wandb sync`)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        try:
            return wandb.init(mode="offline", **init_kwargs)
        except Exception as exc:
            warnings.warn(
                f"W&B offline run could not start ({exc}); metrics will not be logged",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    @property
    def enabled(self) -> bool:
        """True when a W&B run is active and calls are recorded."""
        return self._run is not None

    @property
    def run_id(self) -> str | None:
        """The W&B run id to store for resuming, or ``None`` when logging is off."""
        return None if self._run is None else self._run.id

    def log(self, metrics: Mapping[str, float | Tensor | Any], step: int) -> None:
        """Log one row of metrics at ``global_step = step``.

        Tensor values are moved to the host in one transfer. Exceptions are caught: the first is
        warned about, later ones are silent, and training continues.
        """
        if self._run is None:
            return
        try:
            self._run.log({"global_step": int(step), **_to_python(metrics)})
        except Exception as exc:
            self._warn_log_failure(exc)

    def log_trust_ratios(self, ratios: Mapping[str, Tensor], step: int) -> None:
        """Log LARS trust ratios (see :func:`trust_ratio_metrics`) as one row at ``step``."""
        if self._run is None or not ratios:
            return
        try:
            metrics = trust_ratio_metrics(ratios)
        except Exception as exc:
            self._warn_log_failure(exc)
            return
        self.log(metrics, step)

    def finish(self, timeout: float = 30.0) -> None:
        """Close the run; later calls on this logger are no-ops.

        ``wandb.finish`` hands the run to the W&B service, which writes the rest of the
        ``.wandb`` file asynchronously. This method then waits (up to ``timeout`` seconds) until
        the file holds the run's exit record, so that the run directory is complete when it
        returns, e.g. for :func:`read_offline_history` in the same process.
        """
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            run.finish()
        except Exception as exc:
            self._warn_log_failure(exc)
            return
        sync_file = getattr(run.settings, "sync_file", None)
        if not sync_file:
            return
        sync_file = Path(sync_file)
        deadline = time.monotonic() + timeout
        while not _run_log_complete(sync_file):
            if time.monotonic() > deadline:
                warnings.warn(
                    f"W&B run file {sync_file} was not complete {timeout:g} s after finish",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
            time.sleep(0.05)

    def _warn_log_failure(self, exc: Exception) -> None:
        if not self._log_failure_warned:
            self._log_failure_warned = True
            warnings.warn(
                f"W&B logging failed ({type(exc).__name__}: {exc}); training continues, "
                "further logging errors are not reported",
                RuntimeWarning,
                stacklevel=3,
            )


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


def _run_log_complete(path: Path) -> bool:
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
    run_dir = Path(run_dir)
    files = [run_dir] if run_dir.is_file() else {p.resolve() for p in run_dir.rglob("*.wandb")}
    if not files:
        raise FileNotFoundError(f"no W&B run file (*.wandb) under {run_dir}")
    sessions = []
    for path in files:
        rows = [
            _history_row(r.history)
            for r in _records(path)
            if r.WhichOneof("record_type") == "history"
        ]
        if rows:
            sessions.append(rows)
    sessions.sort(key=lambda rows: rows[0].get("_timestamp", 0.0))
    return [row for rows in sessions for row in rows]
