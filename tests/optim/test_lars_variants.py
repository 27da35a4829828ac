"""The LARS variants of the SSL papers' code, each against a float64 re-derivation of it.

Each reference below follows its authors' optimizer step line by line (docs/lars.md names the
files), one parameter at a time, in float64. The toolkit's LARS is configured as the recipe
that reproduces it; both see the same gradients and the same learning-rate schedule (a lr
that changes every step, which is where the lr inside or outside the buffer differ). After each
step, parameters must agree to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import SmallResNet, make_batch
from torch import Tensor, nn

from optim import build_optimizer
from optim.op_count import count_ops

STEPS = 6
MOMENTUM, WEIGHT_DECAY, ETA = 0.9, 1e-2, 0.02


@dataclass
class Param:
    """What the authors' filters look at: the tensor's rank and the module that owns it."""

    ndim: int
    is_norm_or_bias: bool
    lr_scale: float = 1.0


def _norm(t: Tensor) -> Tensor:
    return torch.sqrt((t * t).sum())


def _where_positive(w_norm: Tensor, u_norm: Tensor) -> Tensor:
    """The authors' nested ``where``: eta·‖w‖/‖u‖ if ‖w‖ > 0 and ‖u‖ > 0, else 1."""
    one = torch.ones_like(w_norm)
    return torch.where(w_norm > 0, torch.where(u_norm > 0, ETA * w_norm / u_norm, one), one)


def simclr_step(state: dict, lr: float, info: dict[str, Param], nesterov: bool) -> None:
    """google-research/simclr ``lars_optimizer.py``, ``classic_momentum=True``: decay added to
    the gradient, the ratio on that sum, ``next_v = m·v + lr·r·grad``, ``param -= next_v`` (or
    the Nesterov ``m·next_v + lr·r·grad``). Biases and batch norm are excluded from both by
    name."""
    for name, (p, g, v) in state.items():
        excluded = info[name].is_norm_or_bias
        grad = g if excluded else g + WEIGHT_DECAY * p
        trust_ratio = 1.0 if excluded else _where_positive(_norm(p), _norm(grad))
        scaled_lr = lr * trust_ratio
        next_v = MOMENTUM * v + scaled_lr * grad
        update = MOMENTUM * next_v + scaled_lr * grad if nesterov else next_v
        state[name] = (p - update, g, next_v)


def byol_step(state: dict, lr: float, info: dict[str, Param], nesterov: bool) -> None:
    """deepmind-research ``byol/utils/optimizers.py``: ``optax.chain(add_weight_decay,
    scale_by_lars, scale(-lr))``: decayed update, times the ratio on it, ``mu = m·mu + u``,
    then ``-lr·mu``. Biases and batch norm are filtered out of both."""
    assert not nesterov
    for name, (p, g, mu) in state.items():
        keep = not info[name].is_norm_or_bias
        update = g + WEIGHT_DECAY * p if keep else g
        if keep:
            update = update * _where_positive(_norm(p), _norm(update))
        mu = MOMENTUM * mu + update
        state[name] = (p + (-lr) * mu, g, mu)


def barlow_twins_step(state: dict, lr: float, info: dict[str, Param], nesterov: bool) -> None:
    """facebookresearch/barlowtwins ``main.py`` ``LARS``: with both filters on, 1-d tensors
    get neither decay nor ratio; ``mu.mul_(m).add_(dp)``; ``p.add_(mu, alpha=-lr)``. Weights
    and biases are two param groups with their own learning rates."""
    assert not nesterov
    for name, (p, g, mu) in state.items():
        dp = g
        if info[name].ndim != 1:
            dp = dp + WEIGHT_DECAY * p
            dp = dp * _where_positive(_norm(p), _norm(dp))
        mu = mu * MOMENTUM + dp
        state[name] = (p - lr * info[name].lr_scale * mu, g, mu)


def vicreg_step(state: dict, lr: float, info: dict[str, Param], nesterov: bool) -> None:
    """facebookresearch/vicreg ``main_vicreg.py`` ``LARS`` with ``exclude_bias_and_norm``
    (``p.ndim == 1``) as both filters: the same update as Barlow Twins, one learning rate."""
    assert not nesterov
    for name, (p, g, mu) in state.items():
        dp = g
        if info[name].ndim != 1:
            dp = dp + WEIGHT_DECAY * p
        if info[name].ndim != 1:
            dp = dp * _where_positive(_norm(p), _norm(dp))
        mu = mu * MOMENTUM + dp
        state[name] = (p - lr * mu, g, mu)


