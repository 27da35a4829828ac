"""The trainer steps the warmup that ``schedule.warmup_peak_at`` names."""

from __future__ import annotations

from pathlib import Path

import pytest

from optim import ConfigError
from ssl_toolkit.config import ExperimentConfig
from ssl_toolkit.trainer import Trainer
from tests.optim.test_schedules import simclr_schedule
from tests.ssl_toolkit.test_trainer import RecordingLogger, tiny_config


def test_the_trainer_steps_the_authors_warmup_from_zero(tmp_path: Path) -> None:
    """``first_cosine_step``: the first optimizer step at lr 0, as SimCLR's
    ``learning_rate_schedule`` at global step 0, and the same lr as it at every step."""
    cfg = tiny_config(tmp_path).to_dict()
    cfg["schedule"] |= {"warmup_epochs": 1, "warmup_peak_at": "first_cosine_step"}
    trainer = Trainer(ExperimentConfig.from_dict(cfg), logger=RecordingLogger())
    total, warmup, peak = trainer.total_steps, trainer.warmup_steps, trainer.peak_lr
    assert 1 < warmup < total
    got = [trainer.lr_at(step) for step in range(1, total + 1)]
    expected = [simclr_schedule(s, peak, warmup, total) for s in range(total)]
    assert got == pytest.approx(expected, rel=1e-14)
    assert got[0] == 0.0 and got[warmup] == pytest.approx(peak)


def test_a_warmup_from_a_start_lr_cannot_peak_after_the_warmup(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path).to_dict()
    cfg["schedule"] |= {"warmup_from": 0.1, "warmup_peak_at": "first_cosine_step"}
    with pytest.raises(ConfigError, match="warmup_peak_at"):
        ExperimentConfig.from_dict(cfg)
