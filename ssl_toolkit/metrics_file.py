"""The run's own record of what it logged: ``metrics.jsonl`` in the run directory.

W&B may be disabled, or offline and never synced, and its files are its own format. This file
is the toolkit's: one JSON object per logged row, ``global_step`` and the keys W&B gets (LARS
trust ratios as ``lars/trust_ratio/<param_name>``), flushed at every row, so that a run killed
mid-way leaves every row it logged. A resumed run keeps the rows up to the step it resumes
from and drops the later ones, which it logs again, after a row that marks the resume
(:data:`RESUMED_KEY`); a fresh run starts the file anew. Reports and tests read it with
:func:`read_metrics` (:func:`scan_metrics` also counts damaged lines).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from ssl_toolkit.checkpoint import atomic_write, open_append
from ssl_toolkit.wandb_logger import host_floats, to_python

__all__ = [
    "METRICS_FILE",
    "RESUMED_KEY",
    "MetricsFile",
    "MetricsRows",
    "read_metrics",
    "scan_metrics",
]

METRICS_FILE = "metrics.jsonl"
"""The file's name in the run directory."""
RESUMED_KEY = "run/resumed_at"
"""The key of the row that marks where a session resumed (the file's own, not W&B's)."""


class MetricsRows(NamedTuple):
    """What a metrics file holds: its ``rows``, and how many ``damaged`` lines were left out."""

    rows: list[dict[str, Any]]
    damaged: int


def scan_metrics(path: str | Path) -> MetricsRows:
    """The rows of a metrics file, in the order they were logged, and the count of damaged
    lines left out: any line that is not UTF-8, not JSON, or not an object with a
    non-negative integer ``global_step`` (a damaged file blocks neither a resume nor a
    report). A last line cut short by a killed run is left out and not counted: it is what
    every kill mid-write leaves."""
    lines = Path(path).read_bytes().split(b"\n")
    cut = lines.pop()  # after the last newline: empty, or a line never finished
    rows, damaged = [], 0
    for line in lines:
        if not line.strip():
            continue
        row = _row(line)
        if row is None:
            damaged += 1
        else:
            rows.append(row)
    if cut.strip() and (row := _row(cut)) is not None:
        rows.append(row)
    return MetricsRows(rows, damaged)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics file, in the order they were logged (:func:`scan_metrics`)."""
    return scan_metrics(path).rows


def _row(line: bytes) -> dict[str, Any] | None:
    """One line as a row, or ``None`` when it is damaged."""
    try:
        row = json.loads(line.decode())
    except (ValueError, RecursionError):  # not UTF-8, not JSON, too many digits or levels
        return None
    if not isinstance(row, dict):
        return None
    step = row.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**63:
        return None
    return row


_NOT_A_NUMBER = object()  # W&B's histograms: not in the file


def _json_value(value: Any) -> Any:
    """``value`` as strict JSON holds it (a number that is not finite is null, as in
    ``summary.json``), or :data:`_NOT_A_NUMBER` for values that are neither numbers nor text."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return _NOT_A_NUMBER


class MetricsFile:
    """A :class:`~ssl_toolkit.metric_logger.MetricLogger` writing ``run_dir/metrics.jsonl``.

    ``resumed_at`` is the step the run resumes from (0 for a fresh run): rows after it are
    dropped. Only the main process writes (``enabled``). A failing write (a full disk) is
    warned about once and never stops training.
    """

    run_id = None

    def __init__(self, run_dir: Path, *, resumed_at: int, enabled: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self._file = None
        self._warned = False
        if not enabled:
            return
        kept = []
        if resumed_at > 0 and self.path.is_file():
            try:
                rows, damaged = scan_metrics(self.path)
            except OSError as error:  # unreadable: left as it is, never replaced unread
                self._warn(error, "read")
                return
            if damaged:
                warnings.warn(
                    f"{self.path}: {damaged} damaged line(s) left out (not JSON rows); "
                    "the rows around them are kept",
                    RuntimeWarning,
                    stacklevel=2,
                )
            kept = [row for row in rows if row["global_step"] <= resumed_at]
        if resumed_at > 0:
            kept.append({"global_step": resumed_at, RESUMED_KEY: resumed_at})
        text = "".join(json.dumps(row) + "\n" for row in kept)
        try:
            atomic_write(self.path, lambda file: file.write(text.encode()))
            self._file = open_append(self.path)
        except OSError as error:
            self._warn(error)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append one row at ``global_step = step`` and flush it."""
        if self._file is None:
            return
        values = {key: _json_value(value) for key, value in to_python(metrics).items()}
        row = {"global_step": int(step)} | {
            k: v for k, v in values.items() if v is not _NOT_A_NUMBER
        }
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        except OSError as error:
            self._warn(error)

    def log_trust_ratios(self, ratios: Mapping[str, Tensor], step: int) -> None:
        """One row of ``lars/trust_ratio/<param_name>`` values at ``step``."""
        if self._file is None or not ratios:
            return
        values = host_floats(list(ratios.values()))
        self.log({f"lars/trust_ratio/{n}": v for n, v in zip(ratios, values, strict=True)}, step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Nothing: the image stays in the run directory."""

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        """Nothing: the file stays in the run directory."""

    def finish(self) -> None:
        """Close the file; later calls are no-ops."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _warn(self, error: OSError, what: str = "write") -> None:
        self._file = None
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"cannot {what} {self.path} ({error.strerror or error}); training continues "
                "without it",
                RuntimeWarning,
                stacklevel=3,
            )
