import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_toolkit.config import load_config
from ssl_toolkit.data import build_dataset
from ssl_toolkit.methods import BYOL, SimCLR, build_method, cosine_tau
from ssl_toolkit.methods.simclr import nt_xent


def _backbone() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 8),
    )


def _head(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, out_dim))


def _views(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)


def _byol() -> BYOL:
    torch.manual_seed(0)
    return BYOL(_backbone(), _head(8, 4), _head(4, 4))


def test_simclr_loss_is_scalar_with_gradients_into_backbone():
    torch.manual_seed(0)
    model = SimCLR(_backbone(), _head(8, 4), temperature=0.2)
    calls = []
    model.backbone.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    view_a, view_b = _views()
    loss = model.loss(model([view_a, view_b]))
    assert calls == [12], "both views must go through the backbone in one forward"
    assert loss.ndim == 0 and loss.requires_grad
    loss.backward()
    for name, p in model.backbone.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_simclr_loss_equals_nt_xent_of_projections():
    torch.manual_seed(0)
    model = SimCLR(_backbone(), _head(8, 4), temperature=0.2).eval()
    view_a, view_b = _views()
    with torch.no_grad():
        expected = nt_xent(
            model.projector(model.backbone(view_a)),
            model.projector(model.backbone(view_b)),
            temperature=0.2,
        )
        assert model.loss(model([view_a, view_b])).item() == pytest.approx(
            expected.item(), rel=1e-6
        )
        assert model.features(view_a).shape == (6, 8)
    assert model.trainable_module() is model
    with pytest.raises(ValueError, match="temperature"):
        SimCLR(_backbone(), _head(8, 4), temperature=0)


def test_byol_target_is_frozen_copy_in_state_dict_but_not_trainable():
    model = _byol()
    names = {n for n, _ in model.named_parameters()}
    trainable = dict(model.trainable_module().named_parameters())
    assert set(trainable) == {n for n in names if not n.startswith("target.")}
    assert {n.split(".")[0] for n in trainable} == {"backbone", "projector", "predictor"}
    own = dict(model.named_parameters())
    assert all(trainable[n] is own[n] for n in trainable)
    target = {n: p for n, p in own.items() if n.startswith("target.")}
    assert set(target) == {f"target.{n}" for n in trainable if not n.startswith("predictor.")}
    assert all(not p.requires_grad for p in target.values())
    state = model.state_dict()
    assert "target.backbone.1.running_mean" in state
    for name, p in target.items():
        online = own[name.removeprefix("target.")]
        assert torch.equal(p, online) and p.data_ptr() != online.data_ptr()


def test_byol_backward_reaches_online_only_and_loss_is_symmetric_formula():
    model = _byol()
    view_a, view_b = _views()
    loss = model.loss(model([view_a, view_b]))
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("target."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    # Independent recomputation in eval mode (fixed batch-norm statistics).
    model.eval()
    with torch.no_grad():
        got = model.loss(model([view_a, view_b])).item()

        def predict(x):
            return model.predictor(model.projector(model.backbone(x)))

        def project_target(x):
            return model.target["projector"](model.target["backbone"](x))

        p_a, p_b = predict(view_a), predict(view_b)
        z_a, z_b = project_target(view_a), project_target(view_b)
        expected = (2 - 2 * F.cosine_similarity(p_a, z_b)).mean() + (
            2 - 2 * F.cosine_similarity(p_b, z_a)
        ).mean()
    assert got == pytest.approx(expected.item(), rel=1e-5)


def test_byol_runs_one_forward_per_view_through_both_networks():
    """As in the authors' code: batch-norm statistics of one view never mix with the other's."""
    model = _byol()
    sizes = {"online": [], "target": []}
    model.backbone.register_forward_hook(lambda m, i, o: sizes["online"].append(i[0].shape[0]))
    model.target["backbone"].register_forward_hook(
        lambda m, i, o: sizes["target"].append(i[0].shape[0])
    )
    model(list(_views(n=6)))
    assert sizes == {"online": [6, 6], "target": [6, 6]}


def test_byol_update_target_is_ema_for_params_and_copy_for_buffers():
    model = _byol()
    with torch.no_grad():
        for p in model.trainable_module().parameters():
            p.add_(torch.randn_like(p))
    model(list(_views()))  # train-mode forward changes the online running statistics
    online = {n: p.detach().clone() for n, p in model.named_parameters() if "target" not in n}
    before = {
        n.removeprefix("target."): p.detach().clone()
        for n, p in model.named_parameters()
        if n.startswith("target.")
    }
    tau = 0.9
    model.update_target(tau)
    for name, p in model.named_parameters():
        if name.startswith("target."):
            key = name.removeprefix("target.")
            torch.testing.assert_close(p, tau * before[key] + (1 - tau) * online[key])
    buffers = dict(model.named_buffers())
    for name, b in buffers.items():
        if name.startswith("target."):
            assert torch.equal(b, buffers[name.removeprefix("target.")]), name
    assert buffers["target.backbone.1.num_batches_tracked"].item() == 2  # a forward per view


def test_byol_update_target_endpoints():
    model = _byol()
    with torch.no_grad():
        for p in model.trainable_module().parameters():
            p.add_(1.0)
    frozen = {n: p.clone() for n, p in model.target.named_parameters()}
    model.update_target(1.0)
    assert all(torch.equal(p, frozen[n]) for n, p in model.target.named_parameters())
    model.update_target(0.0)
    assert torch.equal(model.target["projector"][0].weight, model.projector[0].weight)
    with pytest.raises(ValueError, match="tau"):
        model.update_target(1.5)


def test_byol_optimizer_step_leaves_target_alone_and_embed_uses_online_backbone():
    model = _byol()
    opt = torch.optim.SGD(model.trainable_module().parameters(), lr=0.1)
    target_before = {n: p.clone() for n, p in model.target.named_parameters()}
    model.loss(model(list(_views()))).backward()
    opt.step()
    assert all(torch.equal(p, target_before[n]) for n, p in model.target.named_parameters())
    assert not torch.equal(model.backbone[0].weight, model.target["backbone"][0].weight)
    x = _views()[0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), model.backbone(x))