def mocov3_step(state: dict, lr: float, info: dict[str, Param], nesterov: bool) -> None:
    """facebookresearch/moco-v3 ``moco/optimizer.py``: tensors of more than one dimension get
    decay and the ratio on the update; ``mu = m·mu + dp``; ``p -= lr·(dp + m·mu)`` with
    Nesterov, else ``p -= lr·mu``."""
    for name, (p, g, mu) in state.items():
        dp = g
        if info[name].ndim > 1:
            dp = dp + WEIGHT_DECAY * p
            dp = dp * _where_positive(_norm(p), _norm(dp))
        mu = mu * MOMENTUM + dp
        dp = dp + MOMENTUM * mu if nesterov else mu
        state[name] = (p - lr * dp, g, mu)


def solo_learn_step(state: dict, lr: float, info: dict[str, Param], nesterov: bool) -> None:
    """vturrisi/solo-learn ``solo/utils/lars.py`` with ``exclude_bias_n_norm`` and
    ``clip_lr`` (its CIFAR recipes): 2-d and larger tensors get
    ``min(eta·‖p‖/(‖g‖ + wd·‖p‖ + eps) / lr, 1)·(g + wd·p)``; ``buf = m·buf + d_p``;
    ``p -= lr·buf`` (or the Nesterov ``d_p + m·buf``)."""
    for name, (p, g, buf) in state.items():
        d_p = g
        p_norm, g_norm = _norm(p), _norm(g)
        if info[name].ndim != 1 and p_norm != 0 and g_norm != 0:
            lars_lr = p_norm / (g_norm + p_norm * WEIGHT_DECAY + 1e-8) * ETA
            lars_lr = min(float(lars_lr) / lr, 1.0)
            d_p = (d_p + WEIGHT_DECAY * p) * lars_lr
        buf = buf * MOMENTUM + d_p
        d_p = d_p + MOMENTUM * buf if nesterov else buf
        state[name] = (p - lr * d_p, g, buf)


def swav_step(state: dict, lr: float, info: dict[str, Param], nesterov: bool) -> None:
    """facebookresearch/swav ``main_swav.py``: apex's ``LARC(SGD(momentum, weight_decay),
    trust_coefficient, clip=False)``. Every tensor with ``‖p‖ != 0`` and ``‖g‖ != 0`` gets
    ``d_p = (g + wd·p)·eta·‖p‖/(‖g‖ + wd·‖p‖ + eps)`` (LARC zeroes SGD's own decay for the
    step); SGD then takes ``buf = m·buf + d_p`` and ``p -= lr·buf``. Nothing is excluded."""
    for name, (p, g, buf) in state.items():
        d_p = g
        p_norm, g_norm = _norm(p), _norm(g)
        if p_norm != 0 and g_norm != 0:
            adaptive_lr = ETA * p_norm / (g_norm + p_norm * WEIGHT_DECAY + 1e-8)
            d_p = (g + WEIGHT_DECAY * p) * adaptive_lr
        buf = buf * MOMENTUM + d_p
        d_p = d_p + MOMENTUM * buf if nesterov else buf
        state[name] = (p - lr * d_p, g, buf)


NORM_AND_BIAS = ["@norm", "@bias"]
ONE_DIM = ["@1d"]
BIAS_LR = 0.0048 / 0.2  # Barlow Twins: learning-rate-biases / learning-rate-weights

