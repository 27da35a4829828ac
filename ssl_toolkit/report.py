"""What a run shows: a live progress bar, a summary table at the end, and ``summary.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ssl_toolkit.checkpoint import atomic_write
from ssl_toolkit.evaluation import Probes

__all__ = [
    "SUMMARY_FILE",
    "TrainResult",
    "TrainingProgress",
    "finite_number",
    "kept_probes",
    "print_summary",
    "read_summary",
    "summary_of_step",
    "write_summary",
]

SUMMARY_FILE = "summary.json"
"""The run's numbers and probes, in the run directory."""

_TRAINING_KEYS = ("final_loss", "images_per_s", "seconds")


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports."""

    steps: int
    epochs: float
    final_loss: float
    knn_top1: float | None
    images_per_s: float
    seconds: float
    run_dir: Path
    probes: Probes | None = None
    baseline: Probes | None = None
    probe_error: str | None = None
    """Why the end-of-run probes of the trained encoder failed, if they did."""
    baseline_error: str | None = None
    """Why the random-init baseline's probes failed, if they did."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of ``summary.json``: the run's numbers, its probes (flat, and as the
        ``probes`` record, ``{"error": ...}`` when they failed), and ``baseline`` (the same
        probes of a randomly initialised encoder of the same config)."""
        summary = {
            key: getattr(self, key) for key in ("steps", "epochs", *_TRAINING_KEYS, "knn_top1")
        }
        flat = {
            key: getattr(self.probes, key, None)
            for key in ("linear_top1", "linear_top1_few_labels", "labels_per_class")
        }
        return {
            **summary,
            **flat,
            "probes": _record(self.probes, self.probe_error),
            "baseline": _record(self.baseline, self.baseline_error),
        }

    def with_training_of(self, summary: dict[str, Any]) -> TrainResult:
        """This result with the training numbers (final loss, speed, time) of an earlier
        session's ``summary.json``: a session resumed at the end trains nothing itself. A
        value that is no finite number is not taken: this session's own stands."""
        kept = {
            key: number
            for key in _TRAINING_KEYS
            if (number := finite_number(summary.get(key))) is not None
        }
        return dataclasses.replace(self, **kept)


def _record(probes: Probes | None, error: str | None) -> dict[str, Any] | None:
    if error is not None:
        return {"error": error}
    return dataclasses.asdict(probes) if probes is not None else None


class TrainingProgress:
    """A progress bar over optimizer steps that shows the latest loss, lr and images/s.

    Use as a context manager; ``enabled=False`` (processes other than the main one) shows
    nothing.
    """

    def __init__(self, console: Console, *, total: int, completed: int, enabled: bool) -> None:
        self._progress = Progress(
            TextColumn("[bold]pretraining"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} img/s"
            ),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self._task = self._progress.add_task(
            "pretraining", total=total, completed=completed, loss="-", lr="-", speed="-"
        )

    def __enter__(self) -> TrainingProgress:
        self._progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._progress.__exit__(exc_type, exc, traceback)

    def update(self, step: int, **fields: Any) -> None:
        """Show ``step`` steps done; ``loss``, ``lr`` and ``speed`` fields when given."""
        shown = {
            "loss": lambda v: f"{v:.4f}",
            "lr": lambda v: f"{v:.3g}",
            "speed": lambda v: f"{v:.0f}",
        }
        self._progress.update(
            self._task, completed=step, **{k: shown[k](v) for k, v in fields.items()}
        )


def write_summary(path: Path, result: TrainResult) -> None:
    """Write :meth:`TrainResult.to_dict` as strict JSON (a non-finite number becomes
    ``null``), atomically (temporary file, then rename)."""
    text = json.dumps(_finite(result.to_dict()), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def read_summary(path: Path) -> dict[str, Any] | None:
    """An earlier session's ``summary.json`` as a mapping; ``None`` when it is missing or not
    a JSON object (a summary is recomputed then, never trusted half-read)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8 JSON, too deep
        return None
    return summary if isinstance(summary, dict) else None


def summary_of_step(path: Path, step: int) -> dict[str, Any] | None:
    """The ``summary.json`` at ``path`` when it is of the run's step ``step`` (written by an
    earlier session that reached the same end), else ``None``."""
    summary = read_summary(path)
    return summary if summary is not None and summary.get("steps") == step else None


def kept_probes(record: Any) -> Probes | None:
    """The probes of a ``summary.json`` record when it is whole (no error, every field, each
    of its type: finite accuracies, an integer count), else ``None``: those are computed
    again."""
    names = {field.name for field in dataclasses.fields(Probes)}
    if not isinstance(record, dict) or set(record) != names:
        return None
    count = record["labels_per_class"]
    if isinstance(count, bool) or not isinstance(count, int):
        return None
    if any(finite_number(record[name]) is None for name in names - {"labels_per_class"}):
        return None
    return Probes(**record)


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float when it is a number (not a boolean), else ``None``: what a
    file read back holds may be of any type."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) else None


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity inside it replaced by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _probe_table(probes: Probes, baseline: Probes | None) -> Table:
    """Trained against randomly initialised features, with the gain in points."""
    table = Table(title="frozen features, top-1 on the test split")
    for column in ("probe", "trained", "random init", "gain"):
        table.add_column(column, justify="left" if column == "probe" else "right")
    for label, key in (
        ("kNN", "knn_top1"),
        ("linear, all labels", "linear_top1"),
        (f"linear, {probes.labels_per_class} labels per class", "linear_top1_few_labels"),
    ):
        trained = getattr(probes, key)
        random = getattr(baseline, key) if baseline else None
        gain = "-" if random is None else f"{100 * (trained - random):+.2f}"
        table.add_row(label, _percent(trained), _percent(random), gain)
    return table


def print_summary(console: Console, result: TrainResult, rows: dict[str, str]) -> None:
    """A table of ``rows`` (the run's description) and ``result``, then the probes."""
    table = Table(title="pretraining summary", show_header=False)
    for key, value in {
        **rows,
        "steps (epochs)": f"{result.steps} ({result.epochs:.1f})",
        "final loss": f"{result.final_loss:.4f}",
        "kNN top-1": _percent(result.knn_top1),
        "images/s": f"{result.images_per_s:.0f}",
        "time": f"{result.seconds:.0f} s",
        "run directory": str(result.run_dir),
    }.items():
        table.add_row(key, value)
    console.print(table)
    if result.probes is not None:
        console.print(_probe_table(result.probes, result.baseline))
    for what, error in (("probes", result.probe_error), ("baseline", result.baseline_error)):
        if error is not None:
            console.print(
                f"end-of-run {what} failed: {error}", markup=False, highlight=False, soft_wrap=True
            )
