"""A PyTorch Lightning ``Trainer``, the most common client of ``build_optimizer``, trains with
LARS under mixed precision, its own gradient clipping and the optimizer's.

Lightning refuses ``gradient_clip_val`` for an optimizer that unscales in its step (its
``_step_supports_amp_scaling``), which LARS does by default to spare a host sync; with
``unscale_in_step: false`` it clips as it does for torch's SGD.
"""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import MixedPrecision
from torch import nn

from optim import build_optimizer


class Regression(pl.LightningModule):
    """A two-layer network regressing the sum of 8 inputs; records every step's loss."""

    def __init__(self, optim: dict) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.optim = optim
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        self.losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.grad_norms.append(torch.nn.utils.get_total_norm(grads).item())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.optim, self)


def fit(optim: dict, precision: str, clip: float | None) -> Regression:
    """Lightning's fit: 20 epochs of 4 batches on CPU. ``16-mixed`` is given as the plugin
    itself: as a flag, Lightning turns it into ``bf16-mixed`` on CPU."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    model = Regression(optim)
    amp = MixedPrecision(precision, "cpu")
    assert (amp.scaler is not None) == (precision == "16-mixed")
    trainer = pl.Trainer(
        accelerator="cpu",
        plugins=[amp],
        gradient_clip_val=clip,
        max_epochs=20,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's hints about workers and the like
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    return model


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


LARS = {"name": "lars", "lr": 5.0}


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lightning_clips_gradients_for_lars_that_lets_the_scaler_unscale(precision: str) -> None:
    model = fit({**LARS, "unscale_in_step": False}, precision, clip=1.0)
    assert len(model.losses) == 80
    assert mean(model.losses[-4:]) < 0.2 * mean(model.losses[:4])
    # The norms Lightning saw before clipping were unscaled ones (16-mixed starts at 2^16;
    # the steps that overflow, inf, the scaler skips).
    finite = [norm for norm in model.grad_norms if norm < float("inf")]
    assert len(finite) >= 70
    assert 1.0 < max(finite) < 1e3  # and the clip at 1.0 had work to do


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lightning_refuses_to_clip_for_lars_that_unscales_in_its_step(precision: str) -> None:
    with pytest.raises(RuntimeError, match="LARS, does not allow for gradient clipping"):
        fit(LARS, precision, clip=1.0)


def test_the_optimizers_own_clipping_works_under_lightnings_scaler() -> None:
    """Without ``gradient_clip_val``, ``clip_grad`` clips inside the step, where LARS has the
    scale: the sync-free path and Lightning's 16-mixed scaler work together."""
    model = fit({**LARS, "clip_grad": {"max_norm": 1.0}}, "16-mixed", clip=None)
    assert mean(model.losses[-4:]) < 0.2 * mean(model.losses[:4])