VARIANTS: dict[str, tuple[Callable, dict]] = {
    "simclr": (
        simclr_step,
        dict(
            trust_ratio="update",
            exclude_from_weight_decay=NORM_AND_BIAS,
            exclude_from_layer_adaptation=NORM_AND_BIAS,
        ),
    ),
    "byol": (
        byol_step,
        dict(
            trust_ratio="update",
            lr_in_buffer=False,
            exclude_from_weight_decay=NORM_AND_BIAS,
            exclude_from_layer_adaptation=NORM_AND_BIAS,
        ),
    ),
    "barlow_twins": (
        barlow_twins_step,
        dict(
            trust_ratio="update",
            lr_in_buffer=False,
            exclude_from_weight_decay=ONE_DIM,
            exclude_from_layer_adaptation=ONE_DIM,
            param_groups=[{"match": ONE_DIM, "lr_scale": BIAS_LR}],
        ),
    ),
    "vicreg": (
        vicreg_step,
        dict(
            trust_ratio="update",
            lr_in_buffer=False,
            exclude_from_weight_decay=ONE_DIM,
            exclude_from_layer_adaptation=ONE_DIM,
        ),
    ),
    "mocov3": (
        mocov3_step,
        dict(
            trust_ratio="update",
            lr_in_buffer=False,
            exclude_from_weight_decay=ONE_DIM,
            exclude_from_layer_adaptation=ONE_DIM,
        ),
    ),
    "swav": (swav_step, dict(trust_ratio="original", lr_in_buffer=False)),
    "solo_learn": (
        solo_learn_step,
        dict(
            trust_clip=True,
            lr_in_buffer=False,
            exclude_from_weight_decay=ONE_DIM,
            exclude_from_layer_adaptation=ONE_DIM,
        ),
    ),
}
CASES = [*((name, False) for name in VARIANTS), ("simclr", True), ("mocov3", True)]
PATHS = {"single": dict(foreach=False), "foreach": dict(foreach=True)}


def _schedule(step: int) -> float:
    """A learning rate that changes at every step."""
    return 0.8 * (1.0 - step / (2 * STEPS))


def _param_info(model: nn.Module) -> dict[str, Param]:
    modules = dict(model.named_modules())
    info = {}
    for name, p in model.named_parameters():
        owner = modules[name.rpartition(".")[0]]
        norm_or_bias = isinstance(owner, nn.BatchNorm2d) or name.endswith("bias")
        info[name] = Param(p.ndim, norm_or_bias, BIAS_LR if p.ndim == 1 else 1.0)
    return info


def _run(
    reference_step: Callable, options: dict, nesterov: bool, path: dict, steps: int = STEPS
) -> None:
    torch.manual_seed(0)
    model = SmallResNet().double()
    cfg = {"name": "lars", "lr": _schedule(0), "momentum": MOMENTUM, "eta": ETA}
    cfg.update(weight_decay=WEIGHT_DECAY, nesterov=nesterov, **options, **path)
    opt = build_optimizer(cfg, model)
    info = _param_info(model)
    state = {
        n: (p.detach().clone(), None, torch.zeros_like(p)) for n, p in model.named_parameters()
    }
    for step in range(steps):
        x, y = make_batch(step, torch.float64)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        state = {
            n: (p, q.grad.clone(), b)
            for (n, (p, _, b)), q in zip(state.items(), model.parameters())
        }
        lr = _schedule(step)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        reference_step(state, lr, info, nesterov)
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(
                p.detach(), state[n][0], rtol=1e-12, atol=1e-14, msg=lambda m, n=n: f"{n}: {m}"
            )
        # Both trajectories continue from the same parameters: rounding does not accumulate.
        state = {
            n: (p.detach().clone(), g, b)
            for (n, (_, g, b)), p in zip(state.items(), model.parameters())
        }


@pytest.mark.parametrize("path", PATHS.values(), ids=list(PATHS))
@pytest.mark.parametrize(
    ("variant", "nesterov"), CASES, ids=[f"{v}{'-nesterov' * n}" for v, n in CASES]
)
def test_variant_equals_its_authors_step(variant: str, nesterov: bool, path: dict) -> None:
    _run(*VARIANTS[variant], nesterov, path)


@pytest.mark.slow
def test_fused_path_runs_the_variants() -> None:
    """BYOL's variant takes both options (the ratio on the update, the lr outside)."""
    _run(*VARIANTS["byol"], False, {"fused": True}, steps=4)


def test_the_references_differ_from_the_original() -> None:
    """The variants change the update: the original's step, run through the same harness,
    does not reproduce the authors' code (so the checks above can fail)."""
    with pytest.raises(AssertionError):
        _run(simclr_step, dict(VARIANTS["simclr"][1], trust_ratio="original"), False, {})
    with pytest.raises(AssertionError):
        _run(byol_step, dict(VARIANTS["byol"][1], lr_in_buffer=True), False, {})


