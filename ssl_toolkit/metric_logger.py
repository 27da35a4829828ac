"""What the trainer needs from a logger: rows of metrics at a step, trust ratios, the end.

:class:`~ssl_toolkit.wandb_logger.WandbLogger` is the real one; tests pass a double that
records the calls. Steps are optimizer steps, counted from 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

__all__ = ["MetricLogger"]


class MetricLogger(Protocol):
    """A sink for training metrics; implementations must never stop training."""

    @property
    def run_id(self) -> str | None:
        """An id to store in checkpoints so that a resumed run logs to the same run."""
        ...

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log one row of metrics (floats or 0-d tensors) at optimizer step ``step``."""
        ...

    def log_trust_ratios(self, ratios: Mapping[str, Tensor], step: int) -> None:
        """Log LARS trust ratios (``param_name`` → 0-d tensor) at step ``step``."""
        ...

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        """Keep the file at ``path`` with the run (W&B: an artifact of type ``kind``)."""
        ...

    def finish(self) -> None:
        """Close the run; called once, at the end of ``fit``."""
        ...
