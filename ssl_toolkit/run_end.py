"""The end of a finished run, after its final checkpoint, in the order that loses nothing.

``backbone.pt`` first, then a ``summary.json`` of the training, then the probes of the trained
encoder and of a randomly initialised one (the baseline), each recorded in ``summary.json`` as
it comes; a probe that fails is recorded there instead of failing the run, whose model is
saved. ``report.html`` closes the run. The training's own figures (final loss, images/s,
seconds) are kept in the final checkpoint (:meth:`RunEnd.record_training`), so that a session
killed at any point after the last step, even mid-write, leaves them to ``--resume auto``,
which computes only the parts that are missing.

:class:`RunEnd` also keeps the best kNN top-1 of the run, which the trainer's checkpoint entry
carries across sessions. It is given what it needs of the trainer as values and callables, as
:class:`~ssl_toolkit.checkpoint.Checkpointer` is.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from torch import Tensor

from optim.errors import one_line
from ssl_toolkit.checkpoint import save_checkpoint
from ssl_toolkit.distributed import gather_objects
from ssl_toolkit.evaluation import Probes
from ssl_toolkit.export import BACKBONE_FILE
from ssl_toolkit.html_report import HEATMAP_FILE, REPORT_FILE, write_report
from ssl_toolkit.metric_logger import MetricLogger
from ssl_toolkit.report import (
    SUMMARY_FILE,
    TrainResult,
    kept_probes,
    summary_of_step,
    write_summary,
)

__all__ = ["Prober", "RunEnd"]

Encoder = Callable[[Tensor], Tensor]


class Prober(Protocol):
    """What the end of a run asks of the evaluator: whether it can score, and the probes."""

    @property
    def enabled(self) -> bool:
        """False without labelled data of two classes or more: no probes then."""

    def probes(self, encoder: Encoder) -> Probes:
        """kNN and linear probes of ``encoder``'s frozen features (every rank calls it)."""


