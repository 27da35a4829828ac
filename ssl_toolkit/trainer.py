"""One training loop for SimCLR and BYOL: data, augmentation, AMP, schedule, logging, resume.

Everything that depends on where the process runs (device, rank, who writes files) comes from
one ``DistContext``, so DDP through torchrun slots in without another loop. Every source of
randomness (global RNGs, data order, augmentation generator) is saved in the checkpoint, so a
resumed run on CPU continues bit for bit.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import Dataset

from models import PredictionHead, ProjectionHead, build_backbone
from optim import build_optimizer, scale_lr, set_lr, warmup_cosine
from ssl_toolkit.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from ssl_toolkit.config import ExperimentConfig
from ssl_toolkit.data import (
    BYOLAugment,
    SimCLRAugment,
    TensorBatchLoader,
    build_dataset,
    build_loader,
)
from ssl_toolkit.data.augment import IMAGENET_MEAN, IMAGENET_STD
from ssl_toolkit.data.functional import normalize
from ssl_toolkit.distributed import DistContext, setup_distributed
from ssl_toolkit.evaluation import extract_features, knn_top1
from ssl_toolkit.methods import BYOL, SimCLR, cosine_tau
from ssl_toolkit.wandb_logger import WandbLogger

__all__ = ["TrainResult", "Trainer", "build_method", "encode", "eval_datasets", "last_checkpoint"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def build_method(cfg: ExperimentConfig) -> SimCLR | BYOL:
    """The model of ``cfg.method`` on the backbone of ``cfg.model``."""
    backbone = build_backbone(cfg.model.backbone, cifar_stem=cfg.model.cifar_stem)
    head = cfg.method.projector
    projector = ProjectionHead(
        backbone.num_features, head.hidden_dim, head.out_dim, num_layers=head.num_layers
    )
    if cfg.method.name == "simclr":
        return SimCLR(backbone, projector, cfg.method.temperature)
    pred = cfg.method.predictor
    return BYOL(backbone, projector, PredictionHead(head.out_dim, pred.hidden_dim, pred.out_dim))


def last_checkpoint(cfg: ExperimentConfig) -> Path:
    """Where ``--resume auto`` looks: ``<output_dir>/checkpoints/last.pt``."""
    return Path(cfg.trainer.output_dir) / "checkpoints" / "last.pt"


class Trainer:
    """Pretrain ``cfg.method`` on ``cfg.data``; ``fit()`` runs to the end and returns a result.

    ``resume`` is a checkpoint path to continue from (``None``: start fresh). ``logger`` may be
    passed to record calls in tests; by default a ``WandbLogger`` writes under the run dir.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        resume: Path | None = None,
        logger: Any = None,
        console: Console | None = None,
        ctx: DistContext | None = None,
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx or setup_distributed(cfg.trainer.device)
        self.console = console or Console(stderr=True)
        self.run_dir = Path(cfg.trainer.output_dir)
        self.device = self.ctx.device
        _seed_everything(cfg.trainer.seed + self.ctx.rank)

        self.train_set = build_dataset(
            cfg.data.name, root=cfg.data.root, train=True, download=cfg.data.download
        )
        self.loader = build_loader(
            self.train_set,
            cfg.data.batch_size,
            generator=torch.Generator().manual_seed(cfg.trainer.seed),
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            num_workers=cfg.data.num_workers,
        )
        if isinstance(self.loader, TensorBatchLoader) and self.device.type == "cuda":
            self.loader.images = self.loader.images.to(self.device)
            self.loader.targets = self.loader.targets.to(self.device)
        self.augment_generator = torch.Generator().manual_seed(
            cfg.trainer.seed * 1_000_003 + self.ctx.rank + 1
        )
        self.augment = self._build_augment().to(self.device)

        self.method = build_method(cfg).to(self.device)
        self.memory_format = (
            torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
        )
        self.method.to(memory_format=self.memory_format)
        self.optimizer = build_optimizer(cfg.optim, self.method.trainable_module())
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=cfg.trainer.precision == "fp16"
        )
        self.model: nn.Module = self.method
        if self.ctx.is_distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.trainer.compile:
            self.model = torch.compile(self.model)

        accumulate = cfg.trainer.accumulate_grad_batches
        self.steps_per_epoch = max(1, len(self.loader) // accumulate)
        total = cfg.trainer.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.trainer.max_steps or total)
        self.global_batch = cfg.data.batch_size * accumulate * self.ctx.world_size
        self.peak_lr = scale_lr(cfg.optim.lr, self.global_batch, cfg.schedule.lr_scaling)
        self.warmup_steps = min(
            self.total_steps, round(cfg.schedule.warmup_epochs * self.steps_per_epoch)
        )
        self.step = 0
        self._eval_sets: tuple[Dataset, Dataset] | None = None
        run_id = None
        if resume is not None:
            run_id = self._load(resume)
        self.logger = logger or WandbLogger(
            **cfg.logging.wandb.model_dump(),
            run_dir=self.run_dir,
            config=cfg.to_dict(),
            run_id=run_id,
            enabled=self.ctx.is_main,
        )

    def _build_augment(self) -> SimCLRAugment | BYOLAugment:
        data = self.cfg.data
        common = dict(scale=(data.crop_min_scale, 1.0), generator=self.augment_generator)
        if self.cfg.method.name == "simclr":
            return SimCLRAugment(data.image_size, jitter_strength=data.color_strength, **common)
        return BYOLAugment(data.image_size, **common)

    def lr_at(self, step: int) -> float:
        """The scheduled learning rate of optimizer step ``step`` (before group lr scales)."""
        return warmup_cosine(
            step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            peak_lr=self.peak_lr,
            final_lr=self.cfg.schedule.final_lr,
        )

    def fit(self, stop_at_step: int | None = None) -> TrainResult:
        """Train until ``total_steps``, then evaluate, save and summarise.

        ``stop_at_step`` ends the run early after saving a checkpoint, as a preemption would:
        ``--resume`` then continues it exactly.
        """
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict()))
        end = self.total_steps if stop_at_step is None else min(stop_at_step, self.total_steps)
        batches = self._micro_batches()
        loss_sum = torch.zeros((), device=self.device)
        images_since_log, logged_loss = 0, float("nan")
        knn, evaluated_at = None, None
        start = last_log = time.perf_counter()
        first_step = self.step
        with self._progress() as progress:
            task = progress.add_task("pretraining", total=self.total_steps, completed=self.step)
            while self.step < end:
                lr = self.lr_at(self.step)
                set_lr(self.optimizer, lr)
                loss_sum += self._train_step(batches)
                images_since_log += self.global_batch
                step = self.step
                self.step += 1
                if step == first_step or step % self.cfg.logging.trust_ratio_every == 0:
                    self._log_trust_ratios(step)
                if self.step % self.cfg.trainer.log_every_steps == 0 or self.step == end:
                    now = time.perf_counter()
                    logged_loss = (loss_sum / self._steps_in_window(first_step)).item()
                    speed = images_since_log / max(now - last_log, 1e-9)
                    self.logger.log(
                        {"train/loss": logged_loss, "train/lr": lr, "train/img_per_s": speed},
                        step=step,
                    )
                    progress.update(
                        task, loss=f"{logged_loss:.4f}", lr=f"{lr:.3g}", speed=f"{speed:.0f}"
                    )
                    loss_sum.zero_()
                    images_since_log, last_log = 0, now
                progress.update(task, completed=self.step)
                epoch = self.step // self.steps_per_epoch
                epoch_end = self.step % self.steps_per_epoch == 0
                if epoch_end and epoch % self.cfg.eval.every_epochs == 0:
                    knn, evaluated_at = self.evaluate(step), self.step
                if epoch_end or self.step % self.cfg.trainer.checkpoint_every_steps == 0:
                    self.save()
        seconds = time.perf_counter() - start
        finished = self.step >= self.total_steps
        if finished and evaluated_at != self.step:
            knn = self.evaluate(self.step - 1)
        self.save()
        self.logger.finish()
        steps_run = self.step - first_step
        result = TrainResult(
            steps=self.step,
            epochs=self.step / self.steps_per_epoch,
            final_loss=logged_loss,
            knn_top1=knn,
            images_per_s=steps_run * self.global_batch / max(seconds, 1e-9),
            seconds=seconds,
            run_dir=self.run_dir,
        )
        if self.ctx.is_main:
            self._summary(result)
        return result

    def _steps_in_window(self, first_step: int) -> int:
        """Steps since the last log line (the loss is averaged over them)."""
        every = self.cfg.trainer.log_every_steps
        return min(self.step - first_step, self.step % every or every)

    def _micro_batches(self) -> Iterator[Tensor]:
        """Images of each micro-batch, forever; the loader moves to the next epoch by itself."""
        while True:
            for images, _ in self.loader:
                yield images

    def _train_step(self, batches: Iterator[Tensor]) -> Tensor:
        """One optimizer step over ``accumulate_grad_batches`` micro-batches; returns the loss."""
        accumulate = self.cfg.trainer.accumulate_grad_batches
        precision = self.cfg.trainer.precision
        total = torch.zeros((), device=self.device)
        for micro in range(accumulate):
            images = next(batches).to(self.device, non_blocking=True)
            view_a, view_b = self.augment(images)
            view_a = view_a.contiguous(memory_format=self.memory_format)
            view_b = view_b.contiguous(memory_format=self.memory_format)
            last = micro == accumulate - 1
            sync = (
                contextlib.nullcontext()
                if last or not self.ctx.is_distributed
                else self.model.no_sync()
            )
            autocast = torch.autocast(
                self.device.type, dtype=_AMP_DTYPES.get(precision), enabled=precision != "fp32"
            )
            with sync, autocast:
                loss = self.model(view_a, view_b) / accumulate
            self.scaler.scale(loss).backward()
            total += loss.detach().float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.method, BYOL):
            tau = cosine_tau(
                self.step, self.total_steps, self.cfg.method.tau_base, self.cfg.method.tau_final
            )
            self.method.update_target(tau)
        return total

    def _log_trust_ratios(self, step: int) -> None:
        trust_ratios = getattr(self.optimizer, "trust_ratios", None)
        if trust_ratios is not None:
            self.logger.log_trust_ratios(trust_ratios(adapted_only=True), step=step)

    def evaluate(self, step: int) -> float | None:
        """Weighted kNN top-1 of backbone features (main process); logs ``knn/top1``."""
        if not self.ctx.is_main:
            return None
        if self._eval_sets is None:
            self._eval_sets = eval_datasets(self.cfg)
        (bank, bank_labels), (test, test_labels) = (
            encode(self.method.embed, dataset, self.cfg, self.device, self.memory_format)
            for dataset in self._eval_sets
        )
        top1 = knn_top1(
            bank,
            bank_labels,
            test,
            test_labels,
            k=self.cfg.eval.knn_k,
            temperature=self.cfg.eval.knn_temperature,
            num_classes=int(max(bank_labels.max(), test_labels.max())) + 1,
        )
        self.logger.log({"knn/top1": top1}, step=step)
        self.console.print(f"step {step + 1}: kNN top-1 {100 * top1:.2f}%")
        return top1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this step left off."""
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "loader": self.loader.state_dict() if hasattr(self.loader, "state_dict") else None,
            "augment_generator": self.augment_generator.get_state(),
            "rng": capture_rng_state(),
            "wandb_run_id": getattr(self.logger, "run_id", None),
            "config": self.cfg.to_dict(),
        }

    def save(self) -> None:
        """Write ``checkpoints/last.pt`` atomically (main process only)."""
        if self.ctx.is_main:
            save_checkpoint(self.run_dir / "checkpoints" / "last.pt", self.state_dict())

    def _load(self, path: Path) -> str | None:
        state = load_checkpoint(path, map_location=self.device)
        try:
            self.method.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            if state["loader"] is not None:
                self.loader.load_state_dict(state["loader"])
            self.augment_generator.set_state(state["augment_generator"].cpu())
            restore_rng_state(state["rng"])
            self.step = int(state["step"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise CheckpointError(
                f"checkpoint {path} does not match this config ({first_line})"
            ) from None
        self.console.print(f"resumed from {path} at step {self.step}")
        return state.get("wandb_run_id")

    def _progress(self) -> Progress:
        return _ProgressWithFields(self.console, disable=not self.ctx.is_main)

    def _summary(self, result: TrainResult) -> None:
        table = Table(title="pretraining summary", show_header=False)
        knn = "-" if result.knn_top1 is None else f"{100 * result.knn_top1:.2f}%"
        for key, value in (
            ("method / backbone", f"{self.cfg.method.name} / {self.cfg.model.backbone}"),
            ("steps (epochs)", f"{result.steps} ({result.epochs:.1f})"),
            ("global batch", str(self.global_batch)),
            ("final loss", f"{result.final_loss:.4f}"),
            ("kNN top-1", knn),
            ("images/s", f"{result.images_per_s:.0f}"),
            ("time", f"{result.seconds:.0f} s"),
            ("run directory", str(result.run_dir)),
        ):
            table.add_row(key, value)
        self.console.print(table)


def eval_datasets(cfg: ExperimentConfig) -> tuple[Dataset, Dataset]:
    """The labelled splits of ``cfg.data``: the kNN bank / probe training set, and the test set."""
    bank_split = {"split": "train"} if cfg.data.name == "stl10" else {}
    bank = build_dataset(cfg.data.name, root=cfg.data.root, train=True, **bank_split)
    return bank, build_dataset(cfg.data.name, root=cfg.data.root, train=False)


def encode(
    encoder: Callable[[Tensor], Tensor],
    dataset: Dataset,
    cfg: ExperimentConfig,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[Tensor, Tensor]:
    """L2-normalised features of every image: resized to ``data.image_size``, normalised."""
    size = cfg.data.image_size
    mean = torch.tensor(IMAGENET_MEAN, device=device)
    std = torch.tensor(IMAGENET_STD, device=device)

    def transform(images: Tensor) -> Tensor:
        x = images.to(device, non_blocking=True).float() / 255.0
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return normalize(x, mean, std).contiguous(memory_format=memory_format)

    loader = build_loader(
        dataset,
        cfg.eval.batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=cfg.data.num_workers,
    )
    return extract_features(encoder, iter(loader), transform)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _ProgressWithFields(Progress):
    """A rich progress bar whose task shows loss, lr and images/s."""

    def __init__(self, console: Console, disable: bool) -> None:
        super().__init__(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} img/s"
            ),
            TimeRemainingColumn(),
            console=console,
            disable=disable,
        )

    def add_task(self, description: str, **kwargs: Any) -> Any:
        fields = {"loss": "-", "lr": "-", "speed": "-"}
        return super().add_task(description, **fields, **kwargs)
