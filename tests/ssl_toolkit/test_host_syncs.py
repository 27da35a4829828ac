"""A training step outside logging steps never waits for the device.

On a GPU every host sync stalls the CPU until the queue drains. They are counted on CPU with a
dispatch mode (``optim.op_count``): augmentation (every augmentation on), forward, loss,
backward, the scaler, LARS, the divergence records and BYOL's EMA.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from optim.op_count import count_ops
from ssl_toolkit.config import ExperimentConfig
from ssl_toolkit.trainer import Trainer, _LogWindow
from tests.ssl_toolkit.test_trainer import RecordingLogger, tiny_config

EVERY_AUGMENTATION = {
    "flip_p": 0.5,
    "jitter_p": 0.8,
    "gray_p": 0.2,
    "blur_p": 0.5,
    "solarize_p": 0.2,
    "rotation": 15.0,
}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method", ["simclr", "byol", "barlow_twins"])
def test_a_training_step_makes_no_host_sync(tmp_path: Path, method: str, precision: str) -> None:
    cfg = tiny_config(tmp_path, method=method, precision=precision).to_dict()
    cfg["data"]["augment"] = EVERY_AUGMENTATION
    trainer = Trainer(ExperimentConfig.from_dict(cfg), logger=RecordingLogger())
    batches = trainer.image_batches()
    trainer.train_step(batches)  # the first step creates the optimizer's state

    def step() -> None:
        trainer.train_step(batches)
        trainer.method.after_optimizer_step(2, trainer.total_steps)

    counted = count_ops(step)
    assert counted.ops > 500  # the whole step was seen
    assert counted.syncs == 0, {op: n for op, n in counted.by_op.items() if "scalar" in op}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("per_parameter", [True, False])
def test_clipping_scheduling_and_freezing_add_no_host_sync(
    tmp_path: Path, precision: str, per_parameter: bool
) -> None:
    """A whole optimizer step of the trainer (the lr and the scheduled weight decay and
    momentum set, forward, backward, the scaler, the clip, the frozen head, LARS, the hook)."""
    cfg = tiny_config(tmp_path, precision=precision).to_dict()
    cfg["optim"] |= {
        "clip_grad": {"max_norm": 1.0, "per_parameter": per_parameter},
        "freeze": {"params": ["projector.*"], "steps": 5},
    }
    cfg["schedule"] |= {"weight_decay": {"end": 0.1}, "momentum": {"end": 0.99}}
    trainer = Trainer(ExperimentConfig.from_dict(cfg), logger=RecordingLogger())
    batches = trainer.image_batches()
    window = _LogWindow(trainer.device)
    trainer._optimizer_step(batches, window)  # the first step creates the optimizer's state

    counted = count_ops(lambda: trainer._optimizer_step(batches, window))
    assert counted.ops > 500
    assert counted.by_op.get("aten._foreach_norm.Scalar", 0) >= 1  # the clip ran
    assert counted.syncs == 0, {op: n for op, n in counted.by_op.items() if "scalar" in op}
