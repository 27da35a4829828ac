"""The trainer drives ``schedule.weight_decay`` and ``schedule.momentum`` per step, logs them,
and a run with them, clipping and a frozen head resumes bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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


def test_a_scheduled_clipped_run_with_a_frozen_head_resumes_bit_identically(
    tmp_path: Path,
) -> None:
    """The frozen steps left travel in the optimizer's state; the schedules are functions of
    the step. Frozen for 6 steps, stopped at 3."""
    optim = {
        "clip_grad": {"max_norm": 0.5, "per_parameter": True},
        "freeze": {"params": ["projector.*"], "steps": 6},
    }
    straight = Trainer(scheduled_config(tmp_path / "a", **optim), logger=RecordingLogger())
    head = {k: v.clone() for k, v in straight.method.projector.state_dict().items()}
    straight.fit(stop_at_step=8)
    cfg = scheduled_config(tmp_path / "b", **optim)
    first = Trainer(cfg, logger=RecordingLogger())
    first.fit(stop_at_step=3)
    for key, value in first.method.projector.state_dict().items():
        if key.endswith(("weight", "bias")):
            assert value.equal(head[key]), key  # frozen so far
    resumed = Trainer(cfg, resume="auto", logger=RecordingLogger())
    assert resumed.step == 3
    resumed.fit(stop_at_step=8)
    _assert_same_state(straight, resumed)
    moved = straight.method.projector.state_dict()["layers.0.weight"]
    assert not moved.equal(head["layers.0.weight"])  # unfrozen at step 7
