"""Deterministic cost of a step: aten ops and host syncs, counted on CPU.

A host sync per parameter is the original LARS's main cost on GPU (a Python ``if`` on a norm);
the multi-tensor path must dispatch a fixed number of ops whatever the number of parameters.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from optim import LARS, build_optimizer
from optim.op_count import count_ops, peak_bytes

OP_BOUND = 20


def _with_grads(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return model


@pytest.fixture(scope="module")
def resnets() -> dict[str, nn.Module]:
    return {
        "resnet18": _with_grads(torchvision.models.resnet18()),
        "resnet50": _with_grads(torchvision.models.resnet50()),
    }


def _steady_state_count(opt: torch.optim.Optimizer):
    opt.step()  # the first step also creates the momentum buffers
    return count_ops(opt.step)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"exclude_from_layer_adaptation": ["@norm", "@bias"]},
        {"exclude_from_weight_decay": ["@norm"], "trust_clip": True},
        {"nesterov": True, "weight_decay": 0.0},
        {"trust_ratio": "update", "lr_in_buffer": False, "nesterov": True},
    ],
    ids=["seed", "excluded", "trust-clip", "nesterov", "update-ratio-lr-outside"],
)
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_no_host_sync(resnets: dict[str, nn.Module], options: dict, foreach: bool) -> None:
    opt = build_optimizer(
        {"name": "lars", "lr": 0.1, "foreach": foreach, **options}, resnets["resnet18"]
    )
    assert _steady_state_count(opt).syncs == 0
    assert count_ops(opt.trust_ratios).syncs == 0


def test_foreach_op_count_is_bounded_and_independent_of_model_size(
    resnets: dict[str, nn.Module],
) -> None:
    counts = {}
    for name, model in resnets.items():
        opt = LARS(model.parameters(), lr=0.1, foreach=True)
        counts[name] = _steady_state_count(opt)
    assert counts["resnet18"].by_op == counts["resnet50"].by_op
    assert counts["resnet50"].ops <= OP_BOUND


def test_exclusions_keep_one_bucket_within_the_op_bound(resnets: dict[str, nn.Module]) -> None:
    """The usual SSL exclusions (norms and biases from adaptation and decay) travel as
    per-tensor flags: one bucket, at most OP_BOUND ops on ResNet-50, no sync, whatever the
    model size."""
    cfg = {
        "name": "lars",
        "lr": 0.1,
        "exclude_from_layer_adaptation": ["@norm", "@bias"],
        "exclude_from_weight_decay": ["@norm", "@bias"],
        "foreach": True,
    }
    counts = {name: _steady_state_count(build_optimizer(cfg, m)) for name, m in resnets.items()}
    assert counts["resnet18"].by_op == counts["resnet50"].by_op
    assert counts["resnet50"].ops <= OP_BOUND and counts["resnet50"].syncs == 0
    # One bucket: each in-place update of the parameters is one op.
    assert counts["resnet50"].by_op["aten._foreach_sub_.List"] == 1
    assert counts["resnet50"].by_op["aten._foreach_norm.Scalar"] == 1


def test_the_default_path_follows_the_device(resnets: dict[str, nn.Module]) -> None:
    """On CPU the default is the single-tensor path (the faster one there, per the bench);
    multi-tensor kernels are the CUDA default."""
    by_op = _steady_state_count(LARS(resnets["resnet18"].parameters(), lr=0.1)).by_op
    assert "aten._foreach_norm.Scalar" not in by_op and "aten._foreach_sub_.List" not in by_op
    assert by_op["aten.sub_.Tensor"] == len(list(resnets["resnet18"].parameters()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("foreach", [False, True])
def test_a_cuda_step_makes_no_host_sync(foreach: bool) -> None:
    model = _with_grads(torchvision.models.resnet18()).cuda()  # gradients move with it
    rules = ["@norm", "@bias"]
    opt = build_optimizer(
        {"name": "lars", "lr": 0.1, "foreach": foreach, "exclude_from_layer_adaptation": rules},
        model,
    )
    opt.step()  # the first step creates the momentum buffers
    torch.cuda.set_sync_debug_mode("error")  # a host sync raises
    try:
        opt.step()
        ratios = opt.trust_ratios(adapted_only=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(r.device.type == "cuda" for r in ratios.values())


def test_original_style_step_syncs_per_parameter() -> None:
    """The counter sees what it must: a Python ``if`` on a norm is one sync per parameter."""
    params = [torch.randn(3) for _ in range(4)]

    def seed_like() -> None:
        for p in params:
            if torch.norm(p) > 0:
                p.mul_(0.5)

    assert count_ops(seed_like).syncs == 4


def test_peak_bytes_counts_tensors_alive_together() -> None:
    outside = torch.zeros(100)

    def work() -> torch.Tensor:
        first = torch.ones(1000)  # 4000 bytes
        view = first[:10]  # the same storage: nothing more
        del first
        second = torch.ones(500, dtype=torch.float64)  # 4000 more while view keeps the first
        del view, second
        outside.add_(1.0)  # in place into a tensor from outside: not allocated here
        return torch.ones(250)  # 1000 bytes, after the others are gone

    result, peak = peak_bytes(work)
    assert peak == 8000
    assert result.shape == (250,) and outside[0].item() == 1.0
