"""What a run shows: a live progress bar, a summary table at the end, and ``summary.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ssl_toolkit.checkpoint import atomic_write
from ssl_toolkit.evaluation import Probes

__all__ = ["TrainResult", "TrainingProgress", "print_summary", "write_summary"]


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

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of ``summary.json``: the run's numbers, its probes, and ``baseline``
        (the same probes of a randomly initialised encoder of the same config)."""
        summary = {
            key: getattr(self, key)
            for key in ("steps", "epochs", "final_loss", "images_per_s", "seconds", "knn_top1")
        }
        probes = {
            key: getattr(self.probes, key, None)
            for key in ("linear_top1", "linear_top1_few_labels", "labels_per_class")
        }
        return {
            **summary,
            **probes,
            "baseline": dataclasses.asdict(self.baseline) if self.baseline else None,
        }


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
    """Write :meth:`TrainResult.to_dict` as JSON, atomically (temporary file, then rename)."""
    text = json.dumps(result.to_dict(), indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


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
