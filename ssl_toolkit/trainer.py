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

import time
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import Tensor, nn

from optim import (
    ConfigError,
    build_optimizer,
    require_trainable,
    scale_lr,
    set_hyperparameter,
    set_lr,
    warmup_cosine,
)
from optim.errors import short_repr
from ssl_toolkit.accumulation import accumulate
from ssl_toolkit.checkpoint import (
    Checkpointer,
    CheckpointError,
    atomic_write,
    load_latest,
    mismatch,
    step_checkpoints,
)
from ssl_toolkit.config import ExperimentConfig
from ssl_toolkit.data import (
    CropViews,
    TensorBatchLoader,
    build_dataset,
    build_loader,
    crop_sizes,
)
from ssl_toolkit.data.device_decode import DeviceViews
from ssl_toolkit.data.fingerprint import data_changes, data_record
from ssl_toolkit.data.listing import warn_if_run_inside
from ssl_toolkit.distributed import (
    DistContext,
    all_reduce_mean,
    gather_objects,
    setup_distributed,
)
from ssl_toolkit.evaluation import Evaluator
from ssl_toolkit.export import BACKBONE_FILE
from ssl_toolkit.health import Diverged, TrainingHealth
from ssl_toolkit.methods import Method, build_method
from ssl_toolkit.metric_logger import FanOut, MetricLogger
from ssl_toolkit.metrics_file import MetricsFile
from ssl_toolkit.parallel import ModelState, OptimizerState, full_model_state, parallelize
from ssl_toolkit.preemption import Preempted, PreemptionGuard
from ssl_toolkit.preflight import check_accumulation, check_batch_fits, dry_forward
from ssl_toolkit.report import SUMMARY_FILE, TrainingProgress, TrainResult, print_summary
from ssl_toolkit.run_end import RunEnd
from ssl_toolkit.run_lock import RunDirectoryError, RunLock
from ssl_toolkit.runtime import (
    LossScaler,
    PerRankMethodState,
    RandomStreams,
    autocast,
    set_deterministic,
)
from ssl_toolkit.skipped_images import SkippedImages
from ssl_toolkit.sync_batch_norm import convert_sync_batchnorm, sync_bn_group, wants_sync_bn
from ssl_toolkit.wandb_logger import WandbLogger

