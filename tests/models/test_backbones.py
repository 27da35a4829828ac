"""Backbone construction: feature shapes, CIFAR stem, timm models, name errors."""

import pytest
import torch
import torch.nn as nn

from models import build_backbone, list_backbones


def _last_feature_map_size(model: nn.Module, layer: nn.Module, image_size: int) -> tuple[int, int]:
    shapes = []
    handle = layer.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape[-2:]))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    handle.remove()
    return tuple(shapes[0])


@pytest.mark.parametrize("cifar_stem", [False, True])
def test_resnet18_features_at_32px(cifar_stem):
    model = build_backbone("resnet18", cifar_stem=cifar_stem)
    out = model(torch.randn(4, 3, 32, 32))
    assert model.num_features == 512
    assert out.shape == (4, 512)
    # The ImageNet stem downsamples 32x by layer4 (1x1 maps); the CIFAR stem only 8x (4x4).
    expected = (4, 4) if cifar_stem else (1, 1)
    assert _last_feature_map_size(model, model.layer4, 32) == expected


def test_cifar_stem_is_a_3x3_stride_1_conv_without_pooling():
    model = build_backbone("resnet18", cifar_stem=True)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.out_channels == 64
    assert isinstance(model.maxpool, nn.Identity)


@pytest.mark.parametrize(
    ("name", "dim"),
    [
        ("resnet18", 512),
        ("resnet34", 512),
        ("resnet50", 2048),
        ("resnet101", 2048),
        ("wide_resnet50_2", 2048),
    ],
)
def test_torchvision_backbones_drop_the_classifier(name, dim):
    model = build_backbone(name)
    assert model.num_features == dim
    assert isinstance(model.fc, nn.Identity)


def test_kwargs_reach_the_constructor():
    model = build_backbone("resnet18", zero_init_residual=True)
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0


@pytest.mark.parametrize("cifar_stem", [False, True])
def test_timm_backbone(cifar_stem):
    model = build_backbone("timm/resnet10t", cifar_stem=cifar_stem)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, model.num_features)
    assert model.num_features == 512
    if cifar_stem:
        assert isinstance(model.maxpool, nn.Identity)
        assert model.conv1.stride == (1, 1)


def test_cifar_stem_unsupported_for_non_resnet_timm_model():
    with pytest.raises(ValueError, match="cifar_stem"):
        build_backbone("timm/mobilenetv3_small_050", cifar_stem=True)


@pytest.mark.parametrize(
    ("name", "close"),
    [
        ("resnet19", "resnet18"),
        ("timm/resnet10x", "timm/resnet10t"),
        ("resnet10t", "timm/resnet10t"),
    ],
)
def test_unknown_name_lists_close_names(name, close):
    with pytest.raises(ValueError) as info:
        build_backbone(name)
    message = str(info.value)
    assert repr(name) in message
    assert close in message


def test_list_backbones():
    names = list_backbones()
    assert {"resnet18", "resnet50", "wide_resnet50_2"} <= set(names)
    assert "timm/resnet10t" in list_backbones(include_timm=True)


@pytest.mark.parametrize(("name", "last_norm"), [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_starts_every_block_as_the_identity(name: str, last_norm: str):
    """The last BatchNorm of every residual block starts at γ = 0 (and only it)."""
    model = build_backbone(name, zero_init_residual=True)
    blocks = [m for m in model.modules() if hasattr(m, last_norm) and hasattr(m, "conv1")]
    assert len(blocks) == (8 if name == "resnet18" else 16)
    for block in blocks:
        assert torch.count_nonzero(getattr(block, last_norm).weight) == 0
        assert torch.all(block.bn1.weight == 1)
    default = build_backbone(name)
    assert all(
        torch.all(getattr(b, last_norm).weight == 1)
        for b in default.modules()
        if hasattr(b, last_norm) and hasattr(b, "conv1")
    )


def test_zero_init_residual_is_refused_for_timm():
    with pytest.raises(ValueError, match="zero_init_last"):
        build_backbone("timm/resnet10t", zero_init_residual=True)