def test_cosine_tau_schedule():
    assert cosine_tau(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_tau(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert cosine_tau(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    step = 30
    expected = 1.0 - (1.0 - 0.99) * (math.cos(math.pi * step / 100) + 1) / 2
    assert cosine_tau(step, 100, 0.99, 1.0) == pytest.approx(expected)
    values = [cosine_tau(s, 100, 0.99, 1.0) for s in range(101)]
    assert values == sorted(values)
    assert cosine_tau(-5, 100, 0.99) == pytest.approx(0.99)
    assert cosine_tau(500, 100, 0.99) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_tau(0, 0, 0.99, 1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_byol_step_and_ema_on_cuda_under_autocast():
    model = _byol().cuda()
    view_a, view_b = (v.cuda() for v in _views())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(model([view_a, view_b]))
    assert loss.dtype == torch.float32
    loss.backward()
    with torch.no_grad():
        for p in model.trainable_module().parameters():
            p.add_(1.0)
    before = model.target["projector"][0].weight.clone()
    online = model.projector[0].weight.clone()
    model.update_target(0.75)
    torch.testing.assert_close(model.target["projector"][0].weight, 0.75 * before + 0.25 * online)


def test_byol_hook_updates_with_tau_of_the_step_and_logs_it():
    """Step 1 (the first) uses tau_base; step s uses cosine_tau(s - 1, total)."""
    torch.manual_seed(0)
    model = BYOL(_backbone(), _head(8, 4), _head(4, 4), tau_base=0.9, tau_final=1.0)
    with torch.no_grad():
        for p in model.trainable_module().parameters():
            p.add_(1.0)
    before = model.target["projector"][0].weight.clone()
    online = model.projector[0].weight.clone()
    model.after_optimizer_step(1, 10)
    assert model.log_metrics() == {"method/tau": 0.9}
    torch.testing.assert_close(model.target["projector"][0].weight, 0.9 * before + 0.1 * online)
    model.after_optimizer_step(10, 10)
    assert model.log_metrics()["method/tau"] == pytest.approx(cosine_tau(9, 10, 0.9, 1.0))
    assert cosine_tau(9, 10, 0.9, 1.0) < 1.0


def test_training_loss_scales_loss_and_gradient_as_configured():
    """``loss_scale`` multiplies value and gradient (SimCLR's code sums both directions);
    ``gradient_scale`` multiplies only the gradient, leaving the value bitwise."""
    from ssl_toolkit.methods import build_method, parse_method_config, scale_gradient

    views = list(_views(n=8))
    results = {}
    for scales in ((1.0, 1.0), (2.0, 1.0), (1.0, 1 / 32)):
        config = parse_method_config(
            {
                "name": "simclr",
                "loss_scale": scales[0],
                "gradient_scale": scales[1],
                "projector": {"hidden_dim": 16, "out_dim": 8},
            }
        )
        torch.manual_seed(0)
        method = build_method(config, "timm/resnet10t").double()
        assert (method.loss_scale, method.gradient_scale) == scales
        loss = method.training_loss(method([v.double() for v in views]))
        loss.backward()
        results[scales] = (loss.detach(), {n: p.grad for n, p in method.named_parameters()})
    base_loss, base_grads = results[1.0, 1.0]
    assert torch.equal(results[2.0, 1.0][0], 2 * base_loss)
    assert torch.equal(results[1.0, 1 / 32][0], base_loss)
    for name, grad in base_grads.items():
        torch.testing.assert_close(results[2.0, 1.0][1][name], 2 * grad, rtol=1e-12, atol=0)
        torch.testing.assert_close(results[1.0, 1 / 32][1][name], grad / 32, rtol=1e-12, atol=0)
    t = torch.tensor(3.0, requires_grad=True)
    assert scale_gradient(t, 1.0) is t


@pytest.mark.parametrize("seed", [0, 1])
def test_byol_digits_recipe_centres_targets_that_otherwise_share_a_direction(seed: int) -> None:
    """The cause of the digits demo's loss to random init, on its ResNet-18 at initialisation:
    without a batch norm on the projector's output, the targets of different digits share one
    direction that a prediction can match without telling digits apart."""
    images = build_dataset("digits", image_size=32).images[:128].float() / 255

    def targets(last_batch_norm: str) -> torch.Tensor:
        overrides = [f"method.projector.last_batch_norm={last_batch_norm}"]
        cfg = load_config("byol_lars", overrides)
        torch.manual_seed(seed)
        method = build_method(cfg.method, **cfg.model.backbone_options()).train()
        with torch.no_grad():
            return method.target["projector"](method.target["backbone"](images))

    def mean_cosine_between_images(z: torch.Tensor) -> float:
        z = F.normalize(z, dim=1)
        return (z @ z.T)[~torch.eye(len(z), dtype=torch.bool)].mean().item()

    recipe = targets(load_config("byol_lars").method.projector.last_batch_norm)
    assert recipe.mean(dim=0).abs().max() < 1e-5  # centred over the batch, every dimension
    assert abs(mean_cosine_between_images(recipe)) < 0.02
    assert mean_cosine_between_images(targets("none")) > 0.2


def byol_mlp(x: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """deepmind-research ``byol/utils/networks.py`` ``MLP`` in float64, on ``head``'s weights:
    ``hk.Linear(hidden, with_bias=True)``, ``hk.BatchNorm`` (scale and offset, eps 1e-5, the
    batch's statistics in training), relu, ``hk.Linear(out, with_bias=False)``."""
    hidden, norm, last = head.layers[0], head.layers[1], head.layers[3]
    out = x @ hidden.weight.T + hidden.bias
    mean = out.mean(dim=0)
    var = (out * out).mean(dim=0) - mean * mean
    out = (out - mean) * (norm.weight * torch.rsqrt(var + 1e-5)) + norm.bias
    return torch.relu(out) @ last.weight.T


@pytest.mark.parametrize("recipe", ["imagenet/byol", "cifar10/byol", "byol_lars"])
def test_byol_heads_are_the_authors_mlp(recipe: str) -> None:
    """Projector and predictor: a hidden Linear with a bias, BatchNorm, ReLU, and an output
    Linear without one, in parameters and in value (the digits demo's projector adds its
    documented parameter-free batch norm on the output)."""
    config = load_config(recipe).method
    backbone = nn.Identity()
    backbone.num_features = 32
    torch.manual_seed(0)
    method = BYOL.build(config, backbone).double().train()
    x = torch.randn(16, 32, dtype=torch.float64)
    for name, head, in_dim in (
        ("projector", method.projector, 32),
        ("predictor", method.predictor, config.projector.out_dim),
    ):
        head_config = getattr(config, name)
        hidden, out = head_config.hidden_dim, head_config.out_dim
        shapes = {n: tuple(p.shape) for n, p in head.named_parameters()}
        assert shapes == {
            "layers.0.weight": (hidden, in_dim),
            "layers.0.bias": (hidden,),
            "layers.1.weight": (hidden,),
            "layers.1.bias": (hidden,),
            "layers.3.weight": (out, hidden),
        }, name
        assert head.layers[1].eps == 1e-5 and head.layers[1].momentum == 0.1  # decay_rate 0.9
        with torch.no_grad():
            for p in head.parameters():
                p.normal_()  # the bias and the batch norm's affine parameters too
            inputs = x if name == "projector" else torch.randn(16, in_dim, dtype=torch.float64)
            expected = byol_mlp(inputs, head)
            if head_config.last_batch_norm == "plain":
                expected = F.batch_norm(expected, None, None, training=True, eps=1e-5)
            else:
                assert head_config.last_batch_norm == "none" and len(head.layers) == 4, name
            torch.testing.assert_close(head(inputs), expected, rtol=1e-12, atol=1e-12)
