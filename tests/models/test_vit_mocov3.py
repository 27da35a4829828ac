"""MoCo v3's ViT against a float64 transcription of facebookresearch/moco-v3 ``vits.py``:
parameter shapes, the fixed 2-D sin-cos position embedding, the initialisation, the forward
pass and ``--stop-grad-conv1``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from models import build_backbone


def authors_sincos(h: int, w: int, embed_dim: int, temperature: float = 10000.0) -> Tensor:
    """``VisionTransformerMoCo.build_2d_sincos_position_embedding`` in float64."""
    grid_w = torch.arange(w, dtype=torch.float64)
    grid_h = torch.arange(h, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = embed_dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float64) / pos_dim
    omega = 1.0 / (temperature**omega)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    pos_emb = torch.cat(
        [torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1
    )[None]
    pe_token = torch.zeros([1, 1, embed_dim], dtype=torch.float64)
    return torch.cat([pe_token, pos_emb], dim=1)


def authors_shapes(embed: int, depth: int, patch: int, grid: int) -> dict[str, tuple[int, ...]]:
    """The parameters of ``vits.vit_small`` (timm 0.4's VisionTransformer, the head dropped)."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, embed),
        "pos_embed": (1, grid * grid + 1, embed),
        "patch_embed.proj.weight": (embed, 3, patch, patch),
        "patch_embed.proj.bias": (embed,),
    }
    for i in range(depth):
        block = {
            "norm1.weight": (embed,),
            "norm1.bias": (embed,),
            "attn.qkv.weight": (3 * embed, embed),
            "attn.qkv.bias": (3 * embed,),
            "attn.proj.weight": (embed, embed),
            "attn.proj.bias": (embed,),
            "norm2.weight": (embed,),
            "norm2.bias": (embed,),
            "mlp.fc1.weight": (4 * embed, embed),
            "mlp.fc1.bias": (4 * embed,),
            "mlp.fc2.weight": (embed, 4 * embed),
            "mlp.fc2.bias": (embed,),
        }
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    shapes.update({"norm.weight": (embed,), "norm.bias": (embed,)})
    return shapes


def authors_forward(p: dict[str, Tensor], x: Tensor, depth: int, heads: int) -> Tensor:
    """``VisionTransformerMoCo``'s forward to the features its head takes (the class token
    after the last LayerNorm, eps 1e-6), written out with timm 0.4's Block and Attention."""
    patch = p["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + p["pos_embed"]
    batch, tokens, dim = x.shape

    def norm(t: Tensor, name: str) -> Tensor:
        return F.layer_norm(t, (dim,), p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-6)

    for i in range(depth):
        b = f"blocks.{i}."
        qkv = F.linear(norm(x, b + "norm1"), p[b + "attn.qkv.weight"], p[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + F.linear(out, p[b + "attn.proj.weight"], p[b + "attn.proj.bias"])
        hidden = F.gelu(
            F.linear(norm(x, b + "norm2"), p[b + "mlp.fc1.weight"], p[b + "mlp.fc1.bias"])
        )
        x = x + F.linear(hidden, p[b + "mlp.fc2.weight"], p[b + "mlp.fc2.bias"])
    return norm(x, "norm")[:, 0]


@pytest.fixture(scope="module")
def vit_small() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("mocov3_vit_small")


def test_vit_small_has_the_authors_parameters_and_12_heads(vit_small) -> None:
    shapes = {name: tuple(p.shape) for name, p in vit_small.named_parameters()}
    assert shapes == authors_shapes(384, 12, 16, 14)
    assert sum(p.numel() for p in vit_small.parameters()) == 21_665_664
    assert vit_small.num_features == 384
    assert all(block.attn.num_heads == 12 for block in vit_small.blocks)
    assert all(m.eps == 1e-6 for m in vit_small.modules() if isinstance(m, torch.nn.LayerNorm))


def test_position_embedding_is_the_authors_fixed_sin_cos(vit_small) -> None:
    pos_embed = vit_small.pos_embed
    assert not pos_embed.requires_grad
    assert torch.all(pos_embed[0, 0] == 0)
    torch.testing.assert_close(pos_embed.double(), authors_sincos(14, 14, 384), rtol=0, atol=2e-6)


def test_initialisation_is_the_authors(vit_small) -> None:
    """Xavier-uniform bounds per Q, K, V third and per Linear, all reached; zero biases; the
    patch projection xavier on its flattened weight; the class token at std 1e-6."""
    for block in vit_small.blocks:
        bound = math.sqrt(6.0 / (384 + 384))
        for third in block.attn.qkv.weight.detach().chunk(3):
            assert third.abs().max() <= bound
            assert third.abs().max() > 0.99 * bound
            assert third.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
        for linear in (block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            fan_out, fan_in = linear.weight.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert bound * 0.99 < linear.weight.detach().abs().max() <= bound
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert torch.all(linear.bias == 0)
    proj = vit_small.patch_embed.proj
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 384))
    assert bound * 0.99 < proj.weight.detach().abs().max() <= bound
    assert torch.all(proj.bias == 0)
    assert 0 < vit_small.cls_token.detach().std() < 2e-6


def test_forward_equals_the_authors_model_with_the_same_weights() -> None:
    torch.manual_seed(0)
    model = build_backbone(
        "mocov3_vit_small", img_size=16, patch_size=4, depth=2, embed_dim=48
    ).double()
    params = dict(model.named_parameters())
    torch.testing.assert_close(params["pos_embed"], authors_sincos(4, 4, 48), rtol=0, atol=1e-6)
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    expected = authors_forward(params, images, depth=2, heads=12)
    torch.testing.assert_close(model(images), expected, rtol=1e-12, atol=1e-12)
    # Six heads, as timm's vit_small has, give other features.
    assert not torch.allclose(authors_forward(params, images, depth=2, heads=6), expected)


def test_stop_grad_conv1_keeps_the_patch_projection_fixed() -> None:
    model = build_backbone(
        "mocov3_vit_small", img_size=16, patch_size=4, depth=1, embed_dim=48, stop_grad_conv1=True
    )
    fixed = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert fixed == {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    trained = build_backbone("mocov3_vit_small", img_size=16, patch_size=4, depth=1, embed_dim=48)
    assert {name for name, p in trained.named_parameters() if not p.requires_grad} == {"pos_embed"}
    with pytest.raises(ValueError, match="stop_grad_conv1"):
        build_backbone("resnet18", stop_grad_conv1=True)
