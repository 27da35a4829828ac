"""MoCo v3: the loss against a float64 transcription of the authors' ``moco/builder.py``, the
heads, the momentum schedule of ``main_moco.py`` and the config."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ssl_toolkit.methods import MoCoV3, MoCoV3Config, build_method, parse_method_config
from ssl_toolkit.methods.mocov3 import moco_v3_loss


def authors_contrastive_loss(q: torch.Tensor, k: torch.Tensor, T: float) -> torch.Tensor:
    """``MoCo.contrastive_loss`` on one process (rank 0, no gather), the cross entropy written
    out: ``-log(exp(l_ii) / Σ_j exp(l_ij))`` averaged, times ``2T``."""
    q = nn.functional.normalize(q, dim=1)
    k = nn.functional.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", [q, k]) / T
    log_probs = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -torch.diagonal(log_probs).mean() * (2 * T)


def authors_momentum(epoch: float, epochs: int, moco_m: float) -> float:
    """``main_moco.adjust_moco_momentum``."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - moco_m)


@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_loss_and_gradient_equal_the_authors(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 6, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.randn(9, 6, dtype=torch.float64, generator=g).requires_grad_()
    ours = moco_v3_loss(q, k, temperature=temperature)
    expected = authors_contrastive_loss(q, k.detach(), temperature)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-12)
    (got,) = torch.autograd.grad(ours, q, retain_graph=True)
    (want,) = torch.autograd.grad(expected, q)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert torch.autograd.grad(ours, k, allow_unused=True) == (None,)  # keys: no gradient


def test_hand_computed_case() -> None:
    """Two orthogonal unit queries, each equal to its key, τ = 1: cross entropy
    log(e + 1) - 1 per query, times 2."""
    q = torch.eye(2, dtype=torch.float64)
    expected = 2 * (math.log(math.e + 1) - 1)
    assert moco_v3_loss(q, q.clone()).item() == pytest.approx(expected, rel=1e-14)
    with pytest.raises(ValueError, match="equal shape"):
        moco_v3_loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        moco_v3_loss(q, q, temperature=0.0)


def test_heads_are_the_authors_build_mlp() -> None:
    """ResNet: projector Linear-BN-ReLU-Linear-BN(affine=False), predictor
    Linear-BN-ReLU-Linear, no Linear with a bias (``_build_mlp``)."""
    config = parse_method_config({"name": "mocov3"})
    assert isinstance(config, MoCoV3Config)
    assert (config.temperature, config.tau_base, config.tau_final) == (1.0, 0.99, 1.0)
    method = build_method(config, "resnet18")
    kinds = [type(m).__name__ for m in method.projector.layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert not method.projector.layers[-1].affine and method.projector.layers[1].affine
    assert [type(m).__name__ for m in method.predictor.layers] == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
    ]
    linears = [m for m in method.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.bias is None for m in linears)
    dims = [(m.in_features, m.out_features) for m in method.predictor.layers[::3]]
    assert dims == [(256, 4096), (4096, 256)]
    assert method.projector.layers[0].in_features == 512
    vit = parse_method_config(
        {
            "name": "mocov3",
            "projector": {"num_layers": 3},
            "predictor": {"last_batch_norm": "plain"},
        }
    )
    assert vit.projector.last_batch_norm == "plain" and vit.projector.out_dim == 256


def _small() -> MoCoV3:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    return MoCoV3(backbone, nn.Linear(8, 4), nn.Linear(4, 4), temperature=0.5).double()


def test_loss_is_symmetric_over_predictions_and_other_views_keys() -> None:
    method = _small()
    views = [torch.randn(5, 6, dtype=torch.float64) for _ in range(2)]
    embeddings = method(views)
    q_a = method.predictor(method.projector(method.backbone(views[0])))
    k_b = method.target["projector"](method.target["backbone"](views[1]))
    torch.testing.assert_close(embeddings["online"][0], q_a)
    torch.testing.assert_close(embeddings["target"][1], k_b)
    (q_a, q_b), (k_a, k_b) = embeddings["online"], embeddings["target"]
    expected = authors_contrastive_loss(q_a, k_b, 0.5) + authors_contrastive_loss(q_b, k_a, 0.5)
    assert method.loss(embeddings).item() == pytest.approx(expected.item(), rel=1e-12)


def test_momentum_step_follows_the_authors_schedule() -> None:
    """After optimizer step s of S, the momentum encoder takes iteration s's update
    ``m_s·key + (1 - m_s)·online`` with ``m_s`` of ``adjust_moco_momentum`` at epoch s / S of 1."""
    method = _small()
    with torch.no_grad():
        for p in method.trainable_module().parameters():
            p.add_(torch.randn_like(p))
    before = copy.deepcopy(method.target)
    online = dict(method.named_parameters())
    steps = 10
    method.after_optimizer_step(3, steps)
    m = authors_momentum(3 / steps, 1, 0.99)
    assert method.tau == pytest.approx(m, rel=1e-15)
    assert method.log_metrics() == {"method/tau": method.tau}
    for name, param in method.target.named_parameters():
        expected = before.get_parameter(name) * m + online[name] * (1.0 - m)
        torch.testing.assert_close(param, expected, rtol=1e-12, atol=1e-14)
    method.after_optimizer_step(steps, steps)
    assert method.tau == 1.0


def test_bad_config_is_refused() -> None:
    from optim import ConfigError

    with pytest.raises(ConfigError, match="tau_final"):
        parse_method_config({"name": "mocov3", "tau_base": 0.999, "tau_final": 0.99})
    with pytest.raises(ConfigError, match="out_dim"):
        parse_method_config({"name": "mocov3", "predictor": {"out_dim": 128}})


def test_vit_recipe_trains_neither_the_patch_projection_nor_the_position_embedding() -> None:
    """imagenet/mocov3_vit_small (here narrow): ``--stop-grad-conv1`` and the fixed sin-cos
    embedding keep both out of the optimizer; a step moves every other backbone tensor."""
    from optim import build_optimizer
    from ssl_toolkit.config import load_config

    cfg = load_config("imagenet/mocov3_vit_small")
    heads = {"hidden_dim": 16, "out_dim": 8}
    config = parse_method_config(
        {**cfg.method.model_dump(), "projector": heads, "predictor": heads}
    )
    torch.manual_seed(0)
    tiny = {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 48}
    method = build_method(config, **cfg.model.backbone_options(), **tiny)
    optimizer = build_optimizer(cfg.optim, method.trainable_module())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    fixed = {
        "backbone.pos_embed",
        "backbone.patch_embed.proj.weight",
        "backbone.patch_embed.proj.bias",
    }
    backbone = dict(method.backbone.named_parameters(prefix="backbone"))
    assert {name for name, p in backbone.items() if id(p) not in optimized} == fixed
    before = {name: p.detach().clone() for name, p in backbone.items()}
    views = [torch.randn(6, 3, 16, 16) for _ in range(2)]
    method.training_loss(method(views)).backward()
    optimizer.step()
    moved = {name for name, p in backbone.items() if not torch.equal(p, before[name])}
    assert moved == set(backbone) - fixed
