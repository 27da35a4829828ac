"""What a run shows on the console: a live progress bar, and a summary table at the end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["TrainResult", "TrainingProgress", "print_summary"]


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


def print_summary(console: Console, result: TrainResult, rows: dict[str, str]) -> None:
    """A table of ``rows`` (the run's description) followed by ``result``."""
    table = Table(title="pretraining summary", show_header=False)
    knn = "-" if result.knn_top1 is None else f"{100 * result.knn_top1:.2f}%"
    for key, value in {
        **rows,
        "steps (epochs)": f"{result.steps} ({result.epochs:.1f})",
        "final loss": f"{result.final_loss:.4f}",
        "kNN top-1": knn,
        "images/s": f"{result.images_per_s:.0f}",
        "time": f"{result.seconds:.0f} s",
        "run directory": str(result.run_dir),
    }.items():
        table.add_row(key, value)
    console.print(table)
