"""VICReg: the loss against a float64 transcription of the authors' ``main_vicreg.py``, the
model and its config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_toolkit.methods import VICReg, VICRegConfig, build_method, parse_method_config
from ssl_toolkit.methods import vicreg_loss as vicreg_loss_from_package
from ssl_toolkit.methods.vicreg import vicreg_loss


def authors_vicreg(x: torch.Tensor, y: torch.Tensor, sim=25.0, std=25.0, cov=1.0) -> torch.Tensor:
    """``VICReg.forward`` of ``main_vicreg.py`` after the projector, one process: the batch
    is ``args.batch_size`` and the width ``num_features``. Off-diagonals with a mask here."""
    batch_size, num_features = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    off = ~torch.eye(num_features, dtype=torch.bool)
    cov_loss = cov_x[off].pow(2).sum() / num_features + cov_y[off].pow(2).sum() / num_features
    return sim * repr_loss + std * std_loss + cov * cov_loss


def _embeddings(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Columns of spread from 0.3 to 2: the variance hinge is active in some, not in others.
    spread = torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    z_a = torch.randn(n, d, dtype=torch.float64, generator=g) * spread
    z_b = z_a + 0.5 * torch.randn(n, d, dtype=torch.float64, generator=g)
    return z_a.requires_grad_(), z_b.requires_grad_()


@pytest.mark.parametrize(("n", "d"), [(7, 5), (16, 3), (4, 9)])
def test_loss_and_gradients_equal_the_authors(n: int, d: int) -> None:
    z_a, z_b = _embeddings(n, d, seed=n + d)
    ours = vicreg_loss(z_a, z_b).loss
    expected = authors_vicreg(z_a, z_b)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-12)
    got = torch.autograd.grad(ours, (z_a, z_b))
    want = torch.autograd.grad(expected, (z_a, z_b))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_coefficients_and_terms() -> None:
    """The defaults are the paper's 25 / 25 / 1; the terms are returned before weighting."""
    z_a, z_b = _embeddings(8, 4, seed=0)
    terms = vicreg_loss(z_a, z_b)
    assert terms.loss.item() == pytest.approx(
        (25 * terms.invariance + 25 * terms.variance + terms.covariance).item(), rel=1e-14
    )
    weighted = vicreg_loss(
        z_a, z_b, invariance_weight=1.0, variance_weight=2.0, covariance_weight=3.0
    )
    assert weighted.loss.item() == pytest.approx(
        authors_vicreg(z_a, z_b, 1.0, 2.0, 3.0).item(), rel=1e-12
    )
    assert vicreg_loss_from_package is vicreg_loss


def test_hand_computed_case() -> None:
    """Identical views of two rows ±1 in one dimension: no invariance, std = sqrt(2 + 1e-4)
    is above 1 (no variance term), and a 1x1 covariance has no off-diagonal."""
    z = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    terms = vicreg_loss(z, z)
    assert terms.invariance.item() == 0.0
    assert terms.variance.item() == 0.0
    assert terms.covariance.item() == 0.0
    collapsed = torch.zeros(3, 2, dtype=torch.float64)
    # Collapse: std = sqrt(1e-4) = 0.01 in each dimension, hinge 0.99 for each view, halved.
    assert vicreg_loss(collapsed, collapsed).variance.item() == pytest.approx(0.99, rel=1e-12)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="equal shape"):
        vicreg_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="at least 2 rows"):
        vicreg_loss(torch.randn(1, 4), torch.randn(1, 4))


def test_half_precision_input_computes_in_fp32() -> None:
    z_a, z_b = (t.detach() for t in _embeddings(8, 4, seed=3))
    low = vicreg_loss(z_a.bfloat16(), z_b.bfloat16()).loss
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(vicreg_loss(z_a, z_b).loss.item(), rel=2e-2)


def test_config_defaults_are_the_papers_and_the_model_is_the_authors() -> None:
    config = parse_method_config({"name": "vicreg"})
    assert isinstance(config, VICRegConfig)
    assert (config.invariance_weight, config.variance_weight, config.covariance_weight) == (
        25.0,
        25.0,
        1.0,
    )
    expander = config.projector
    assert (expander.hidden_dim, expander.out_dim, expander.num_layers) == (8192, 8192, 3)
    small = parse_method_config({"name": "vicreg", "projector": {"hidden_dim": 32}})
    assert (small.projector.out_dim, small.projector.num_layers) == (8192, 3)  # kept
    tiny = parse_method_config(
        {"name": "vicreg", "projector": {"hidden_dim": 16, "out_dim": 12, "num_layers": 3}}
    )
    method = build_method(tiny, "resnet18")
    linears = [m for m in method.projector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 16), (16, 16), (16, 12)]
    assert linears[-1].bias is None  # the authors' last Linear has no bias
    assert sum(isinstance(m, nn.BatchNorm1d) for m in method.projector.modules()) == 2


def test_method_embeds_each_view_and_logs_its_terms() -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    method = VICReg(backbone, nn.Linear(8, 5), invariance_weight=2.0).double()
    views = [torch.randn(10, 6, dtype=torch.float64) for _ in range(2)]
    z_a, z_b = method(views)
    torch.testing.assert_close(z_a, method.projector(backbone(views[0])))
    loss = method.loss((z_a, z_b))
    expected = authors_vicreg(z_a, z_b, sim=2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert set(method.log_metrics()) == {
        "method/invariance",
        "method/variance",
        "method/covariance",
    }
    with pytest.raises(ValueError, match="2 views"):
        method(views[:1])
