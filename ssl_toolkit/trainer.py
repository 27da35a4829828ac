"""One training loop for every registered method: a short loop over components.

The trainer names no method. It builds the method from the registry, takes the method's own
augmentation, and calls the method's hooks. Each other component says when it is due: the kNN
evaluator (``should_evaluate(step)``), the checkpointer (``save(step, last_step=...)``), the
logging cadence. Steps are counted one way throughout: ``self.step`` is the number of optimizer
steps completed, and step ``s`` (1-based) is the one that makes it ``s``.

Everything that depends on where the process runs (device, rank, who writes files) comes from
one ``DistContext``. Every source of randomness (global RNGs, data order, augmentation
generator) is saved in the checkpoint, so a resumed run on CPU continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from torch import Tensor, nn

from optim import build_optimizer, require_trainable, scale_lr, set_lr, warmup_cosine
from optim.errors import one_line, short_repr
from ssl_toolkit.checkpoint import (
    Checkpointer,
    CheckpointError,
    atomic_write,
    capture_rng_state,
    load_checkpoint,
    load_latest,
    restore_rng_state,
    save_checkpoint,
    step_checkpoints,
)
from ssl_toolkit.config import ExperimentConfig
from ssl_toolkit.data import CropViews, TensorBatchLoader, build_dataset, build_loader
from ssl_toolkit.distributed import (
    DistContext,
    all_reduce_mean,
    gather_objects,
    setup_distributed,
)
from ssl_toolkit.evaluation import Evaluator, Probes
from ssl_toolkit.export import BACKBONE_FILE
from ssl_toolkit.health import Diverged, TrainingHealth
from ssl_toolkit.methods import Method, build_method
from ssl_toolkit.metric_logger import MetricLogger
from ssl_toolkit.parallel import (
    full_model_state,
    full_state,
    gradient_sync,
    load_full_state,
    parallelize,
)
from ssl_toolkit.preemption import Preempted, PreemptionGuard
from ssl_toolkit.preflight import check_accumulation, check_batch_fits, dry_forward
from ssl_toolkit.report import (
    SUMMARY_FILE,
    TrainingProgress,
    TrainResult,
    print_summary,
    read_summary,
    write_summary,
)
from ssl_toolkit.run_lock import RunDirectoryError, RunLock
from ssl_toolkit.skipped_images import SkippedImages
from ssl_toolkit.sync_batch_norm import convert_sync_batchnorm, wants_sync_bn
from ssl_toolkit.wandb_logger import WandbLogger

__all__ = ["TrainResult", "Trainer"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """Pretrain ``cfg.method`` on ``cfg.data``; ``fit()`` runs to the end and returns a result.

    ``resume`` is a checkpoint path to continue from, ``"auto"`` for the run directory's
    newest loadable checkpoint (start fresh when there is none), or ``None`` to start fresh.
    ``logger`` may be passed to record calls in tests; by default a ``WandbLogger`` writes
    under the run dir.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        resume: Path | str | None = None,
        logger: MetricLogger | None = None,
        console: Console | None = None,
        ctx: DistContext | None = None,
    ) -> None:
        self.cfg = cfg
        _set_deterministic(cfg.trainer.deterministic)
        self.ctx = ctx or setup_distributed(
            cfg.trainer.device, timedelta(minutes=cfg.trainer.collective_timeout_minutes)
        )
        self.console = console or Console(stderr=True)
        self.run_dir = Path(cfg.trainer.output_dir)
        self.run_lock = RunLock(self.run_dir)
        """One run per directory: held by the main process from here to the end of :meth:`fit`."""
        self._lock_run_dir()
        try:
            self._setup(resume, logger)
        except BaseException:
            self.run_lock.release()
            raise

    def _setup(self, resume: Path | str | None, logger: MetricLogger | None) -> None:
        """Everything a run needs, checked before the first step: data, model, optimizer,
        schedule and the components; then the resume."""
        cfg = self.cfg
        self.device = self.ctx.device
        _seed_everything(cfg.trainer.seed + self.ctx.rank)  # this rank's own random streams

        self.train_set = build_dataset(
            cfg.data.name,
            root=cfg.data.root,
            train=True,
            download=cfg.data.download,
            image_size=cfg.data.image_size,
            views=CropViews(
                size=cfg.data.image_size,
                scale=(cfg.data.crop_min_scale, 1.0),
                seed=cfg.trainer.seed,
            ),
        )
        check_batch_fits(len(self.train_set), cfg.data.batch_size, self.ctx.world_size)
        self.loader = build_loader(
            self.train_set,
            cfg.data.batch_size,
            generator=torch.Generator().manual_seed(cfg.trainer.seed),
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            num_workers=cfg.data.num_workers,
            skip_bad=cfg.data.skip_bad,
        )
        if isinstance(self.loader, TensorBatchLoader) and self.device.type == "cuda":
            self.loader.images = self.loader.images.to(self.device)
            self.loader.targets = self.loader.targets.to(self.device)

        self.method = self.initial_method()
        if wants_sync_bn(cfg.model.sync_bn, self.ctx.world_size):
            convert_sync_batchnorm(self.method, self.device)
        self.method.to(self.device)
        self.augment_generator = torch.Generator().manual_seed(
            _augment_seed(cfg.trainer.seed, self.ctx.rank)
        )
        self.augment = (
            self.method.augmentation(cfg.data, self.augment_generator)
            .with_overrides(**cfg.data.augment.model_dump(exclude_none=True))
            .to(self.device)
        )
        self.memory_format = (
            torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
        )
        if cfg.trainer.strategy != "fsdp2":  # FSDP2 shards contiguous parameters only
            self.method.to(memory_format=self.memory_format)
        require_trainable(self.method.trainable_module())  # DDP would fail on it first
        dry_forward(
            self.method,
            backbone=cfg.model.backbone,
            image_size=cfg.data.image_size,
            device=self.device,
            memory_format=self.memory_format,
        )
        self.model: nn.Module = parallelize(self.method, self.ctx, cfg.trainer.strategy)
        """The method as the strategy wraps it (DDP, FSDP2 or itself)."""
        self.optimizer = build_optimizer(cfg.optim, self.method.trainable_module())
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=cfg.trainer.precision == "fp16"
        )
        self.compute_loss = torch.compile(self.model) if cfg.trainer.compile else self.model
        """What each micro-batch calls for its loss: :attr:`model`, compiled if asked."""

        accumulate = cfg.trainer.accumulate_grad_batches
        check_accumulation(accumulate, len(self.loader), cfg.data.batch_size)
        # Every micro-batch of an epoch is used: the epoch's last step takes what is left.
        self.steps_per_epoch = -(-len(self.loader) // accumulate)
        total = cfg.trainer.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.trainer.max_steps or total)
        self.global_batch = cfg.data.batch_size * accumulate * self.ctx.world_size
        self.peak_lr = scale_lr(cfg.optim.lr, self.global_batch, cfg.schedule.lr_scaling)
        self.warmup_steps = min(
            self.total_steps, round(cfg.schedule.warmup_epochs * self.steps_per_epoch)
        )
        self.step = 0

        self.evaluator = Evaluator(
            cfg,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            device=self.device,
            memory_format=self.memory_format,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )
        self.checkpointer = Checkpointer(
            self.run_dir,
            self.state_dict,
            every_steps=cfg.trainer.checkpoint_every_steps,
            steps_per_epoch=self.steps_per_epoch,
            keep=cfg.trainer.keep_checkpoints,
            enabled=self.ctx.is_main,
            before_save=self._check_health,  # a checkpoint never holds a diverged state
        )
        self.health = TrainingHealth(
            self.device,
            fp16=cfg.trainer.precision == "fp16",
            max_skipped_steps=cfg.trainer.max_skipped_steps,
        )
        self.preemption = PreemptionGuard(distributed=self.ctx.is_distributed)
        self.best_knn = float("-inf")
        if resume is None:
            self._start_fresh()
        run_id = self._resume(resume) if resume is not None else None
        self.skipped_images = SkippedImages(
            self.run_dir, resumed=self.step > 0, enabled=self.ctx.is_main
        )
        self._skipped_sent = 0  # this process's skipped images already given to the list
        self.logger: MetricLogger = logger or WandbLogger(
            **cfg.logging.wandb.model_dump(),
            run_dir=self.run_dir,
            config=cfg.to_dict(),
            run_id=run_id,
            enabled=self.ctx.is_main,
        )

    def _lock_run_dir(self) -> None:
        """Take the run directory's lock on the main process; every process learns whether
        it got it, so all of them stop together when another run holds the directory."""
        error = None
        if self.ctx.is_main:
            try:
                self.run_lock.acquire()
            except RunDirectoryError as err:
                error = str(err)
        error = gather_objects(error)[0]
        if error is not None:
            raise RunDirectoryError(error)

    def _start_fresh(self) -> None:
        """A fresh run in a directory that holds an earlier run's checkpoints replaces them:
        say so, and how to continue that run instead. The earlier run's ``backbone.pt`` and
        ``summary.json`` are removed now, so that they are never taken for this run's."""
        if not self.ctx.is_main:
            return
        steps = step_checkpoints(self.checkpointer.path.parent)
        if steps or self.checkpointer.path.exists():
            newest = f" (up to {steps[0].name})" if steps else ""
            warnings.warn(
                f"{self.run_dir} holds checkpoints of an earlier run{newest}: this run starts "
                "from scratch and replaces them; to continue that run, use --resume auto",
                RuntimeWarning,
                stacklevel=3,
            )
        for name in (BACKBONE_FILE, SUMMARY_FILE):
            (self.run_dir / name).unlink(missing_ok=True)

    def lr_at(self, step: int) -> float:
        """The scheduled learning rate of optimizer step ``step`` (1-based; before group
        lr scales): warmup + cosine over the steps done before it."""
        return warmup_cosine(
            step - 1,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            peak_lr=self.peak_lr,
            final_lr=self.cfg.schedule.final_lr,
        )

    def fit(self, stop_at_step: int | None = None) -> TrainResult:
        """Train until ``total_steps``, evaluating, logging and saving when each is due.

        ``stop_at_step`` ends the run early after saving a checkpoint, as a preemption would:
        ``--resume`` then continues it exactly. At the end of the run the final checkpoint and
        ``backbone.pt`` are written before any probe runs (:meth:`finish_run`). The run
        directory's lock is held throughout and released on return.
        """
        try:
            self._lock_run_dir()
            return self._fit(stop_at_step)
        finally:
            self.run_lock.release()

    def _fit(self, stop_at_step: int | None) -> TrainResult:
        if self.ctx.is_main:
            config_text = yaml.safe_dump(self.cfg.to_dict())
            atomic_write(self.run_dir / "config.yaml", lambda f: f.write(config_text.encode()))
        end = self.total_steps if stop_at_step is None else min(stop_at_step, self.total_steps)
        first = self.step + 1
        batches = self.image_batches()
        window = _LogWindow(self.device)
        loss, knn = float("nan"), None
        if not self.evaluator.enabled and self.ctx.is_main:
            self.console.print(
                f"kNN monitor and probes skipped: {self.evaluator.disabled_reason}",
                markup=False,
                soft_wrap=True,
            )
        start, images = time.perf_counter(), 0
        with (
            TrainingProgress(
                self.console, total=self.total_steps, completed=self.step, enabled=self.ctx.is_main
            ) as progress,
            self.preemption,
        ):
            while self.step < end:
                self.step += 1
                step = self.step
                lr = self.lr_at(step)
                set_lr(self.optimizer, lr)
                micro_batches = self.micro_batches_of(step)
                images += self.images_of(micro_batches)
                window.add(self.train_step(batches, micro_batches), self.images_of(micro_batches))
                self.method.after_optimizer_step(step, self.total_steps)
                if step == first or step % self.cfg.logging.trust_ratio_every == 0:
                    self._log_trust_ratios(step)
                if step % self.cfg.trainer.log_every_steps == 0 or step == end:
                    self._check_health()
                    loss, speed = window.flush()
                    row = {"train/loss": loss, "train/lr": lr, "train/img_per_s": speed}
                    row |= self._health_metrics() | self._data_metrics()
                    self.logger.log(row | self._method_metrics(), step=step)
                    progress.update(step, loss=loss, lr=lr, speed=speed)
                progress.update(step)
                # The run's last step is saved first; its kNN comes with the final probes.
                best = False
                if step < self.total_steps and self.evaluator.should_evaluate(step):
                    knn = self._evaluate_saving_first_on_failure(step)
                    best = knn > self.best_knn
                    self._record_best_knn(knn, step)
                signum = self.preemption.requested()
                last = step == end or bool(signum)
                self.checkpointer.save(step, last_step=last, best=best)
                if signum:
                    self._stop(signum, step)
            seconds = time.perf_counter() - start
            result = TrainResult(
                steps=self.step,
                epochs=self.step / self.steps_per_epoch,
                final_loss=loss,
                knn_top1=knn,
                images_per_s=images / max(seconds, 1e-9),
                seconds=seconds,
                run_dir=self.run_dir,
            )
            if self.step == self.total_steps:
                result = self.finish_run(result, resumed_at_end=first > self.total_steps)
        self.logger.finish()
        if self.step < self.total_steps:
            self._write_summary(result)
        if self.ctx.is_main:
            print_summary(
                self.console,
                result,
                {
                    "method / backbone": f"{self.cfg.method.name} / {self.cfg.model.backbone}",
                    "global batch": str(self.global_batch),
                },
            )
        return result

    def finish_run(self, result: TrainResult, *, resumed_at_end: bool = False) -> TrainResult:
        """The end of a finished run, in the order that loses nothing: ``backbone.pt``, a
        ``summary.json`` of the training, then the probes, whose failure is reported in
        ``summary.json`` instead of failing the run. The final checkpoint is already saved.

        A run resumed at its end (``resumed_at_end``) keeps what an earlier session wrote and
        computes only what is missing: the backbone file, the probes, the baseline. A stop
        signal between these parts stops the run as during training (the checkpoint is whole,
        and ``--resume auto`` completes the rest).
        """
        main = self.ctx.is_main
        previous = gather_objects(read_summary(self.run_dir / SUMMARY_FILE) if main else None)[0]
        if not resumed_at_end or previous is None or previous.get("steps") != self.step:
            previous = None  # a summary of another session's end, or of an earlier stop
        else:
            result = result.with_training_of(previous)
        has_backbone = gather_objects(main and (self.run_dir / BACKBONE_FILE).is_file())[0]
        if previous is None or not has_backbone:
            self.export_backbone()
        self._write_summary(result)
        self._stop_if_requested()
        if not self.evaluator.enabled:
            return result
        kept = previous or {}
        probes, error = self._kept_or_run(kept.get("probes"), self.final_probes)
        if probes is not None:
            best = probes.knn_top1 > self.best_knn
            self._record_best_knn(probes.knn_top1, self.step)
            if best:
                self.checkpointer.link_best(self.step)
        result = dataclasses.replace(
            result,
            knn_top1=probes.knn_top1 if probes is not None else None,
            probes=probes,
            probe_error=error,
        )
        self._write_summary(result)
        self._stop_if_requested()
        if probes is None or not self.cfg.eval.baseline:
            return result
        baseline, baseline_error = self._kept_or_run(kept.get("baseline"), self.baseline_probes)
        result = dataclasses.replace(result, baseline=baseline, baseline_error=baseline_error)
        self._write_summary(result)
        return result

    def _write_summary(self, result: TrainResult) -> None:
        """``summary.json`` as it stands (written by the main process)."""
        if self.ctx.is_main:
            write_summary(self.run_dir / SUMMARY_FILE, result)

    def _kept_or_run(
        self, kept: Any, probe: Callable[[int], Probes | None]
    ) -> tuple[Probes | None, str | None]:
        """Probes an earlier session of this run recorded whole, or ``probe(step)`` run now."""
        if _complete(kept):
            return Probes(**kept), None
        return self._guarded(lambda: probe(self.step))

    def _guarded(self, probe: Callable[[], Probes | None]) -> tuple[Probes | None, str | None]:
        """Run an end-of-run probe; a failure is printed and returned as one line, since the
        trained model is already saved and must not be lost to an evaluation error."""
        try:
            return probe(), None
        except Exception as error:
            message = f"{type(error).__name__}: {one_line(error)}"
            if self.ctx.is_main:
                self.console.print(
                    f"warning: the end-of-run probes failed ({message}); the checkpoint and "
                    f"{BACKBONE_FILE} are saved, and summary.json records the error",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )
            return None, message

    def _record_best_knn(self, knn: float, step: int) -> None:
        """Keep the best kNN top-1 so far (carried by checkpoints: right across resumed
        sessions, where W&B's per-session summary max of ``knn/top1`` is not) and log it."""
        self.best_knn = max(self.best_knn, knn)
        self.logger.log({"knn/best": self.best_knn}, step=step)

    def _stop_if_requested(self) -> None:
        """After the last step: stop on a signal that came during the end-of-run work."""
        signum = self.preemption.requested()
        if signum:
            self._stop(signum, self.step)

    def image_batches(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """Images of each micro-batch, forever: one batch, or a pair of batches already cropped
        (one per view, from image folders). The loader moves to the next epoch by itself."""
        while True:
            for images, _ in self.loader:
                yield tuple(images) if isinstance(images, list | tuple) else images

    def micro_batches_of(self, step: int) -> int:
        """How many micro-batches step ``step`` (1-based) accumulates: ``accumulate_grad_batches``,
        except the last step of an epoch, which takes the epoch's remaining micro-batches."""
        accumulate = self.cfg.trainer.accumulate_grad_batches
        if step % self.steps_per_epoch:
            return accumulate
        return len(self.loader) - (self.steps_per_epoch - 1) * accumulate

    def images_of(self, micro_batches: int) -> int:
        """Images in ``micro_batches`` micro-batches over all processes."""
        return micro_batches * self.cfg.data.batch_size * self.ctx.world_size

    def train_step(
        self, batches: Iterator[Tensor | tuple[Tensor, Tensor]], micro_batches: int | None = None
    ) -> Tensor:
        """One optimizer step over ``micro_batches`` micro-batches (default
        ``accumulate_grad_batches``); returns the loss, the mean over them.

        Gradients are averaged over the micro-batches; what a loss computes over its batch
        (negatives, batch-norm statistics, Barlow Twins' cross-correlation) stays per
        micro-batch.
        """
        accumulate = micro_batches or self.cfg.trainer.accumulate_grad_batches
        precision = self.cfg.trainer.precision
        total = torch.zeros((), device=self.device)
        for micro in range(accumulate):
            images = next(batches)
            if isinstance(images, tuple):
                images = tuple(x.to(self.device, non_blocking=True) for x in images)
            else:
                images = images.to(self.device, non_blocking=True)
            view_a, view_b = self.augment(images)
            view_a = view_a.contiguous(memory_format=self.memory_format)
            view_b = view_b.contiguous(memory_format=self.memory_format)
            autocast = torch.autocast(
                self.device.type, dtype=_AMP_DTYPES.get(precision), enabled=precision != "fp32"
            )
            with gradient_sync(self.model, enabled=micro == accumulate - 1):
                with autocast:
                    loss = self.compute_loss(view_a, view_b) / accumulate
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        scale = self.scaler._scale.clone() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # An overflow makes the scaler skip the step and lower its scale (no host sync here).
        skipped = self.scaler._scale < scale if scale is not None else None
        self.health.record(self.step, total, skipped)
        return total

    def _log_trust_ratios(self, step: int) -> None:
        """Log the optimizer's trust ratios, if it has any (LARS), at ``step``."""
        trust_ratios = getattr(self.optimizer, "trust_ratios", None)
        if trust_ratios is not None:
            self.logger.log_trust_ratios(trust_ratios(adapted_only=True), step=step)

    def _check_health(self) -> None:
        """Raise :class:`Diverged` if training diverged, saying which checkpoint is left, after
        closing the logger (so the run's files are complete)."""
        try:
            self.health.check()
        except Diverged as error:
            self.logger.finish()
            last = self.checkpointer.path
            left = (
                f"the last checkpoint, {last} (step {self.checkpointer.last_saved}), is intact"
                if self.checkpointer.last_saved
                else "no checkpoint had been written yet"
            )
            raise Diverged(f"{error}; training stopped and {left}") from None

    def _stop(self, signum: int, step: int) -> None:
        """After a stop signal: log it (with the images skipped since the last log row),
        close the logger and raise :class:`Preempted`."""
        self.logger.log({"train/preempted_at": step, **self._data_metrics()}, step=step)
        self.logger.finish()
        raise Preempted(signum, step, self.checkpointer.path)

    def _data_metrics(self) -> dict[str, Any]:
        """``data/skipped`` with ``data.skip_bad``: the images of every process skipped so far
        because they do not decode, listed in the run directory as they are met."""
        if not self.cfg.data.skip_bad:
            return {}
        new = self.loader.skipped[self._skipped_sent :]
        self._skipped_sent += len(new)
        met = [path for paths in gather_objects(new) for path in paths]
        return {"data/skipped": self.skipped_images.add(met)}

    def _evaluate_saving_first_on_failure(self, step: int) -> float:
        """The kNN monitor after step ``step``; if it fails (an image of the evaluation data
        that does not decode, say), the step is saved before the error ends the run."""
        try:
            return self.evaluate(step)
        except Exception:
            self.checkpointer.save(step, last_step=True)
            raise

    def _health_metrics(self) -> dict[str, Any]:
        """``train/skipped_steps`` with fp16 (steps the scaler skipped on overflow)."""
        return {"train/skipped_steps": self.health.skipped_steps} if self.health.fp16 else {}

    def export_backbone(self) -> Path | None:
        """Write ``backbone.pt`` (the backbone's weights as a plain state dict) in the run
        directory and log it as an artifact; every rank calls it, the main one writes."""
        state = full_model_state(self.method.backbone)  # gathers the backbone alone
        if not self.ctx.is_main:
            return None
        path = self.run_dir / BACKBONE_FILE
        save_checkpoint(path, state)
        self.logger.log_artifact(path, name=f"backbone-{self.run_dir.name}", kind="model")
        return path

    def _method_metrics(self) -> dict[str, Any]:
        """The method's ``method/*`` metrics, tensors averaged over ranks."""
        return {
            key: all_reduce_mean(value.detach().float()) if isinstance(value, Tensor) else value
            for key, value in self.method.log_metrics().items()
        }

    def initial_method(self) -> Method:
        """A new method of this config with its initial weights: the same on every rank, from
        ``trainer.seed``, whatever the rank's own random streams are."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.trainer.seed)
            return build_method(self.cfg)

    def evaluate(self, step: int) -> float:
        """kNN top-1 of the method's features after step ``step``; every rank takes part, the
        main one logs ``knn/top1`` and prints it."""
        top1 = self.evaluator.knn_top1(self.method.embed)
        self.logger.log({"knn/top1": top1}, step=step)
        if self.ctx.is_main:
            self.console.print(f"step {step}: kNN top-1 {100 * top1:.2f}%")
        return top1

    def final_probes(self, step: int) -> Probes:
        """kNN and linear probes of the trained features at the end; logs ``knn/top1`` and
        ``probe/*``."""
        probes = self.evaluator.probes(self.method.embed)
        self.logger.log({"knn/top1": probes.knn_top1, **_probe_metrics(probes, "")}, step=step)
        if self.ctx.is_main:
            self.console.print(f"step {step}: kNN top-1 {100 * probes.knn_top1:.2f}%")
        return probes

    def baseline_probes(self, step: int) -> Probes | None:
        """The same probes for a randomly initialised encoder of this config (``eval.baseline``),
        logged as ``probe/baseline_*``; ``None`` when switched off."""
        if not self.cfg.eval.baseline:
            return None
        method = self.initial_method().to(self.device)
        probes = self.evaluator.probes(method.embed)
        self.logger.log(_probe_metrics(probes, "baseline_"), step=step)
        return probes

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this step left off.

        Every rank must call it: the model and optimizer state are gathered in full, and each
        rank's random state (global RNGs and augmentation generator) is collected, so that a
        resumed run with as many processes gives each rank its own streams back. The main
        rank gets the whole state; on the others ``model`` and ``optimizer`` are empty (only
        the main rank writes the checkpoint).
        """
        per_rank = {"augment_generator": self.augment_generator.get_state()}
        per_rank["rng"] = capture_rng_state()
        return {
            **full_state(self.method, self.optimizer),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "loader": self.loader.state_dict(),
            "ranks": gather_objects(per_rank),
            "best_knn": self.best_knn,
            "wandb_run_id": getattr(self.logger, "run_id", None),
            "config": self.cfg.to_dict(),
        }

    def _resume(self, resume: Path | str) -> str | None:
        """Continue from ``resume`` (a path, or ``"auto"``); returns the W&B run id."""
        if resume != "auto":
            return self._load(Path(resume))
        found = load_latest(self.run_dir)
        if found is None:
            if self.ctx.is_main:
                self.console.print(
                    f"--resume auto: no checkpoint in {self.checkpointer.path.parent}, "
                    "starting from scratch",
                    soft_wrap=True,
                )
            return None
        return self._load(*found)

    def _load(self, path: Path, state: dict[str, Any] | None = None) -> str | None:
        """Restore a :meth:`state_dict` from ``path`` on every rank; returns the W&B run id.

        With as many processes as wrote it, every rank gets its own random streams back and the
        run continues exactly. With another number, progress is kept in images: the step
        becomes the one that has seen as many images at this run's global batch, the data
        order continues from the same image of the epoch, and each rank's random streams are
        re-seeded, with a warning.
        """
        state = state if state is not None else load_checkpoint(path)
        if "ranks" not in state:
            raise CheckpointError(
                f"checkpoint {path} holds no per-process state (an older format); start a new run"
            )
        try:
            load_full_state(self.method, self.optimizer, state)
            self.scaler.load_state_dict(state["scaler"])
            self.step = int(state["step"])
            self.best_knn = float(state.get("best_knn", float("-inf")))
            ranks, loader = state["ranks"], state["loader"]
            if len(ranks) == self.ctx.world_size:
                self.augment_generator.set_state(ranks[self.ctx.rank]["augment_generator"])
                restore_rng_state(ranks[self.ctx.rank]["rng"])
            else:
                loader = self._rescaled_loader_state(state, len(ranks))
                self._reseed_after_resume(path, len(ranks))
            self.loader.load_state_dict(loader)
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            first_line = one_line(str(err).strip().splitlines()[0] if str(err).strip() else err)
            raise CheckpointError(
                f"checkpoint {path} does not match this config ({first_line})"
            ) from None
        self.checkpointer.last_saved = self.step
        if self.ctx.is_main:
            self.console.print(f"resumed from {path} at step {self.step}", soft_wrap=True)
            changes = config_changes(state.get("config"), self.cfg.to_dict())
            if changes:
                warnings.warn(
                    f"{path} was written under another config; this run continues it with "
                    f"{'; '.join(changes)}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return state.get("wandb_run_id")

    def _rescaled_loader_state(
        self, state: dict[str, Any], saved_world_size: int
    ) -> dict[str, Any]:
        """The loader state and step of a checkpoint written by another number of processes:
        the same epoch and, within it, as many images seen as the global batches allow."""
        loader = state["loader"]
        images = loader["position"] * state["config"]["data"]["batch_size"] * saved_world_size
        accumulate = self.cfg.trainer.accumulate_grad_batches
        steps = images // self.images_of(accumulate)  # whole optimizer steps of this run
        self.step = loader["epoch"] * self.steps_per_epoch + steps
        return {**loader, "position": steps * accumulate}

    def _reseed_after_resume(self, path: Path, saved_world_size: int) -> None:
        """New random streams for a resume with another number of processes."""
        seed = self.cfg.trainer.seed + 1_000_003 * self.step
        _seed_everything(seed + self.ctx.rank)
        self.augment_generator.manual_seed(_augment_seed(seed, self.ctx.rank))
        if self.ctx.is_main:
            warnings.warn(
                f"{path} was written by {saved_world_size} process(es) and this run has "
                f"{self.ctx.world_size}: it continues at step {self.step} of {self.total_steps} "
                "from the same point of the epoch, and the augmentation and random streams "
                "were re-seeded",
                RuntimeWarning,
                stacklevel=3,
            )


class _LogWindow:
    """Loss and throughput since the last log row; the loss stays on the device until then."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.steps = 0
        self.images = 0
        self.since = time.perf_counter()

    def add(self, loss: Tensor, images: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.images += images

    def flush(self) -> tuple[float, float]:
        """Mean loss over the window's steps and all ranks, and images/s; then start anew."""
        now = time.perf_counter()
        loss = all_reduce_mean(self.loss_sum / self.steps).item()
        speed = self.images / max(now - self.since, 1e-9)
        self.loss_sum.zero_()
        self.steps, self.images, self.since = 0, 0, now
        return loss, speed


def _probe_metrics(probes: Probes, prefix: str) -> dict[str, float]:
    return {
        f"probe/{prefix}knn_top1": probes.knn_top1,
        f"probe/{prefix}linear_top1": probes.linear_top1,
        f"probe/{prefix}linear_top1_few_labels": probes.linear_top1_few_labels,
    }


def config_changes(saved: Any, current: dict[str, Any], limit: int = 8) -> list[str]:
    """``key: saved -> current`` for each dotted key whose value differs between a
    checkpoint's config and this run's (at most ``limit``, then a count of the rest)."""
    if not isinstance(saved, dict):
        return []
    old, new = _flatten(saved), _flatten(current)
    changed = [key for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
    lines = [
        f"{key}: {short_repr(old.get(key))} -> {short_repr(new.get(key))}"
        for key in changed[:limit]
    ]
    if len(changed) > limit:
        lines.append(f"and {len(changed) - limit} more")
    return lines


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{dotted.key: value}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _complete(probes: Any) -> bool:
    """True when ``probes`` (from ``summary.json``) is a whole record of probes, no error."""
    return isinstance(probes, dict) and set(probes) == {
        field.name for field in dataclasses.fields(Probes)
    }


def _set_deterministic(enabled: bool) -> None:
    """Deterministic algorithms where torch has them, or torch's defaults (process-wide).

    ``warn_only``: a few CUDA kernels have no deterministic version (the backward of
    ``AdaptiveAvgPool2d``, which every ResNet has, among them); torch warns on those instead of
    stopping the run, and they stay the one source of run-to-run differences on GPU.
    """
    if enabled:
        # cuBLAS needs a fixed workspace to be deterministic; set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def _augment_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s augmentation generator: a stream of its own."""
    return seed * 1_000_003 + rank + 1


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