class RunEnd:
    """The end of the run in ``run_dir`` and the run's best kNN top-1.

    ``features`` is the trained encoder; ``random_features()`` builds a randomly initialised
    one of the same config for the baseline (``None``: no baseline). ``backbone_state()`` is
    the trained backbone's state dict (collective: every rank calls it, the main one gets the
    tensors). ``logger()`` is the run's logger (the trainer makes it after the resume, which
    restores :attr:`best_knn`). ``link_best(step)`` points ``best.pt`` at the checkpoint of
    ``step``; ``stop_if_requested()`` stops the run on a signal that came meanwhile. Every rank
    calls :meth:`finish`; only ``is_main`` writes.
    """

    def __init__(
        self,
        run_dir: Path,
        evaluator: Prober,
        *,
        features: Encoder,
        random_features: Callable[[], Encoder] | None,
        backbone_state: Callable[[], dict[str, Tensor]],
        logger: Callable[[], MetricLogger],
        link_best: Callable[[int], None],
        stop_if_requested: Callable[[], None],
        console: Console,
        is_main: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.evaluator = evaluator
        self.features = features
        self.random_features = random_features
        self.backbone_state = backbone_state
        self.logger = logger
        self.link_best = link_best
        self.stop_if_requested = stop_if_requested
        self.console = console
        self.is_main = is_main
        self.best_knn = float("-inf")
        """The best kNN top-1 so far (carried by checkpoints: right across resumed sessions,
        where W&B's per-session summary max of ``knn/top1`` is not)."""
        self.training: dict[str, Any] | None = None
        """The training figures of the run's last step (``steps``, ``epochs``, ``final_loss``,
        ``images_per_s``, ``seconds``), carried by the final checkpoint; ``None`` before."""

    def record_best_knn(self, knn: float, step: int) -> bool:
        """Keep the best kNN top-1 so far and log it as ``knn/best``; True when ``knn`` beats
        the best before it."""
        best = knn > self.best_knn
        self.best_knn = max(self.best_knn, knn)
        self.logger().log({"knn/best": self.best_knn}, step=step)
        return best

    def record_training(self, result: TrainResult) -> None:
        """Keep the training figures of the run's last step, before the final checkpoint is
        saved: it carries them, so that no kill after it loses them."""
        self.training = {
            key: getattr(result, key)
            for key in ("steps", "epochs", "final_loss", "images_per_s", "seconds")
        }

    def finish(self, result: TrainResult, *, resumed_at_end: bool = False) -> TrainResult:
        """The end of a finished run at step ``result.steps``, whose final checkpoint is saved:
        ``backbone.pt``, ``summary.json`` of the training, then the probes and the baseline.

        The training figures are those :meth:`record_training` kept (of the session that
        trained, from the checkpoint when resumed). A run resumed at its end
        (``resumed_at_end``) keeps what an earlier session wrote and computes only what is
        missing: the backbone file, the probes, the baseline. A stop signal between these
        parts stops the run as during training (``--resume auto`` completes the rest).
        """
        step = result.steps
        summary = self.run_dir / SUMMARY_FILE
        previous = summary_of_step(summary, step) if self.is_main and resumed_at_end else None
        previous = gather_objects(previous)[0]
        training = self._training_of(step) or previous  # an older checkpoint carries none
        if training is not None:
            result = result.with_training_of(training)
        has_backbone = gather_objects(self.is_main and (self.run_dir / BACKBONE_FILE).is_file())
        if previous is None or not has_backbone[0]:
            self.export_backbone()
        self.write_summary(result)
        self.stop_if_requested()
        if not self.evaluator.enabled:
            return result
        kept = previous or {}
        probes, error = self._kept_or_run(kept.get("probes"), self.final_probes, step)
        if probes is not None and self.record_best_knn(probes.knn_top1, step):
            self.link_best(step)
        result = dataclasses.replace(
            result,
            knn_top1=probes.knn_top1 if probes is not None else None,
            probes=probes,
            probe_error=error,
        )
        self.write_summary(result)
        self.stop_if_requested()
        if probes is None or self.random_features is None:
            return result
        baseline, baseline_error = self._kept_or_run(
            kept.get("baseline"), self.baseline_probes, step
        )
        result = dataclasses.replace(result, baseline=baseline, baseline_error=baseline_error)
        self.write_summary(result)
        return result

    def _training_of(self, step: int) -> dict[str, Any] | None:
        """:attr:`training` when it is of step ``step`` (a checkpoint of a run that ended at
        another step carries another end's figures)."""
        training = self.training
        return training if isinstance(training, dict) and training.get("steps") == step else None

    def export_backbone(self) -> Path | None:
        """Write ``backbone.pt`` (the backbone's weights as a plain state dict) in the run
        directory and log it as an artifact; every rank calls it, the main one writes."""
        state = self.backbone_state()
        if not self.is_main:
            return None
        path = self.run_dir / BACKBONE_FILE
        save_checkpoint(path, state)
        self.logger().log_artifact(path, name=f"backbone-{self.run_dir.name}", kind="model")
        return path

    def final_probes(self, step: int) -> Probes:
        """kNN and linear probes of the trained features; logs ``knn/top1`` and ``probe/*``."""
        probes = self.evaluator.probes(self.features)
        metrics = {"knn/top1": probes.knn_top1, **_probe_metrics(probes, "")}
        self.logger().log(metrics, step=step)
        if self.is_main:
            self.console.print(f"step {step}: kNN top-1 {100 * probes.knn_top1:.2f}%")
        return probes

    def baseline_probes(self, step: int) -> Probes | None:
        """The same probes of a randomly initialised encoder, logged as ``probe/baseline_*``;
        ``None`` without a baseline."""
        if self.random_features is None:
            return None
        probes = self.evaluator.probes(self.random_features())
        self.logger().log(_probe_metrics(probes, "baseline_"), step=step)
        return probes

    def write_summary(self, result: TrainResult) -> None:
        """``summary.json`` as it stands (written by the main process)."""
        if self.is_main:
            write_summary(self.run_dir / SUMMARY_FILE, result)

    def write_report(self, step: int) -> None:
        """``report.html`` and the trust-ratio heatmap, which W&B gets as an image (main
        process). A report that cannot be drawn is warned about; the run is whole without it."""
        if not self.is_main:
            return
        try:
            write_report(self.run_dir)
        except Exception as error:
            warnings.warn(
                f"{self.run_dir / REPORT_FILE} could not be written "
                f"({type(error).__name__}: {error}); scripts/report.py draws it later",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        heatmap = self.run_dir / HEATMAP_FILE
        if heatmap.is_file():
            self.logger().log_image("lars/trust_ratio_heatmap", heatmap, step=step)

    def _kept_or_run(
        self, kept: Any, probe: Callable[[int], Probes | None], step: int
    ) -> tuple[Probes | None, str | None]:
        """Probes an earlier session of this run recorded whole, or ``probe(step)`` run now."""
        probes = kept_probes(kept)
        if probes is not None:
            return probes, None
        return self._guarded(lambda: probe(step))

    def _guarded(self, probe: Callable[[], Probes | None]) -> tuple[Probes | None, str | None]:
        """Run an end-of-run probe; a failure is printed and returned as one line, since the
        trained model is already saved and must not be lost to an evaluation error."""
        try:
            return probe(), None
        except Exception as error:
            message = f"{type(error).__name__}: {one_line(error)}"
            if self.is_main:
                self.console.print(
                    f"warning: the end-of-run probes failed ({message}); the checkpoint and "
                    f"{BACKBONE_FILE} are saved, and summary.json records the error",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )
            return None, message


def _probe_metrics(probes: Probes, prefix: str) -> dict[str, float]:
    return {
        f"probe/{prefix}knn_top1": probes.knn_top1,
        f"probe/{prefix}linear_top1": probes.linear_top1,
        f"probe/{prefix}linear_top1_few_labels": probes.linear_top1_few_labels,
    }
