"""Barlow Twins: the loss against independent derivations, the model, and the recipe."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from optim import build_optimizer, set_lr
from ssl_toolkit.config import load_config
from ssl_toolkit.methods import BarlowTwins, BarlowTwinsConfig, HeadConfig, build_method
from ssl_toolkit.methods.barlow_twins import barlow_twins_loss, cross_correlation

EPS = 1e-5  # nn.BatchNorm1d's default, which the authors' normalisation uses


def _loss_loop(z_a: torch.Tensor, z_b: torch.Tensor, weight: float) -> float:
    """Plain-Python float64 re-derivation: standardise each column, correlate, sum the terms."""
    rows_a = [list(map(float, row)) for row in z_a]
    rows_b = [list(map(float, row)) for row in z_b]
    n, d = len(rows_a), len(rows_a[0])

    def standardise(rows):
        cols = []
        for j in range(d):
            col = [row[j] for row in rows]
            mean = sum(col) / n
            var = sum((x - mean) ** 2 for x in col) / n
            cols.append([(x - mean) / math.sqrt(var + EPS) for x in col])
        return cols

    a, b = standardise(rows_a), standardise(rows_b)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][k] * b[j][k] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else weight * c**2
    return loss


@pytest.mark.parametrize("n,d,weight", [(5, 3, 0.0051), (8, 6, 0.5), (16, 4, 0.0)])
def test_loss_matches_float64_rederivation(n: int, d: int, weight: float) -> None:
    g = torch.Generator().manual_seed(n * 10 + d)
    z_a = torch.randn(n, d, dtype=torch.float64, generator=g) * 3 + 1
    z_b = torch.randn(n, d, dtype=torch.float64, generator=g)
    expected = _loss_loop(z_a, z_b, weight)
    assert barlow_twins_loss(z_a, z_b, off_diagonal_weight=weight).loss.item() == pytest.approx(
        expected, rel=1e-12
    )


def test_cross_correlation_equals_the_authors_affine_free_batch_norm() -> None:
    g = torch.Generator().manual_seed(0)
    z_a = torch.randn(12, 7, dtype=torch.float64, generator=g)
    z_b = torch.randn(12, 7, dtype=torch.float64, generator=g)
    bn = nn.BatchNorm1d(7, affine=False).double().train()
    expected = bn(z_a).T @ bn(z_b) / 12
    torch.testing.assert_close(cross_correlation(z_a, z_b), expected, rtol=1e-12, atol=1e-12)


def test_hand_computed_identity_and_anti_identity() -> None:
    # Columns of z are standardised already (mean 0, variance 1) and uncorrelated.
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    shrink = 1 / (1 + EPS)  # C = I / (1 + eps): the eps of the standardisation
    same = barlow_twins_loss(z, z, off_diagonal_weight=0.0051)
    assert same.loss.item() == pytest.approx(2 * (1 - shrink) ** 2, rel=1e-9)
    assert same.off_diagonal.item() == pytest.approx(0.0, abs=1e-30)  # rounding only
    opposite = barlow_twins_loss(z, -z, off_diagonal_weight=0.0051)
    assert opposite.loss.item() == pytest.approx(2 * (1 + shrink) ** 2, rel=1e-12)
    swapped = barlow_twins_loss(
        z, z.flip(1), off_diagonal_weight=0.0051
    )  # C = [[0, 1], [1, 0]] / (1 + eps)
    assert swapped.on_diagonal.item() == pytest.approx(2.0, rel=1e-12)
    assert swapped.off_diagonal.item() == pytest.approx(2 * shrink**2, rel=1e-12)
    assert swapped.loss.item() == pytest.approx(2.0 + 0.0051 * 2 * shrink**2, rel=1e-12)


def test_loss_gradients_match_finite_differences() -> None:
    z_a = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: barlow_twins_loss(a, b, off_diagonal_weight=0.3).loss, (z_a, z_b)
    )


def test_loss_is_fp32_under_bf16_autocast() -> None:
    z_a, z_b = torch.randn(8, 4), torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = barlow_twins_loss(z_a.bfloat16(), z_b.bfloat16(), off_diagonal_weight=0.0051).loss
    assert loss.dtype == torch.float32
    with pytest.raises(ValueError, match="equal shape"):
        cross_correlation(z_a, z_b[:, :3])


def _backbone() -> nn.Module:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.ReLU())
    backbone.num_features = 6
    return backbone


def test_build_makes_the_authors_projector_and_each_view_runs_alone() -> None:
    torch.manual_seed(0)
    config = BarlowTwinsConfig(projector=HeadConfig(hidden_dim=16, out_dim=10, num_layers=3))
    model = BarlowTwins.build(config, _backbone())
    linears = [m for m in model.projector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 16), (16, 16), (16, 10)]
    assert all(m.bias is None for m in linears)
    norms = [m for m in model.projector.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 2
    sizes = []
    model.backbone.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    g = torch.Generator().manual_seed(1)
    view_a, view_b = torch.randn(5, 3, 2, 2, generator=g), torch.randn(5, 3, 2, 2, generator=g)
    loss = model.loss(model([view_a, view_b]))
    assert sizes == [5, 5], "one forward pass per view, as in the authors' code"
    terms = model.log_metrics()
    expected = terms["method/on_diagonal"] + 0.0051 * terms["method/off_diagonal"]
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_shipped_configs_carry_the_papers_recipe() -> None:
    cfg = load_config("imagenet/barlow")
    assert cfg.method == BarlowTwinsConfig(
        projector=HeadConfig(hidden_dim=8192, out_dim=8192, num_layers=3),
        off_diagonal_weight=0.0051,
        gradient_scale=1 / 32,
    )
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.2, 1e-6)
    assert cfg.schedule.lr_scaling == "linear" and cfg.schedule.warmup_epochs == 10
    assert cfg.trainer.epochs == 1000 and cfg.model.backbone == "resnet50"
    optim = cfg.optim
    assert optim.exclude_from_layer_adaptation == optim.exclude_from_weight_decay == ["@1d"]
    [rule] = optim.param_groups
    assert rule.match == ["@1d"]
    assert rule.lr_scale == pytest.approx(0.0048 / 0.2)


def test_recipe_gives_biases_and_norms_their_own_lr_without_adaptation_or_decay() -> None:
    cfg = load_config(
        "barlow_lars", ["model.backbone=timm/test_resnet", "method.projector.hidden_dim=32"]
    )
    model = build_method(cfg.method, **cfg.model.backbone_options()).trainable_module()
    optimizer = build_optimizer(cfg.optim, model)
    set_lr(optimizer, 1.0)
    groups = {p.param_name: g for g in optimizer.param_groups for p in g["params"]}
    dims = {name: p.ndim for name, p in model.named_parameters()}
    weights = [n for n in groups if dims[n] > 1]
    others = [n for n in groups if dims[n] == 1]
    assert any(".bn1." in n for n in others) and any(n.endswith(".bias") for n in others)
    assert weights and others
    for name in weights:
        assert groups[name]["lr"] == 1.0 and name not in optimizer.exclude_set, name
        assert groups[name]["weight_decay"] == 1.5e-6, name
    for name in others:
        assert groups[name]["lr"] == pytest.approx(0.024), name
        assert name in optimizer.exclude_set, name
        assert name in optimizer.exclude_from_weight_decay, name
