"""Projection and prediction heads: shapes, layer structure, maths, channels_last inputs."""

import pytest
import torch
import torch.nn as nn

from models import PredictionHead, ProjectionHead, build_backbone


def _count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.mark.parametrize(
    ("dims", "out"),
    [((2048, 2048, 128), 128), ((2048, 4096, 256), 256), ((512, 512, 64), 64)],
)
def test_projection_shapes(dims, out):
    head = ProjectionHead(*dims)
    assert head(torch.randn(4, dims[0])).shape == (4, out)
    assert _count(head, nn.Linear) == 2
    assert _count(head, nn.BatchNorm1d) == 1


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4])
def test_num_layers(num_layers):
    head = ProjectionHead(32, 64, 16, num_layers=num_layers)
    assert _count(head, nn.Linear) == num_layers
    assert _count(head, nn.BatchNorm1d) == num_layers - 1
    assert _count(head, nn.ReLU) == num_layers - 1
    assert head(torch.randn(5, 32)).shape == (5, 16)


@pytest.mark.parametrize(
    ("kind", "params"), [("affine", {"weight", "bias"}), ("scale", {"weight"}), ("plain", set())]
)
def test_last_batch_norm_normalises_the_output(kind: str, params: set[str]):
    """Every kind standardises the output; they differ in which affine parameters they learn
    (SimCLR's code keeps γ only, MoCo v3's neither)."""
    head = ProjectionHead(32, 64, 16, num_layers=3, last_batch_norm=kind).train()
    norm = head.layers[-1]
    assert isinstance(norm, nn.BatchNorm1d)
    assert {name for name, _ in norm.named_parameters()} == params
    assert head.layers[-2].bias is None
    x = torch.randn(64, 32)
    with torch.no_grad():
        if "weight" in params:
            norm.weight.fill_(2.0)
        before = head.layers[:-1](x)
    expected = (before - before.mean(0)) / torch.sqrt(before.var(0, unbiased=False) + norm.eps)
    if "weight" in params:
        expected = 2.0 * expected
    torch.testing.assert_close(head(x), expected, atol=1e-5, rtol=1e-5)
    norm.reset_parameters()
    if "weight" in params:
        assert torch.equal(norm.weight, torch.ones(16))


def test_unknown_last_batch_norm_is_an_error():
    with pytest.raises(ValueError, match="last_batch_norm"):
        ProjectionHead(8, 16, 4, last_batch_norm="gamma")


def test_without_batch_norm_matches_the_mlp_formula():
    head = ProjectionHead(8, 16, 4, batch_norm=False)
    assert _count(head, nn.BatchNorm1d) == 0
    first, last = head.layers[0], head.layers[-1]
    x = torch.randn(3, 8)
    expected = torch.relu(x @ first.weight.T + first.bias) @ last.weight.T + last.bias
    torch.testing.assert_close(head(x), expected)


def test_linear_before_batch_norm_has_no_bias():
    head = ProjectionHead(8, 16, 4)
    assert head.layers[0].bias is None
    assert head.layers[-1].bias is not None


def test_invalid_num_layers():
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(8, 16, 4, num_layers=0)


def test_prediction_head_defaults_are_byol():
    head = PredictionHead()
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 4096), (4096, 256)]
    assert _count(head, nn.BatchNorm1d) == 1
    assert head(torch.randn(4, 256)).shape == (4, 256)
    # networks.py's MLP: with_bias=True on the hidden layer (haiku starts it at 0), False last.
    assert torch.equal(linears[0].bias, torch.zeros(4096)) and linears[1].bias is None


def test_heads_accept_features_of_a_channels_last_model():
    backbone = build_backbone("resnet18", cifar_stem=True).eval()
    backbone = backbone.to(memory_format=torch.channels_last)
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    head = ProjectionHead(backbone.num_features, 64, 16).eval()
    with torch.no_grad():
        features = backbone(images)
        out = head(features)
        reference = head(features.contiguous())
    assert out.shape == (4, 16)
    torch.testing.assert_close(out, reference)


def test_heads_accept_pooled_maps_and_strided_features():
    head = PredictionHead(8, 16, 8).eval()
    features = torch.randn(8, 8)
    pooled = features.view(8, 8, 1, 1).contiguous(memory_format=torch.channels_last)
    strided = torch.randn(8, 16)[:, ::2]
    with torch.no_grad():
        torch.testing.assert_close(head(pooled), head(features))
        torch.testing.assert_close(head(strided), head(strided.contiguous()))
