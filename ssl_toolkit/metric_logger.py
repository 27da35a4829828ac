"""What the trainer needs from a logger: rows of metrics at a step, trust ratios, the end.

:class:`~ssl_toolkit.wandb_logger.WandbLogger` and
:class:`~ssl_toolkit.metrics_file.MetricsFile` are the real ones, joined by :class:`FanOut`;
tests pass a double that records the calls. Steps are optimizer steps, counted from 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from ssl_toolkit.wandb_logger import host_floats, to_python

__all__ = ["FanOut", "MetricLogger"]


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

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Log the image file at ``path`` as metric ``key`` at step ``step`` (W&B: an image
        panel; loggers of numbers may ignore it)."""
        ...

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        """Keep the file at ``path`` with the run (W&B: an artifact of type ``kind``)."""
        ...

    def finish(self) -> None:
        """Close the run; called once, at the end of ``fit``."""
        ...


class FanOut:
    """Several loggers as one (the run's ``metrics.jsonl`` and W&B): every call goes to each,
    with the values moved to the host once for all of them. :attr:`run_id` is the first
    logger's that has one."""

    def __init__(self, *loggers: MetricLogger) -> None:
        self.loggers = loggers

    @property
    def run_id(self) -> str | None:
        """The first run id among the loggers (W&B's), to store in checkpoints."""
        return next((lg.run_id for lg in self.loggers if lg.run_id is not None), None)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log one row with every logger."""
        row = to_python(metrics)
        for logger in self.loggers:
            logger.log(row, step)

    def log_trust_ratios(self, ratios: Mapping[str, Tensor], step: int) -> None:
        """Log the trust ratios with every logger, moved to the host in one transfer."""
        if not ratios:
            return
        on_host = torch.tensor(host_floats(list(ratios.values())), dtype=torch.float64)
        host = dict(zip(ratios, on_host.unbind(), strict=True))
        for logger in self.loggers:
            logger.log_trust_ratios(host, step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Log the image with every logger."""
        for logger in self.loggers:
            logger.log_image(key, path, step)

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        """Keep the file with every logger."""
        for logger in self.loggers:
            logger.log_artifact(path, name, kind)

    def finish(self) -> None:
        """Close every logger."""
        for logger in self.loggers:
            logger.finish()
