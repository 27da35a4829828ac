"""Gradient clipping (``clip_grad``) against float64 re-derivations of the references: DINO's
per-parameter ``clip_gradients`` and torch's ``clip_grad_norm_``; and under a GradScaler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optim import build_optimizer, clip_grad_norms_
from optim.op_count import count_ops
from tests.optim.conftest import SmallResNet, make_batch


def dino_clip_gradients(model: nn.Module, clip: float) -> None:
    """facebookresearch/dino ``utils.clip_gradients``, re-derived: each gradient whose norm
    exceeds ``clip`` is multiplied by ``clip / (norm + 1e-6)``."""
    for p in model.parameters():
        if p.grad is not None:
            clip_coef = clip / (p.grad.norm(2).item() + 1e-6)
            if clip_coef < 1:
                p.grad.mul_(clip_coef)


def model_with_grads(dtype: torch.dtype = torch.float64, scale: float = 1.0) -> SmallResNet:
    """The small ResNet with the gradients of one batch, times ``scale``."""
    torch.manual_seed(0)
    model = SmallResNet().to(dtype)
    images, labels = make_batch(0, dtype)
    (scale * nn.functional.cross_entropy(model(images), labels)).backward()
    return model


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_per_parameter_matches_dinos_clip_gradients() -> None:
    model = model_with_grads()
    norms = torch.stack([p.grad.norm() for p in model.parameters()])
    max_norm = norms.median().item()  # about half the tensors are clipped
    reference = model_with_grads()
    dino_clip_gradients(reference, max_norm)
    returned = clip_grad_norms_([p.grad for p in model.parameters()], max_norm, per_parameter=True)
    torch.testing.assert_close(returned, norms, rtol=1e-15, atol=0)
    clipped = 0
    for ours, theirs, norm in zip(grads_of(model), grads_of(reference), norms):
        torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=0)
        if norm > max_norm:
            clipped += 1
            assert ours.norm().item() == pytest.approx(
                max_norm * norm.item() / (norm.item() + 1e-6)
            )
    assert 0 < clipped < len(norms)


def test_a_gradient_under_the_limit_is_left_bitwise() -> None:
    model = model_with_grads()
    before = grads_of(model)
    clip_grad_norms_([p.grad for p in model.parameters()], 1e9, per_parameter=True)
    clip_grad_norms_([p.grad for p in model.parameters()], 1e9, per_parameter=False)
    for ours, original in zip(grads_of(model), before):
        assert torch.equal(ours, original)


def test_global_norm_matches_torch_clip_grad_norm() -> None:
    model = model_with_grads()
    reference = model_with_grads()
    expected = nn.utils.clip_grad_norm_(reference.parameters(), 0.05, foreach=False)
    total = clip_grad_norms_([p.grad for p in model.parameters()], 0.05)
    torch.testing.assert_close(total, expected, rtol=1e-15, atol=0)
    assert expected > 0.05  # the case clips
    for ours, theirs in zip(grads_of(model), grads_of(reference)):
        torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
@pytest.mark.parametrize("per_parameter", [True, False])
def test_every_optimizer_steps_on_the_clipped_gradients(name: str, per_parameter: bool) -> None:
    """``optim.clip_grad`` clips before the step of any registered optimizer: the step equals
    that of the same optimizer without it, on gradients clipped beforehand."""
    config = {"name": name, "lr": 0.1, "weight_decay": 0.01}
    clip = {"max_norm": 0.05, "per_parameter": per_parameter}
    ours, theirs = model_with_grads(), model_with_grads()
    clip_grad_norms_([p.grad for p in theirs.parameters()], 0.05, per_parameter=per_parameter)
    build_optimizer({**config, "clip_grad": clip}, ours).step()
    build_optimizer(config, theirs).step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("unscale_in_step", [True, False])
@pytest.mark.parametrize("per_parameter", [True, False])
def test_under_a_grad_scaler_lars_clips_the_unscaled_gradients(
    unscale_in_step: bool, per_parameter: bool
) -> None:
    """LARS unscaling in its step clips by the unscaled norms, as the scaler's own unscale
    would: both give the step of LARS with the clip on the same gradients never scaled."""
    scale = 2.0**12
    config = {
        "name": "lars",
        "lr": 0.5,
        "clip_grad": {"max_norm": 0.05, "per_parameter": per_parameter},
        "unscale_in_step": unscale_in_step,
    }
    scaled = model_with_grads(torch.float32, scale=scale)
    optimizer = build_optimizer(config, scaled)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler.step(optimizer)
    expected = model_with_grads(torch.float32)
    build_optimizer({**config, "unscale_in_step": True}, expected).step()
    moved = 0
    for a, b, start in zip(
        scaled.parameters(), expected.parameters(), model_with_grads().parameters()
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        moved += not torch.equal(b, start.float())
    assert moved > 0


@pytest.mark.parametrize("per_parameter", [True, False])
def test_clipping_adds_no_host_sync(per_parameter: bool) -> None:
    model = model_with_grads(torch.float32)
    optimizer = build_optimizer(
        {
            "name": "lars",
            "lr": 0.1,
            "clip_grad": {"max_norm": 0.05, "per_parameter": per_parameter},
        },
        model,
    )
    optimizer.step()  # the first step creates the state
    counted = count_ops(optimizer.step)
    assert counted.syncs == 0
    assert counted.by_op.get("aten._foreach_norm.Scalar", 0) >= 1  # the clip ran