def test_update_ratio_is_one_when_either_norm_is_zero() -> None:
    """Hand-computed: a zero weight, and a zero decayed gradient, both give ratio 1."""
    zero_w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    zero_w.grad = torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)
    zero_g = nn.Parameter(torch.ones(2, dtype=torch.float64))
    zero_g.grad = torch.zeros(2, dtype=torch.float64)  # and no weight decay
    plain = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    plain.grad = torch.tensor([0.0, 0.5], dtype=torch.float64)
    for name, p in (("zero_w", zero_w), ("zero_g", zero_g), ("plain", plain)):
        p.param_name = name
    from optim import LARS

    opt = LARS([zero_w, zero_g, plain], lr=0.1, weight_decay=0.0, eta=0.01, trust_ratio="update")
    opt.step()
    ratios = {k: v.item() for k, v in opt.trust_ratios().items()}
    assert ratios == {"zero_w": 1.0, "zero_g": 1.0, "plain": pytest.approx(0.01 * 5.0 / 0.5)}


def test_variants_keep_the_op_bound_and_no_sync() -> None:
    """On ResNet-50 with norms and biases excluded: at most 20 ops on the multi-tensor path,
    the original's count or fewer, and no host sync (the single-tensor path's syncs:
    test_op_counts.test_no_host_sync)."""
    import torchvision
    from test_op_counts import OP_BOUND, _steady_state_count, _with_grads

    model = _with_grads(torchvision.models.resnet50())
    base = {
        "name": "lars",
        "lr": 0.1,
        "exclude_from_layer_adaptation": NORM_AND_BIAS,
        "exclude_from_weight_decay": NORM_AND_BIAS,
        "foreach": True,
    }
    counts = {}
    for trust_ratio in ("original", "update"):
        for lr_in_buffer in (True, False):
            cfg = dict(base, trust_ratio=trust_ratio, lr_in_buffer=lr_in_buffer)
            opt = build_optimizer(cfg, model)
            counts[trust_ratio, lr_in_buffer] = _steady_state_count(opt)
            assert count_ops(opt.trust_ratios).syncs == 0
    assert all(c.syncs == 0 for c in counts.values())
    original = counts["original", True].ops
    assert all(c.ops <= original <= OP_BOUND for c in counts.values()), counts


def test_bad_variant_settings_are_refused() -> None:
    """A misspelt variant and an epsilon the chosen ratio never reads fail loudly."""
    from optim import LARS, ConfigError

    model = SmallResNet()
    with pytest.raises(ConfigError, match="trust_ratio"):
        build_optimizer({"name": "lars", "lr": 0.1, "trust_ratio": "updates"}, model)
    with pytest.raises(ConfigError, match="epsilon"):
        build_optimizer(
            {"name": "lars", "lr": 0.1, "trust_ratio": "update", "epsilon": 1e-9}, model
        )
    with pytest.raises(ValueError, match="trust_ratio"):
        LARS(model.parameters(), lr=0.1, trust_ratio="paper")


def apex_larc_sgd_step(
    state: dict, lr: float, clip: bool, nesterov: bool, eps: float = 1e-8
) -> None:
    """NVIDIA/apex ``apex/parallel/LARC.py`` ``LARC(SGD(momentum, weight_decay), clip)``.step:
    LARC zeroes SGD's decay for the step; where ``‖p‖ != 0 and ‖g‖ != 0`` it sets
    ``g = (g + wd·p)·adaptive_lr`` (clipped to ``min(adaptive_lr / lr, 1)``), and elsewhere
    leaves ``g`` as it is. torch's ``SGD`` then takes ``buf = m·buf + g`` (``clone(g)`` at
    first, the same from a zero buffer) and ``p -= lr·buf`` (or ``lr·(g + m·buf)``)."""
    for name, (p, g, buf) in state.items():
        p_norm, g_norm = _norm(p), _norm(g)
        if p_norm != 0 and g_norm != 0:
            adaptive_lr = ETA * p_norm / (g_norm + p_norm * WEIGHT_DECAY + eps)
            if clip:
                adaptive_lr = min(float(adaptive_lr) / lr, 1.0)
            g = (g + WEIGHT_DECAY * p) * adaptive_lr
        buf = MOMENTUM * buf + g
        d_p = g + MOMENTUM * buf if nesterov else buf
        state[name] = (p - lr * d_p, state[name][1], buf)


