"""The trainer drives ``schedule.weight_decay`` and ``schedule.momentum`` per step, logs them,
and a run with them, clipping and a frozen head resumes bit for bit."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_toolkit.config import ExperimentConfig
from ssl_toolkit.trainer import Trainer
from tests.ssl_toolkit.test_trainer import RecordingLogger, _assert_same_state, tiny_config


def dino_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start=0.0):
    """facebookresearch/dino ``utils.cosine_scheduler``, re-derived: one value per iteration."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def scheduled_config(tmp_path: Path, **optim: object) -> ExperimentConfig:
    """The tiny run (16 steps, 8 per epoch) with DINO's weight decay 0.04 -> 0.4 and a LARS
    momentum from 0.9 to 0.99."""
    cfg = tiny_config(tmp_path).to_dict()
    cfg["optim"] |= {"weight_decay": 0.04, **optim}
    cfg["schedule"] |= {"weight_decay": {"end": 0.4}, "momentum": {"end": 0.99}}
    return ExperimentConfig.from_dict(cfg)


def test_weight_decay_and_momentum_follow_dinos_cosine_and_are_logged(tmp_path: Path) -> None:
    logger = RecordingLogger()
    trainer = Trainer(scheduled_config(tmp_path), logger=logger)
    wd = dino_cosine_scheduler(0.04, 0.4, epochs=2, niter_per_ep=8)
    momentum = dino_cosine_scheduler(0.9, 0.99, epochs=2, niter_per_ep=8)
    for step in range(1, 17):
        values = trainer.scheduled_at(step)
        assert values["weight_decay"] == pytest.approx(wd[step - 1], rel=1e-14)
        assert values["momentum"] == pytest.approx(momentum[step - 1], rel=1e-14)
    trainer.fit(stop_at_step=6)
    logged = {step: row["train/weight_decay"] for step, row in logger.rows if "train/loss" in row}
    assert list(logged) == [2, 4, 6]
    assert logged == pytest.approx({s: wd[s - 1] for s in logged}, rel=1e-14)
    assert 0.04 <= logged[2] < logged[4] < logged[6] < 0.4
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == pytest.approx([wd[5]] * len(groups))
    assert [g["momentum"] for g in groups] == pytest.approx([momentum[5]] * len(groups))


def test_a_warmup_rises_linearly_from_zero(tmp_path: Path) -> None:
    cfg = scheduled_config(tmp_path).to_dict()
    cfg["schedule"]["weight_decay"]["warmup_epochs"] = 0.5  # 4 steps
    trainer = Trainer(ExperimentConfig.from_dict(cfg), logger=RecordingLogger())
    values = [trainer.scheduled_at(step)["weight_decay"] for step in range(1, 6)]
    assert values == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.04])


def frozen_head_config(run_dir: Path, optimizer: str) -> ExperimentConfig:
    """:func:`scheduled_config` clipped, with its projector frozen for 6 steps; ``adamw`` in
    place of LARS (with DINO's decay schedule, and a scalar ``step`` in its state)."""
    optim = {
        "clip_grad": {"max_norm": 0.5, "per_parameter": True},
        "freeze": {"params": ["projector.*"], "steps": 6},
    }
    if optimizer == "lars":
        return scheduled_config(run_dir, **optim)
    cfg = tiny_config(run_dir).to_dict()
    cfg["optim"] = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.04, **optim}
    cfg["schedule"] |= {"weight_decay": {"end": 0.4}}
    return ExperimentConfig.from_dict(cfg)


