"""Learning-rate scaling and the warmup + cosine schedule, against hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from optim import build_optimizer, scale_lr, set_hyperparameter, set_lr, warmup_cosine
from tests.optim.conftest import SmallResNet


def test_scaling_rules() -> None:
    assert scale_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scale_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scale_lr(0.3, 4096, "none") == 0.3


def test_warmup_then_cosine() -> None:
    kw = dict(total_steps=110, warmup_steps=10, peak_lr=1.0, final_lr=0.0)
    assert warmup_cosine(0, **kw) == pytest.approx(0.1)
    assert warmup_cosine(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)
    assert warmup_cosine(60, **kw) == pytest.approx(0.5)
    assert warmup_cosine(110, **kw) == pytest.approx(0.0)
    assert warmup_cosine(35, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    values = [warmup_cosine(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_set_lr_respects_group_scale() -> None:
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([{"params": [a], "lr_scale": 0.1}, {"params": [b]}], lr=1.0)
    set_lr(opt, 2.0)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.2), 2.0]


def test_a_scheduled_weight_decay_keeps_each_groups_multiple() -> None:
    """Rules' per-group settings multiply the scheduled value: an excluded parameter keeps no
    decay, a group at half the optimizer's decay keeps half."""
    config = {
        "weight_decay": 0.04,
        "exclude_from_weight_decay": ["@bias"],
        "param_groups": [{"match": ["fc.weight"], "weight_decay": 0.02, "lr_scale": 0.5}],
    }
    for name in ("sgd", "adamw", "lars"):
        optimizer = build_optimizer({"name": name, "lr": 1.0, **config}, SmallResNet())
        set_hyperparameter(optimizer, "weight_decay", 0.4)
        set_lr(optimizer, 2.0)
        by_name = {
            p.param_name: (group["weight_decay"], group["lr"])
            for group in optimizer.param_groups
            for p in group["params"]
        }
        expected_bias = 0.0 if name != "lars" else 0.4  # LARS drops the term by name
        assert by_name["conv1.weight"] == (pytest.approx(0.4), 2.0)
        assert by_name["fc.weight"] == (pytest.approx(0.2), 1.0)
        assert by_name["fc.bias"][0] == pytest.approx(expected_bias)
        if name == "lars":
            assert "fc.bias" in optimizer.exclude_from_weight_decay


def test_a_hyperparameter_the_optimizer_lacks_cannot_be_scheduled() -> None:
    optimizer = build_optimizer({"name": "adamw", "lr": 1.0}, SmallResNet())
    with pytest.raises(ValueError, match="AdamW param group 0 has no 'momentum' to schedule"):
        set_hyperparameter(optimizer, "momentum", 0.9)
