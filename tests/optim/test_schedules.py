"""Learning-rate scaling and the warmup + cosine schedule, against hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from optim import scale_lr, set_lr, warmup_cosine


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