def _zero_gradient_params() -> tuple[list[nn.Parameter], list[list[Tensor]]]:
    """Float64 tensors, and their gradients at each of 3 steps: a plain one; one whose
    gradient is always exactly 0 (a fresh buffer: LARC never moves it); one whose gradient is
    0 after the first step (its momentum carries it); a zero one with a gradient (ratio 1, not
    clipped, whatever the lr)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    values = [randn(4, 3), randn(5), randn(3, 3), torch.zeros(6, dtype=torch.float64)]
    grads = [
        [randn(4, 3), randn(4, 3), randn(4, 3)],
        [torch.zeros(5, dtype=torch.float64)] * 3,
        [
            randn(3, 3),
            torch.zeros(3, 3, dtype=torch.float64),
            torch.zeros(3, 3, dtype=torch.float64),
        ],
        [randn(6), randn(6), randn(6)],
    ]
    params = [nn.Parameter(v) for v in values]
    for index, p in enumerate(params):
        p.param_name = f"p{index}"
    return params, [list(step) for step in zip(*grads)]


LARC_PATHS = {**PATHS, "fused": dict(fused=True)}


@pytest.mark.parametrize("path", LARC_PATHS.values(), ids=list(LARC_PATHS))
@pytest.mark.parametrize("clip", [False, True], ids=["swav", "clip"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["", "nesterov"])
def test_larc_leaves_a_zero_gradient_as_apex_does(path: dict, clip: bool, nesterov: bool) -> None:
    """A tensor whose gradient is exactly 0 gets no decay and ratio 1 (it stays put from a
    fresh buffer, and moves by its momentum only after a real gradient); a zero tensor keeps
    ratio 1 unclipped at a lr above 1, as SwAV's 4.8."""
    from optim import LARS

    params, grads = _zero_gradient_params()
    opt = LARS(
        params,
        lr=4.8,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        eta=ETA,
        trust_clip=clip,
        nesterov=nesterov,
        lr_in_buffer=False,
        **path,
    )
    state = {p.param_name: (p.detach().clone(), None, torch.zeros_like(p)) for p in params}
    start = params[1].detach().clone()
    for step, (lr, step_grads) in enumerate(zip((4.8, 0.5, 2.0), grads)):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g, (name, (value, _, buf)) in zip(params, step_grads, list(state.items())):
            p.grad = g.clone()
            state[name] = (value, g, buf)
        apex_larc_sgd_step(state, lr, clip, nesterov)
        opt.step()
        for p in params:
            torch.testing.assert_close(
                p.detach(), state[p.param_name][0], rtol=1e-12, atol=1e-14, msg=f"step {step}"
            )
    assert torch.equal(params[1].detach(), start)
    ratios = opt.trust_ratios()
    assert ratios["p1"].item() == ratios["p2"].item() == 1.0  # zero gradients: LARC's 1


@pytest.mark.parametrize("clip", [False, True], ids=["swav", "clip"])
def test_larc_equals_apex_on_a_model(clip: bool) -> None:
    """The normal case, every tensor with a gradient: SmallResNet's steps as apex's LARC over
    torch's SGD computes them, on both paths."""
    for path in PATHS.values():
        _run(
            lambda state, lr, info, nesterov: apex_larc_sgd_step(state, lr, clip, nesterov),
            dict(trust_ratio="original", lr_in_buffer=False, trust_clip=clip),
            False,
            path,
        )


@pytest.mark.slow
def test_compiled_larc_leaves_a_zero_gradient_as_apex_does() -> None:
    """The compiled multi-tensor update (the fused path on CUDA), here compiled for the CPU."""
    from optim.lars import _compiled_multi_tensor_lars

    params, grads = _zero_gradient_params()
    bufs = [torch.zeros_like(p) for p in params]
    state = {p.param_name: (p.detach().clone(), None, torch.zeros_like(p)) for p in params}
    for lr, step_grads in zip((4.8, 0.5, 2.0), grads):
        for g, (name, (value, _, buf)) in zip(step_grads, list(state.items())):
            state[name] = (value, g, buf)
        apex_larc_sgd_step(state, lr, clip=True, nesterov=False)
        _compiled_multi_tensor_lars()(
            [p.detach() for p in params],
            [g.clone() for g in step_grads],
            bufs,
            lr=torch.tensor(lr, dtype=torch.float64),
            momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY,
            eta=ETA,
            epsilon=1e-8,
            adapted=len(params),
            decays=WEIGHT_DECAY,
            trust_clip=True,
            nesterov=False,
            on_update=False,
            lr_in_buffer=False,
            grad_scale=None,
            found_inf=None,
        )
        for p in params:
            torch.testing.assert_close(p.detach(), state[p.param_name][0], rtol=1e-12, atol=1e-14)
