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


# The authors' schedules, transcribed in float64 Python: the lr of the optimizer step indexed
# ``step`` from 0 (the first update's), a peak ``peak`` and ``warmup`` of ``total`` steps.


def simclr_schedule(step: int, peak: float, warmup: int, total: int) -> float:
    """google-research/simclr ``model_util.learning_rate_schedule`` (and tf2's
    ``WarmUpAndCosineDecay``): ``global_step / warmup_steps · scaled_lr``, then
    ``tf.train.cosine_decay(scaled_lr, global_step - warmup_steps, total - warmup_steps)``."""
    lr = step / warmup * peak if warmup else peak
    if step < warmup:
        return lr
    decay_steps = total - warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay_steps) / decay_steps))


def byol_schedule(step: int, peak: float, warmup: int, total: int) -> float:
    """deepmind-research ``byol/utils/schedules.py`` ``learning_schedule`` and its
    ``_cosine_decay``."""
    lr = step / warmup * peak if warmup > 0 else peak
    if step < warmup:
        return lr
    global_step, max_steps = min(step - warmup, total - warmup), total - warmup
    return peak * 0.5 * (1 + math.cos(math.pi * global_step / max_steps))


def barlow_twins_schedule(step: int, peak: float, warmup: int, total: int) -> float:
    """facebookresearch/barlowtwins ``main.py`` ``adjust_learning_rate`` (VICReg's
    ``main_vicreg.py`` is the same): to ``0.001·base_lr`` after the warmup."""
    if step < warmup:
        return peak * step / warmup
    step, total = step - warmup, total - warmup
    q = 0.5 * (1 + math.cos(math.pi * step / total))
    end_lr = peak * 0.001
    return peak * q + end_lr * (1 - q)


def mocov3_schedule(step: int, peak: float, warmup_epochs: int, epochs: int, iters: int) -> float:
    """facebookresearch/moco-v3 ``main_moco.py`` ``adjust_learning_rate``, called with the
    epoch ``epoch + i / iters_per_epoch`` at iteration ``i``."""
    epoch = step // iters + (step % iters) / iters
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    return peak * 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def swav_schedule(peak: float, start: float, final: float, warmup: int, total: int) -> list:
    """facebookresearch/swav ``main_swav.py``: ``np.linspace(start_warmup, base_lr, warmup)``
    and the cosine over ``iters = np.arange(total - warmup)`` (DINO's ``cosine_scheduler`` is
    the same)."""
    import numpy as np

    warmup_lr = np.linspace(start, peak, warmup)
    iters = np.arange(total - warmup)
    cosine = [
        final + 0.5 * (peak - final) * (1 + math.cos(math.pi * t / (total - warmup))) for t in iters
    ]
    return [*warmup_lr.tolist(), *cosine]


def solo_learn_schedule(peak: float, start: float, final: float, warmup: int, total: int) -> list:
    """vturrisi/solo-learn ``solo/utils/lr_scheduler.py`` ``LinearWarmupCosineAnnealingLR``,
    stepped once per optimizer step, in its chainable form: each warmup step adds
    ``(base_lr - warmup_start_lr) / (warmup_epochs - 1)``, each cosine step scales the distance
    to ``eta_min`` by the ratio of consecutive ``1 + cos`` values."""
    lrs = [start]
    for epoch in range(1, total):
        lr = lrs[-1]
        if epoch < warmup:
            lr = lr + (peak - start) / (warmup - 1)
        elif epoch == warmup:
            lr = peak
        else:
            t = math.pi / (total - warmup)
            ratio = (1 + math.cos(t * (epoch - warmup))) / (1 + math.cos(t * (epoch - warmup - 1)))
            lr = ratio * (lr - final) + final
        lrs.append(lr)
    return lrs


WARMUP_TOTALS = [(1, 7), (4, 17), (10, 40), (25, 26)]


@pytest.mark.parametrize(("warmup", "total"), WARMUP_TOTALS)
@pytest.mark.parametrize("schedule", [simclr_schedule, byol_schedule], ids=["simclr", "byol"])
def test_first_cosine_step_peak_is_the_simclr_and_byol_schedule(schedule, warmup, total) -> None:
    kw = dict(
        total_steps=total, warmup_steps=warmup, peak_lr=4.8, warmup_peak_at="first_cosine_step"
    )
    got = [warmup_cosine(s, **kw) for s in range(total)]
    assert got == pytest.approx([schedule(s, 4.8, warmup, total) for s in range(total)], rel=1e-14)
    assert got[0] == 0.0


@pytest.mark.parametrize(("warmup", "total"), WARMUP_TOTALS)
def test_first_cosine_step_peak_is_barlow_twins_and_vicreg_schedule(warmup, total) -> None:
    kw = dict(total_steps=total, warmup_steps=warmup, peak_lr=1.6, final_lr=1.6 * 0.001)
    got = [warmup_cosine(s, **kw, warmup_peak_at="first_cosine_step") for s in range(total)]
    expected = [barlow_twins_schedule(s, 1.6, warmup, total) for s in range(total)]
    assert got == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize(("warmup_epochs", "epochs", "iters"), [(1, 3, 5), (2, 7, 4), (10, 12, 3)])
def test_first_cosine_step_peak_is_the_mocov3_schedule(warmup_epochs, epochs, iters) -> None:
    total, warmup = epochs * iters, warmup_epochs * iters
    kw = dict(
        total_steps=total, warmup_steps=warmup, peak_lr=0.6, warmup_peak_at="first_cosine_step"
    )
    got = [warmup_cosine(s, **kw) for s in range(total)]
    expected = [mocov3_schedule(s, 0.6, warmup_epochs, epochs, iters) for s in range(total)]
    assert got == pytest.approx(expected, rel=1e-13, abs=1e-15)


@pytest.mark.parametrize(("warmup", "total"), [(2, 7), (4, 17), (10, 40)])
def test_warmup_from_is_the_swav_dino_and_solo_learn_schedule(warmup, total) -> None:
    for start, final in ((0.3, 0.0048), (0.0, 1e-6), (3e-5, 0.0)):
        kw = dict(total_steps=total, warmup_steps=warmup, peak_lr=4.8, final_lr=final)
        got = [warmup_cosine(s, **kw, warmup_from=start) for s in range(total)]
        assert got == pytest.approx(swav_schedule(4.8, start, final, warmup, total), rel=1e-13)
        assert got == pytest.approx(
            solo_learn_schedule(4.8, start, final, warmup, total), rel=1e-12
        )


def test_the_default_warmup_is_not_the_authors() -> None:
    """The default warmup reaches the peak a step earlier: what the option changes."""
    kw = dict(total_steps=40, warmup_steps=10, peak_lr=1.0)
    assert warmup_cosine(0, **kw) == pytest.approx(0.1) != simclr_schedule(0, 1.0, 10, 40)
    assert warmup_cosine(10, **kw) == warmup_cosine(10, **kw, warmup_peak_at="first_cosine_step")


def test_warmup_from_with_a_first_cosine_step_peak_is_refused() -> None:
    kw = dict(total_steps=40, warmup_steps=10, peak_lr=1.0, warmup_from=0.0)
    with pytest.raises(ValueError, match="warmup_from"):
        warmup_cosine(0, **kw, warmup_peak_at="first_cosine_step")
