"""The trainer end to end on tiny synthetic data: resume, logging, schedule, precision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from optim import warmup_cosine
from ssl_toolkit.config import ExperimentConfig
from ssl_toolkit.trainer import Trainer
from ssl_toolkit.wandb_logger import read_offline_history


def tiny_config(tmp_path: Path, method: str = "simclr", **trainer: Any) -> ExperimentConfig:
    """A timm test ResNet on 256 synthetic 32 px images, batches of 32: 8 steps per epoch."""
    heads = {"projector": {"hidden_dim": 32, "out_dim": 16}}
    if method == "byol":
        heads["predictor"] = {"hidden_dim": 32, "out_dim": 16}
    return ExperimentConfig.from_dict(
        {
            "method": {"name": method, **heads},
            "model": {"backbone": "timm/test_resnet"},
            "data": {"name": "synthetic", "batch_size": 32, "image_size": 32},
            "optim": {
                "name": "lars",
                "lr": 1.0,
                "exclude_from_layer_adaptation": ["@norm", "@bias"],
                "exclude_from_weight_decay": ["@norm", "@bias"],
            },
            "schedule": {"warmup_epochs": 0.5},
            "trainer": {
                "epochs": 2,
                "device": "cpu",
                "output_dir": str(tmp_path / "run"),
                "checkpoint_every_steps": 3,
                "log_every_steps": 2,
                **trainer,
            },
            "logging": {"wandb": {"mode": "disabled"}, "trust_ratio_every": 3},
            "eval": {"every_epochs": 1, "knn_k": 5, "batch_size": 128},
        }
    )


class RecordingLogger:
    """A logger double: keeps every call instead of writing a W&B run."""

    run_id = "recorded"

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, Any]]] = []
        self.trust_ratios: list[tuple[int, dict[str, float]]] = []
        self.finished = False

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def log_trust_ratios(self, ratios: dict[str, torch.Tensor], step: int) -> None:
        self.trust_ratios.append((step, {k: v.item() for k, v in ratios.items()}))

    def finish(self) -> None:
        self.finished = True


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    tensors = dict(trainer.method.state_dict())
    for i, state in trainer.optimizer.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": v for k, v in state.items()})
    return tensors


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_resume_continues_bit_identically(tmp_path: Path, method: str) -> None:
    """2N steps straight equal N steps, a checkpoint, a fresh trainer, and N more steps."""
    straight = Trainer(tiny_config(tmp_path / "a", method), logger=RecordingLogger())
    straight.fit()

    cfg = tiny_config(tmp_path / "b", method)
    Trainer(cfg, logger=RecordingLogger()).fit(stop_at_step=5)  # mid-epoch, mid-warmup
    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG state
    resumed = Trainer(
        cfg,
        resume=Path(cfg.trainer.output_dir) / "checkpoints" / "last.pt",
        logger=RecordingLogger(),
    )
    assert resumed.step == 5
    resumed.fit()
    assert resumed.step == straight.step == 16
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_logged_metrics_follow_schedule_and_optimizer(tmp_path: Path) -> None:
    logger = RecordingLogger()
    trainer = Trainer(tiny_config(tmp_path), logger=logger)
    result = trainer.fit()
    assert logger.finished
    train_rows = {step: m for step, m in logger.rows if "train/loss" in m}
    assert sorted(train_rows) == [1, 3, 5, 7, 9, 11, 13, 15]
    for step, metrics in train_rows.items():
        expected = warmup_cosine(step, total_steps=16, warmup_steps=4, peak_lr=1.0 * 32 / 256)
        assert metrics["train/lr"] == pytest.approx(expected)
        assert torch.isfinite(torch.tensor(metrics["train/loss"]))
        assert metrics["train/img_per_s"] > 0
    knn_rows = [(step, m["knn/top1"]) for step, m in logger.rows if "knn/top1" in m]
    assert [step for step, _ in knn_rows] == [7, 15]  # each epoch end; not twice at the end
    assert result.knn_top1 == knn_rows[-1][1]
    assert [step for step, _ in logger.trust_ratios] == [0, 3, 6, 9, 12, 15]
    _, last_ratios = logger.trust_ratios[-1]
    applied = trainer.optimizer.trust_ratios(adapted_only=True)
    assert last_ratios == {k: v.item() for k, v in applied.items()}
    assert all(not k.endswith("bias") and "bn" not in k for k in last_ratios)
    assert (Path(trainer.cfg.trainer.output_dir) / "config.yaml").is_file()
    ckpt = torch.load(
        Path(trainer.cfg.trainer.output_dir) / "checkpoints" / "last.pt", weights_only=True
    )
    assert ckpt["step"] == 16 and ckpt["wandb_run_id"] == "recorded"


def test_real_offline_run_logs_the_optimizers_trust_ratios(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, max_steps=4)
    cfg = cfg.model_copy(
        update={
            "logging": cfg.logging.model_copy(
                update={
                    "wandb": cfg.logging.wandb.model_copy(update={"mode": "offline"}),
                }
            )
        }
    )
    trainer = Trainer(cfg)
    trainer.fit()
    history = read_offline_history(Path(cfg.trainer.output_dir))
    ratio_rows = [r for r in history if any(k.startswith("lars/trust_ratio/") for k in r)]
    assert [r["global_step"] for r in ratio_rows] == [0, 3]
    applied = trainer.optimizer.trust_ratios(adapted_only=True)
    logged = {
        k.removeprefix("lars/trust_ratio/"): v
        for k, v in ratio_rows[-1].items()
        if k.startswith("lars/trust_ratio/") and k != "lars/trust_ratio_hist"
    }
    assert logged.keys() == applied.keys()
    for name, value in applied.items():
        assert logged[name] == pytest.approx(value.item(), rel=1e-6)
    assert any("train/loss" in r for r in history)
    assert any("knn/top1" in r for r in history)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_learns_finite(tmp_path: Path, precision: str) -> None:
    logger = RecordingLogger()
    trainer = Trainer(tiny_config(tmp_path, precision=precision, max_steps=3), logger=logger)
    result = trainer.fit()
    assert result.steps == 3
    assert torch.isfinite(torch.tensor(result.final_loss))
    assert trainer.scaler.is_enabled() == (precision == "fp16")


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    trainer = Trainer(
        tiny_config(tmp_path, accumulate_grad_batches=2, epochs=1), logger=RecordingLogger()
    )
    assert trainer.steps_per_epoch == 4
    assert trainer.global_batch == 64
    assert trainer.fit().steps == 4