__all__ = ["TrainResult", "Trainer"]


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
        set_deterministic(cfg.trainer.deterministic)
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
        if cfg.data.decode != "cpu" and self.device.type != cfg.data.decode:
            raise ConfigError(
                [
                    f"data.decode: {cfg.data.decode} needs the run on a CUDA device; it runs "
                    f"on {self.device.type} (use data.decode=cpu)"
                ]
            )
        self.streams = RandomStreams(cfg.trainer.seed, self.ctx.rank, self.ctx.world_size)
        """This rank's random streams (global generators and augmentation), seeded per rank."""

        warn_if_run_inside(self.run_dir, cfg.data.root)
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
                crops=tuple(cfg.data.crops) if cfg.data.crops is not None else None,
                decode=cfg.data.decode,
            ),
            index_dir=cfg.data.index_dir,
            skip_bad=cfg.data.skip_bad,
            num_classes=cfg.data.num_classes,
        )
        self.device_views = None
        """Decodes and crops each batch on the device (``data.decode: cuda``), else None."""
        if cfg.data.decode != "cpu":
            self.device_views = DeviceViews(self.train_set.views, self.device)
        check_batch_fits(len(self.train_set), cfg.data.batch_size, self.ctx.world_size)
        self.data_record = data_record(self.train_set)
        """What the run trains on (counts and a digest of the listing), kept in checkpoints."""
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
            try:
                group = sync_bn_group(cfg.model.sync_bn_group_size)
            except ValueError as err:
                raise ConfigError([f"model.sync_bn_group_size: {err} (null: all)"]) from None
            convert_sync_batchnorm(self.method, self.device, group)
        self.method.to(self.device)
        view_sizes = crop_sizes(cfg.data.views())
        try:
            self.method.check_views(view_sizes)
        except ValueError as err:
            raise ConfigError([f"data.crops: {err}"]) from None
        self.augment = self.method.augmentation(
            cfg.data.image_size,
            crop_scale=(cfg.data.crop_min_scale, 1.0),
            color_strength=cfg.data.color_strength,
            generator=self.streams.augment_generator,
        ).with_overrides(**cfg.data.augment.model_dump(exclude_none=True))
        if cfg.data.crops is not None:
            self.augment.with_crops(cfg.data.crops)
        self.augment.to(self.device)
        self.memory_format = (
            torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
        )
        if cfg.trainer.strategy != "fsdp2":  # FSDP2 shards contiguous parameters only
            self.method.to(memory_format=self.memory_format)
        require_trainable(self.method.trainable_module())  # DDP would fail on it first
        dry_forward(
            self.method,
            backbone=cfg.model.backbone,
            view_sizes=view_sizes,
            sizes_from="data.crops" if cfg.data.crops is not None else "data.image_size",
            device=self.device,
            memory_format=self.memory_format,
        )
        self.model: nn.Module = parallelize(self.method, self.ctx, cfg.trainer.strategy)
        """The method as the strategy wraps it (DDP, FSDP2 or itself)."""
        self.optimizer = build_optimizer(cfg.optim, self.method.trainable_module())
        self.scaler = LossScaler(self.device.type, enabled=cfg.trainer.precision == "fp16")
        self.embed_model = torch.compile(self.model) if cfg.trainer.compile else self.model
        """What each micro-batch calls for its embeddings: :attr:`model`, compiled if asked."""
        self.autocast = autocast(cfg.trainer.precision, self.device)

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
        components = {
            "model": ModelState(self.method),
            "optimizer": OptimizerState(self.method, self.optimizer),
            "scaler": self.scaler,
            "loader": self.loader,
            "ranks": self.streams,
            "trainer": self,
        }
        if type(self.method).rank_state_dict is not Method.rank_state_dict:
            components["method_ranks"] = PerRankMethodState(
                self.method, self.ctx.rank, self.ctx.world_size
            )
        self.checkpointer = Checkpointer(
            self.run_dir,
            components,
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
        self.run_end = RunEnd(
            self.run_dir,
            self.evaluator,
            features=self.method.features,
            random_features=self._random_features if cfg.eval.baseline else None,
            backbone_state=lambda: full_model_state(self.method.evaluated_backbone()),
            logger=lambda: self.logger,
            link_best=self.checkpointer.link_best,
            stop_if_requested=self._stop_if_requested,
            console=self.console,
            is_main=self.ctx.is_main,
        )
        """The end of the run, and the best kNN top-1 so far (in :meth:`state_dict`)."""
        self.resumed_run_id: str | None = None
        """The W&B run id of the checkpoint resumed from (``None`` for a fresh run)."""
        self.saved_config: dict[str, Any] | None = None
        """The config of the checkpoint resumed from, to warn about what changed."""
        self.saved_data: dict[str, Any] | None = None
        """The data record of the checkpoint resumed from (``None``: it has none)."""
        if resume is None:
            self._start_fresh()
        run_id = self._resume(resume) if resume is not None else None
        self.skipped_images = SkippedImages(
            self.run_dir, resumed=self.step > 0, enabled=self.ctx.is_main
        )
        self._skipped_sent = 0  # this process's skipped images already given to the list
        self.logger: MetricLogger = FanOut(
            MetricsFile(self.run_dir, resumed_at=self.step, enabled=self.ctx.is_main),
            logger
            or WandbLogger(
                **cfg.logging.wandb.model_dump(),
                run_dir=self.run_dir,
                config=cfg.to_dict(),
                run_id=run_id,
                enabled=self.ctx.is_main,
            ),
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
            warmup_from=self.cfg.schedule.warmup_from,
            warmup_peak_at=self.cfg.schedule.warmup_peak_at,
        )

    def scheduled_at(self, step: int) -> dict[str, float]:
        """The values the ``schedule:`` entries give the optimizer's other hyperparameters at
        step ``step`` (1-based; before group scales): each warms up from 0 and then follows a
        cosine from the optimizer's own value to its ``end``, as the lr does."""
        values = {}
        for key, schedule in self.cfg.schedule.scheduled().items():
            warmup = round(schedule.warmup_epochs * self.steps_per_epoch)
            values[key] = warmup_cosine(
                step - 1,
                total_steps=self.total_steps,
                warmup_steps=min(self.total_steps, warmup),
                peak_lr=getattr(self.cfg.optim, key),
                final_lr=schedule.end,
            )
        return values

    def fit(self, stop_at_step: int | None = None) -> TrainResult:
        """Train until ``total_steps``, evaluating, logging and saving when each is due.

        ``stop_at_step`` ends the run early after saving a checkpoint, as a preemption would:
        ``--resume`` then continues it exactly. At the end of the run the final checkpoint and
        ``backbone.pt`` are written before any probe runs (:meth:`RunEnd.finish`). The run
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
                images += self._optimizer_step(batches, window)
                logged = self._log_if_due(first, end, window, progress)
                loss = logged if logged is not None else loss
                top1, best = self._evaluate_if_due()
                knn = top1 if top1 is not None else knn
                if self.step == self.total_steps:  # the final checkpoint carries them
                    self.run_end.record_training(self._result(loss, knn, images, start))
                self._save_if_due(end, best)
            result = self._result(loss, knn, images, start)
            if self.step == self.total_steps:
                result = self.run_end.finish(result, resumed_at_end=first > self.total_steps)
        if self.step < self.total_steps:
            self.run_end.write_summary(result)
        self.run_end.write_report(self.step)
        self.logger.finish()
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

    def _result(self, loss: float, knn: float | None, images: int, start: float) -> TrainResult:
        """This session's training so far: its last logged loss and kNN, and ``images``
        images since ``start`` (``time.perf_counter()``)."""
        seconds = time.perf_counter() - start
        return TrainResult(
            steps=self.step,
            epochs=self.step / self.steps_per_epoch,
            final_loss=loss,
            knn_top1=knn,
            images_per_s=images / max(seconds, 1e-9),
            seconds=seconds,
            run_dir=self.run_dir,
        )

    def _optimizer_step(self, batches: Iterator[Any], window: _LogWindow) -> int:
        """Step ``self.step + 1``: its lr and scheduled hyperparameters, its micro-batches, the
        optimizer and the method's hook; returns the images it took (over all processes)."""
        self.step += 1
        set_lr(self.optimizer, self.lr_at(self.step))
        for key, value in self.scheduled_at(self.step).items():
            set_hyperparameter(self.optimizer, key, value)
        self.method.before_optimizer_step(self.step, self.steps_per_epoch)
        micro_batches = self.micro_batches_of(self.step)
        images = self.images_of(micro_batches)
        window.add(self.train_step(batches, micro_batches), images)
        self.method.after_optimizer_step(self.step, self.total_steps)
        return images

    def _log_if_due(
        self, first: int, end: int, window: _LogWindow, progress: TrainingProgress
    ) -> float | None:
        """Trust ratios on their cadence; a row of the window's loss, lr and speed every
        ``log_every_steps`` and at the last step (returns its loss; ``None`` when no row)."""
        step = self.step
        if step == first or step % self.cfg.logging.trust_ratio_every == 0:
            self._log_trust_ratios(step)
        if step % self.cfg.trainer.log_every_steps and step != end:
            progress.update(step)
            return None
        self._check_health()
        loss, speed = window.flush()
        lr = self.lr_at(step)
        row = {"train/loss": loss, "train/lr": lr, "train/img_per_s": speed}
        row |= {f"train/{key}": value for key, value in self.scheduled_at(step).items()}
        row |= self._health_metrics() | self._data_metrics()
        self.logger.log(row | self._method_metrics(), step=step)
        progress.update(step, loss=loss, lr=lr, speed=speed)
        return loss

    def _evaluate_if_due(self) -> tuple[float | None, bool]:
        """The kNN monitor when due (not at the run's last step, whose kNN comes with the
        final probes, after saving): its top-1 and whether it is the best so far."""
        step = self.step
        if step == self.total_steps or not self.evaluator.should_evaluate(step):
            return None, False
        top1 = self._evaluate_saving_first_on_failure(step)
        return top1, self.run_end.record_best_knn(top1, step)

    def _save_if_due(self, end: int, best: bool) -> None:
        """A checkpoint when due, at the end of this ``fit`` and on a stop signal, after
        which the run stops."""
        signum = self.preemption.requested()
        self.checkpointer.save(self.step, last_step=self.step == end or bool(signum), best=best)
        if signum:
            self._stop(signum, self.step)

    def _stop_if_requested(self) -> None:
        """After the last step: stop on a signal that came during the end-of-run work."""
        signum = self.preemption.requested()
        if signum:
            self._stop(signum, self.step)

    def image_batches(self) -> Iterator[Tensor | tuple[Tensor, ...]]:
        """Images of each micro-batch, forever: one batch, or a tuple of batches already
        cropped (one per view, from image folders). The loader moves to the next epoch by itself."""
        while True:
            for images, _ in self.loader:
                if self.device_views is not None:
                    images = self.device_views(images)
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
        self, batches: Iterator[Tensor | tuple[Tensor, ...]], micro_batches: int | None = None
    ) -> Tensor:
        """One optimizer step over ``micro_batches`` micro-batches (default
        ``accumulate_grad_batches``); returns its loss.

        The forward and backward passes are :func:`~ssl_toolkit.accumulation.accumulate`'s:
        with ``trainer.accumulation: exact`` the loss is that of all the step's micro-batches
        joined, with ``independent`` the mean of their own losses.
        """
        count = micro_batches or self.cfg.trainer.accumulate_grad_batches
        views = [self.views_of(next(batches)) for _ in range(count)]
        loss = accumulate(
            self.method,
            views,
            exact=self.cfg.trainer.accumulation == "exact",
            model=self.embed_model,
            scaler=self.scaler,
            autocast=self.autocast,
        )
        skipped = self.scaler.step_and_update(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.health.record(self.step, loss, skipped)
        return loss

    def views_of(self, images: Tensor | tuple[Tensor, ...]) -> list[Tensor]:
        """The augmented views of a micro-batch of images, on the device, in the run's memory
        format."""
        if isinstance(images, tuple):
            images = tuple(x.to(self.device, non_blocking=True) for x in images)
        else:
            images = images.to(self.device, non_blocking=True)
        return [v.contiguous(memory_format=self.memory_format) for v in self.augment(images)]

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
            return build_method(self.cfg.method, **self.cfg.model.backbone_options())

    def evaluate(self, step: int) -> float:
        """kNN top-1 of the method's features after step ``step``; every rank takes part, the
        main one logs ``knn/top1`` and prints it."""
        top1 = self.evaluator.knn_top1(self.method.features)
        self.logger.log({"knn/top1": top1}, step=step)
        if self.ctx.is_main:
            self.console.print(f"step {step}: kNN top-1 {100 * top1:.2f}%")
        return top1

    def _random_features(self) -> Callable[[Tensor], Tensor]:
        """The features of a new, randomly initialised method of this config (the baseline of
        the end-of-run probes)."""
        return self.initial_method().to(self.device).features

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own part of a checkpoint: the steps done, the best kNN so far, the
        training figures (once at the run's last step: :meth:`RunEnd.record_training`), the
        W&B run id, the config it ran and the data it trained on (the other components save
        themselves)."""
        return {
            "step": self.step,
            "best_knn": self.run_end.best_knn,
            "training": self.run_end.training,
            "wandb_run_id": getattr(self.logger, "run_id", None),
            "config": self.cfg.to_dict(),
            "data": self.data_record,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the step and best kNN; the W&B run id, the saved
        config and data record are kept for the resume (:attr:`resumed_run_id`,
        :attr:`saved_config`, :attr:`saved_data`; a checkpoint of an earlier version has no
        data record)."""
        self.step = int(state["step"])
        self.run_end.best_knn = float(state["best_knn"])
        self.run_end.training = state.get("training")  # the training figures, once finished
        self.resumed_run_id = state["wandb_run_id"]
        self.saved_config = state["config"]
        self.saved_data = state.get("data")

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
        """Restore every component from the checkpoint ``path``; returns the W&B run id.

        With as many processes as wrote it, every rank gets its own random streams back and the
        run continues exactly. With another number of processes, batch size or accumulation,
        progress is kept in images (the loader keeps the images seen in the epoch) and the
        step becomes the one that has seen as many images at this run's global batch; with
        another number of processes each rank's random streams are also re-seeded, with a
        warning.
        """
        self.checkpointer.restore(path, state)
        data_changed = self._data_changed(path)
        if data_changed or not self.streams.restored or not self._same_batches(self.saved_config):
            try:
                self._continue_from_the_images_seen(path, data_changed=data_changed)
            except ValueError as err:  # more batches seen than this run's epoch holds
                raise mismatch(path, f"loader: {err}") from None
        self.checkpointer.last_saved = self.step
        if self.ctx.is_main:
            self.console.print(f"resumed from {path} at step {self.step}", soft_wrap=True)
            changes = config_changes(self.saved_config, self.cfg.to_dict())
            if changes:
                warnings.warn(
                    f"{path} was written under another config; this run continues it with "
                    f"{'; '.join(changes)}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return self.resumed_run_id

    def _same_batches(self, saved: dict[str, Any] | None) -> bool:
        """True when a checkpoint's config counted steps in this run's micro-batches (the
        same batch size and accumulation; an unknown config counts as the same)."""
        if not isinstance(saved, dict):
            return True
        now = self.cfg.to_dict()
        return all(
            saved.get(section, {}).get(key) == now[section][key]
            for section, key in (("data", "batch_size"), ("trainer", "accumulate_grad_batches"))
        )

    def _data_changed(self, path: Path) -> bool:
        """Whether the data differs from the checkpoint's record: a :class:`CheckpointError`
        naming what changed, unless ``data.allow_changed`` (then a warning, and True). A
        checkpoint without a record (an earlier version's) resumes unchecked, with a note."""
        main = self.ctx.is_main
        if self.saved_data is None:
            if main:
                self.console.print(
                    f"note: {path} records nothing of the data it was trained on (an earlier "
                    "version's checkpoint): the resume does not check the data",
                    markup=False,
                    soft_wrap=True,
                )
            return False
        changes = data_changes(self.saved_data, self.data_record)
        if changes is None:
            return False
        data = self.cfg.data
        where = f"data.root={data.root}" if data.root is not None else f"data.name={data.name}"
        changed = f"data changed since the checkpoint {path} was written: {changes} ({where})"
        if not data.allow_changed:
            raise CheckpointError(
                f"{changed}; to continue on the data as it is now, set data.allow_changed=true"
            )
        if main:
            warnings.warn(
                f"{changed}; data.allow_changed=true: the interrupted epoch continues from the "
                "same point in the order drawn for it over the data as it is now",
                RuntimeWarning,
                stacklevel=4,
            )
        return True

    def _continue_from_the_images_seen(self, path: Path, *, data_changed: bool = False) -> None:
        """After a checkpoint that counted steps in other batches or epochs of other data:
        start at the whole optimizer step of this run that the loader's position holds (at
        most the end of the epoch, when the data shrank); with another number of processes,
        with new random streams."""
        accumulate = self.cfg.trainer.accumulate_grad_batches
        position = self.loader.position
        if data_changed:
            position = min(position, len(self.loader))
        steps = position // accumulate
        self.step = self.loader.epoch * self.steps_per_epoch + steps
        self.loader.seek(steps * accumulate)
        if self.streams.restored:
            return
        self.streams.reseed(self.cfg.trainer.seed + 1_000_003 * self.step)
        if self.ctx.is_main:
            warnings.warn(
                f"{path} was written by {self.streams.saved_world_size} process(es) and this "
                f"run has {self.ctx.world_size}: it continues at step {self.step} of "
                f"{self.total_steps} from the same point of the epoch, and the augmentation and "
                "random streams were re-seeded",
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


# Keys that say how to resume, not what is trained: set for one resume, they are no change.
_RESUME_SWITCHES = frozenset({"data.allow_changed"})


def config_changes(saved: Any, current: dict[str, Any], limit: int = 8) -> list[str]:
    """``key: saved -> current`` for each dotted key whose value differs between a
    checkpoint's config and this run's (at most ``limit``, then a count of the rest)."""
    if not isinstance(saved, dict):
        return []
    old, new = _flatten(saved), _flatten(current)
    changed = [
        key
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and key not in _RESUME_SWITCHES
    ]
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