@pytest.mark.parametrize(("optimizer", "stop"), [("lars", 3), ("adamw", 3), ("adamw", 7)])
def test_a_scheduled_clipped_run_with_a_frozen_head_resumes_bit_identically(
    tmp_path: Path, optimizer: str, stop: int
) -> None:
    """The frozen steps left travel in the optimizer's state; the schedules are functions of
    the step. Frozen for 6 steps, stopped while frozen (3) or after (7: the head then has
    optimizer state, which torch's loader must place although the fresh optimizer's frozen
    groups have none)."""
    straight = Trainer(frozen_head_config(tmp_path / "a", optimizer), logger=RecordingLogger())
    head = {k: v.clone() for k, v in straight.method.projector.state_dict().items()}
    straight.fit(stop_at_step=8)
    cfg = frozen_head_config(tmp_path / "b", optimizer)
    first = Trainer(cfg, logger=RecordingLogger())
    first.fit(stop_at_step=stop)
    for key, value in first.method.projector.state_dict().items():
        if key.endswith(("weight", "bias")):
            assert value.equal(head[key]) == (stop <= 6), key  # frozen for 6 steps
    projector = set(first.method.projector.parameters())
    assert any(p in first.optimizer.state for p in projector) == (stop > 6)
    resumed = Trainer(cfg, resume="auto", logger=RecordingLogger())
    assert resumed.step == stop
    assert {p in resumed.optimizer.state for p in resumed.method.projector.parameters()} == {
        stop > 6
    }
    resumed.fit(stop_at_step=8)
    _assert_same_state(straight, resumed)
    moved = straight.method.projector.state_dict()["layers.0.weight"]
    assert not moved.equal(head["layers.0.weight"])  # unfrozen at step 7


def test_a_dino_vit_runs_wandb_logs_its_weight_decay_rising_from_004_toward_04(
    tmp_path: Path,
) -> None:
    """imagenet/dino_vits16 scaled down (timm's test ViT, multi-crop 2 x 32 + 2 x 16 px, 8
    steps): the offline W&B run holds ``train/weight_decay`` of every step, DINO's cosine."""
    from ssl_toolkit.checkpoint import load_checkpoint
    from ssl_toolkit.config import load_config
    from ssl_toolkit.wandb_offline import read_offline_history

    cfg = load_config(
        "imagenet/dino_vits16",
        [
            "model.backbone=timm/test_vit",
            "method.head={out_dim: 64, hidden_dim: 32, bottleneck_dim: 16}",
            "data.name=synthetic",  # 256 images: 8 steps of 32
            "data.image_size=32",
            "data.batch_size=32",
            "data.num_workers=0",
            "data.crops=[{count: 2, size: 32, scale: [0.4, 1.0]}, "
            "{count: 2, size: 16, scale: [0.05, 0.4]}]",
            "optim.freeze.steps=2",
            "trainer.epochs=1",
            "trainer.device=cpu",
            "trainer.precision=fp32",
            "trainer.log_every_steps=1",
            f"trainer.output_dir={tmp_path}",
            "eval.every_epochs=100",
            "eval.baseline=false",
        ],
    )
    trainer = Trainer(cfg)
    trainer.fit()
    rows = [row for row in read_offline_history(tmp_path) if "train/weight_decay" in row]
    logged = [row["train/weight_decay"] for row in rows]
    assert [row["global_step"] for row in rows] == list(range(1, 9))
    assert logged == pytest.approx(dino_cosine_scheduler(0.04, 0.4, 1, 8), rel=1e-12)
    assert logged[0] == pytest.approx(0.04) and 0.35 < logged[-1] < 0.4
    assert all(a < b for a, b in itertools.pairwise(logged))
    # The centre is in the checkpoint, as the run left it.
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    assert torch.equal(saved["center"], trainer.method.center.cpu())
    assert saved["center"].abs().sum() > 0


def test_a_warmup_from_a_start_lr_is_the_swav_and_dino_schedule(tmp_path: Path) -> None:
    """``schedule.warmup_from``: numpy.linspace from it to the peak over the warmup, then the
    cosine, as SwAV's ``lr_schedule`` and DINO's ``cosine_scheduler(..., warmup_epochs,
    start_warmup_value)`` give the lr of every iteration."""
    cfg = tiny_config(tmp_path).to_dict()
    cfg["schedule"] |= {"warmup_epochs": 1, "warmup_from": 0.3, "final_lr": 0.0048}
    trainer = Trainer(ExperimentConfig.from_dict(cfg), logger=RecordingLogger())
    steps, per_epoch = trainer.total_steps, trainer.steps_per_epoch
    expected = dino_cosine_scheduler(
        trainer.peak_lr, 0.0048, steps // per_epoch, per_epoch, warmup_epochs=1, start=0.3
    )
    got = [trainer.lr_at(step) for step in range(1, steps + 1)]
    assert got == pytest.approx(expected, rel=1e-13)
    assert got[0] == pytest.approx(0.3) and got[per_epoch - 1] == pytest.approx(trainer.peak_lr)
