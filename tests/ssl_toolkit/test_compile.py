"""``trainer.compile``: the model and its loss compiled by ``torch.compile``, under AMP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssl_toolkit.trainer import Trainer
from tests.ssl_toolkit.test_trainer import RecordingLogger, tiny_config


@pytest.mark.slow
def test_compiled_bf16_steps_follow_the_eager_ones(tmp_path: Path) -> None:
    """Same weights, same batches: the compiled step's losses match eager bf16 autocast to
    bf16 rounding, over three steps (the later losses see the weights LARS updated)."""
    trainers = {}
    for compiled in (False, True):
        cfg = tiny_config(tmp_path / str(compiled), precision="bf16", compile=compiled)
        trainers[compiled] = Trainer(cfg, logger=RecordingLogger())
    losses = {}
    for compiled, trainer in trainers.items():
        batches = trainer.image_batches()
        losses[compiled] = torch.stack([trainer.train_step(batches) for _ in range(3)])
    assert trainers[True].embed_model is not trainers[True].model  # really compiled
    torch.testing.assert_close(losses[True], losses[False], rtol=5e-3, atol=0)
