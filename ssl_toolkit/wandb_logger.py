"""Weights & Biases logging that never stops training.

:class:`WandbLogger` owns one W&B run stored under the experiment's run directory. Every metric
is logged together with ``global_step``, the x-axis of the ``train/*``, ``lars/*`` and ``knn/*``
panels (W&B's own ``_step`` only counts calls, and it drops rows whose step goes backwards, which
happens when a crashed run resumes from an older checkpoint). LARS trust ratios are logged as
``lars/trust_ratio/<param_name>`` plus one histogram, moved to the host in a single transfer.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ssl_toolkit.wandb_offline import run_file_complete

__all__ = [
    "METRIC_PREFIXES",
    "WANDB_MODES",
    "WandbLogger",
    "WandbMode",
    "host_floats",
    "to_python",
    "trust_ratio_metrics",
]

# Metric families plotted against ``global_step``.
METRIC_PREFIXES = ("train", "lars", "knn", "method", "probe")

WandbMode = Literal["offline", "online", "disabled"]
"""``offline`` writes the run under the run directory (``wandb sync`` uploads it later)."""
WANDB_MODES: tuple[str, ...] = get_args(WandbMode)
"""The values of :data:`WandbMode`."""


def host_floats(values: Sequence[Tensor]) -> list[float]:
    """Move scalar tensors to Python floats with one device-to-host transfer.

    ``.item()`` per tensor would synchronise with the device once per value (hundreds of times
    per step for per-layer trust ratios); stacking on the device first synchronises once.
    """
    first = values[0]
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in values))
    stacked = torch.stack([v.detach().reshape(()).to(first.device, dtype) for v in values])
    return [float(x) for x in stacked.cpu().tolist()]


def to_python(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Replace tensor values by Python floats (one transfer); keep all other values as they are."""
    row = dict(metrics)
    tensor_keys = [k for k, v in row.items() if isinstance(v, Tensor)]
    if tensor_keys:
        row.update(zip(tensor_keys, host_floats([row[k] for k in tensor_keys]), strict=True))
    return row


def trust_ratio_metrics(ratios: Mapping[str, Tensor]) -> dict[str, Any]:
    """W&B metrics for LARS trust ratios: ``lars/trust_ratio/<name>`` and a histogram.

    ``ratios`` maps parameter names to 0-d tensors (``LARS.trust_ratios()``). All values reach the
    host in one transfer. Returns an empty dict for empty input.
    """
    if not ratios:
        return {}
    import wandb

    values = host_floats(list(ratios.values()))
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
        mode: WandbMode = "offline",
        project: str = "ssl-toolkit",
        entity: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        run_dir: Path,
        config: Mapping[str, Any],
        run_id: str | None = None,
        enabled: bool = True,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ValueError(f"W&B mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
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
        # The run's summary shows the best kNN accuracy, not the last one. W&B takes that max
        # over one session; ``knn/best``, logged by the trainer, is the best over all of them.
        self._run.define_metric("knn/top1", step_metric="global_step", summary="max")

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
            self._run.log({"global_step": int(step), **to_python(metrics)})
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

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Log the image file at ``path`` as ``wandb.Image`` metric ``key`` at ``step``."""
        if self._run is None:
            return
        try:
            import wandb

            self._run.log({"global_step": int(step), key: wandb.Image(str(path))})
        except Exception as exc:
            self._warn_log_failure(exc)

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        """Log the file at ``path`` as a W&B artifact ``name`` of type ``kind`` (offline runs
        keep it for ``wandb sync``). Failures are warned about, never raised."""
        if self._run is None:
            return
        try:
            import wandb

            artifact = wandb.Artifact(name, type=kind)
            artifact.add_file(str(path))
            self._run.log_artifact(artifact)
        except Exception as exc:
            self._warn_log_failure(exc)

    def finish(self, timeout: float = 30.0) -> None:
        """Close the run; later calls on this logger are no-ops.

        ``wandb.finish`` hands the run to the W&B service, which writes the rest of the
        ``.wandb`` file asynchronously. This method then waits (up to ``timeout`` seconds) until
        the file holds the run's exit record, so that the run directory is complete when it
        returns, e.g. for ``read_offline_history`` in the same process.
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
        while not run_file_complete(sync_file):
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
