"""LARS against a float64 re-derivation of the equations in docs/lars.md, step by step.

The reference below is written from the equations with Python floats, one parameter at a time,
independently of optim.lars. Both see the same gradients at every step; parameters, momentum
buffers and trust ratios must agree to float64 rounding after each of 30 steps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import SmallResNet, make_batch
from torch import nn

from optim import LARS, build_optimizer, name_parameters

STEPS = 30


def reference_step(
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    bufs: dict[str, torch.Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eta: float,
    epsilon: float,
    adapted: set[str],
    decayed: set[str],
    trust_clip: bool,
    nesterov: bool,
) -> dict[str, float]:
    """One step of the equations in float64; returns the applied ratio per parameter."""
    applied = {}
    for name, p in params.items():
        g = grads[name]
        ratio = 1.0
        if name in adapted:
            w_norm = math.sqrt(float((p * p).sum()))
            g_norm = math.sqrt(float((g * g).sum()))
            denom = g_norm + weight_decay * w_norm + epsilon
            ratio = eta * w_norm / denom if w_norm > 0 and denom > 0 else 1.0
        step = min(lr, ratio) if trust_clip and name in adapted else lr * ratio
        applied[name] = step / lr
        d = g + (weight_decay if name in decayed else 0.0) * p
        bufs[name] = momentum * bufs[name] + step * d
        update = step * d + momentum * bufs[name] if nesterov else bufs[name]
        params[name] = p - update
    return applied


OPTIONS = {
    "seed-defaults": dict(),
    "norm-bias-excluded": dict(exclude_from_layer_adaptation=["@norm", "@bias"]),
    "norm-bias-excluded-both": dict(
        exclude_from_layer_adaptation=["@norm", "@bias"],
        exclude_from_weight_decay=["@norm", "@bias"],
    ),
    "trust-clip": dict(trust_clip=True, exclude_from_layer_adaptation=["@bias"]),
    "nesterov": dict(nesterov=True, exclude_from_weight_decay=["@norm"]),
    "no-momentum-no-decay": dict(momentum=0.0, weight_decay=0.0),
}
PATHS = {"single": dict(foreach=False), "foreach": dict(foreach=True)}


def _run_parity(options: dict, path: dict, steps: int = STEPS, device: str = "cpu") -> None:
    torch.manual_seed(0)
    model = SmallResNet().double().to(device)
    hyper = dict(lr=0.5, momentum=0.9, weight_decay=1e-3, eta=0.02, epsilon=1e-8)
    hyper.update({k: v for k, v in options.items() if k in hyper})
    rules = {k: v for k, v in options.items() if k not in hyper}
    opt = build_optimizer({"name": "lars", **hyper, **rules, **path}, model)
    names = [n for n, _ in model.named_parameters()]
    modules = dict(model.named_modules())

    def selected(patterns: list[str]) -> set[str]:
        out = set()
        for n in names:
            owner = modules[n.rpartition(".")[0]]
            if ("@norm" in patterns and isinstance(owner, nn.BatchNorm2d)) or (
                "@bias" in patterns and n.endswith("bias")
            ):
                out.add(n)
        return out

    adapted = set(names) - selected(rules.get("exclude_from_layer_adaptation", []))
    decayed = set(names) - selected(rules.get("exclude_from_weight_decay", []))
    ref_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_bufs = {n: torch.zeros_like(p) for n, p in ref_params.items()}
    for step in range(steps):
        x, y = make_batch(step, torch.float64)
        model.zero_grad()
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        applied = reference_step(
            ref_params,
            grads,
            ref_bufs,
            **hyper,
            adapted=adapted,
            decayed=decayed,
            trust_clip=rules.get("trust_clip", False),
            nesterov=rules.get("nesterov", False),
        )
        opt.step()
        ratios = opt.trust_ratios()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), ref_params[n], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(
                opt.state[p]["momentum_buffer"], ref_bufs[n], rtol=1e-12, atol=1e-14
            )
            assert ratios[n].item() == pytest.approx(applied[n], rel=1e-6, abs=1e-12), n
        # Keep both trajectories on the same parameters so that rounding does not accumulate.
        with torch.no_grad():
            for n, p in model.named_parameters():
                ref_params[n] = p.detach().clone()


@pytest.mark.parametrize("path", PATHS.values(), ids=list(PATHS))
@pytest.mark.parametrize("options", OPTIONS.values(), ids=list(OPTIONS))
def test_parity_with_float64_equations(options: dict, path: dict) -> None:
    _run_parity(options, path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options", ["seed-defaults", "norm-bias-excluded-both", "nesterov", "trust-clip"]
)
def test_fused_path_parity(options: str) -> None:
    _run_parity(OPTIONS[options], {"fused": True}, steps=5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", [*PATHS.values(), {"fused": True}], ids=[*PATHS, "fused"])
@pytest.mark.parametrize("options", ["norm-bias-excluded-both", "trust-clip"])
def test_cuda_parity_with_float64_equations(options: str, path: dict) -> None:
    _run_parity(OPTIONS[options], path, steps=5, device="cuda")


def seed_lars_step(params: list[nn.Parameter], state: dict, lr: float, exclude: set[str]) -> None:
    """The original minerva LARS step, transcribed with its Python ``if`` on tensor norms."""
    momentum, weight_decay, eta, epsilon = 0.9, 1e-6, 0.001, 1e-8
    with torch.no_grad():
        for p in params:
            grad = p.grad
            buf = state.setdefault(p, torch.zeros_like(p))
            if p.param_name in exclude:
                trust_ratio = 1.0
            else:
                w_norm, g_norm = torch.norm(p), torch.norm(grad)
                denom = g_norm + weight_decay * w_norm + epsilon
                trust_ratio = eta * w_norm / denom if w_norm > 0 and denom > 0 else 1.0
            grad = grad.add(p, alpha=weight_decay)
            buf.mul_(momentum).add_(grad, alpha=float(lr * trust_ratio))
            p.sub_(buf)


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_the_original_with_its_signature(foreach: bool) -> None:
    """Positional arguments as in the original; fp32 results equal to float32 rounding."""
    torch.manual_seed(1)
    model = SmallResNet()
    twin = copy.deepcopy(model)
    name_parameters(model)
    name_parameters(twin)
    exclude = {"bn1.weight", "bn1.bias", "fc.bias"}
    opt = LARS(model.parameters(), 0.3, 0.9, 1e-6, 0.001, 1e-8, exclude, foreach=foreach)
    state: dict = {}
    for step in range(STEPS):
        x, y = make_batch(step)
        for net in (model, twin):
            net.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        seed_lars_step(list(twin.parameters()), state, 0.3, exclude)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_paths_agree_in_float32(small_resnet: SmallResNet) -> None:
    """Single-tensor and multi-tensor paths compute the same update to float32 rounding."""
    twin = copy.deepcopy(small_resnet)
    cfg = {"name": "lars", "lr": 1.0, "exclude_from_layer_adaptation": ["@norm", "@bias"]}
    opt_a = build_optimizer({**cfg, "foreach": False}, small_resnet)
    opt_b = build_optimizer({**cfg, "foreach": True}, twin)
    for step in range(10):
        x, y = make_batch(step)
        for net, opt in ((small_resnet, opt_a), (twin, opt_b)):
            net.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for p, q in zip(small_resnet.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
