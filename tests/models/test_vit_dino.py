"""DINO's ViT against a float64 transcription of facebookresearch/dino
``vision_transformer.py``: the position embedding of 96-px local crops resized as
``interpolate_pos_encoding`` resizes it (not timm's antialiased resize), unchanged at the
native size, and the class token's init."""

from __future__ import annotations

import math

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from models import build_backbone
from models.vit_dino import dino_interpolate_pos_embed

GRID, DIM = 14, 24  # 224 px in patches of 16; a narrow width keeps the test fast


def authors_interpolate_pos_encoding(pos_embed: Tensor, npatch: int, w: int, h: int) -> Tensor:
    """``VisionTransformer.interpolate_pos_encoding`` for patches of 16 (``npatch``: the
    image's patch tokens; ``w``, ``h``: ``x.shape[2:]`` as ``prepare_tokens`` passes them)."""
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // 16
    h0 = h // 16
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def smooth_pos_embed() -> Tensor:
    """A class token and a 14 x 14 grid of embeddings that vary smoothly over the grid."""
    rows, cols = torch.meshgrid(
        torch.arange(GRID, dtype=torch.float64),
        torch.arange(GRID, dtype=torch.float64),
        indexing="ij",
    )
    freq = torch.linspace(0.05, 0.4, DIM, dtype=torch.float64)
    grid = torch.sin(rows.reshape(-1, 1) * freq + cols.reshape(-1, 1) * freq.flip(0))
    return torch.cat([torch.full((1, DIM), 0.5, dtype=torch.float64), grid])[None]


def test_local_crops_resize_the_embedding_as_dino_does() -> None:
    pos_embed = smooth_pos_embed()
    expected = authors_interpolate_pos_encoding(pos_embed, 36, 96, 96)
    ours = dino_interpolate_pos_embed(pos_embed, (GRID, GRID), (6, 6))
    assert ours.shape == (1, 37, DIM)
    torch.testing.assert_close(ours, expected, rtol=1e-14, atol=1e-14)
    # timm's resize to a size, antialiased, is another embedding.
    timm_resized = resample_abs_pos_embed(pos_embed, [6, 6], [GRID, GRID], num_prefix_tokens=1)
    assert (timm_resized.double() - expected).abs().max() > 0.05


def test_native_size_keeps_the_embedding() -> None:
    pos_embed = smooth_pos_embed()
    assert dino_interpolate_pos_embed(pos_embed, (GRID, GRID), (GRID, GRID)) is pos_embed
    assert authors_interpolate_pos_encoding(pos_embed, GRID * GRID, 224, 224) is pos_embed


def _tiny_dino_vit() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone("dino_vit_small", embed_dim=DIM, depth=1, num_heads=2).double().eval()


def test_a_96_px_crop_sees_the_authors_embedding() -> None:
    """The backbone on 96-px crops equals a fixed-size 96-px ViT holding the same weights and
    the embedding ``interpolate_pos_encoding`` gives; at 224 px, the embedding as is."""
    model = _tiny_dino_vit()
    with torch.no_grad():
        model.pos_embed.copy_(smooth_pos_embed())
    fixed = VisionTransformer(
        img_size=96, embed_dim=DIM, depth=1, num_heads=2, qkv_bias=True, num_classes=0
    ).double()
    state = dict(model.state_dict())
    state["pos_embed"] = authors_interpolate_pos_encoding(state["pos_embed"], 36, 96, 96)
    fixed.load_state_dict(state)
    images = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), fixed.eval()(images), rtol=1e-12, atol=1e-12)
        native = torch.randn(2, 3, 224, 224, dtype=torch.float64)
        tokens = model.patch_embed(native)
        expected = torch.cat([model.cls_token.expand(2, -1, -1), tokens.flatten(1, 2)], dim=1)
        assert torch.equal(model._pos_embed(tokens), expected + model.pos_embed)


def test_class_token_starts_at_the_authors_std() -> None:
    """DINO: ``trunc_normal_(self.cls_token, std=.02)`` (timm's ViT: a normal of std 1e-6)."""
    torch.manual_seed(0)
    cls_token = build_backbone("dino_vit_small", depth=1).cls_token.detach()
    assert 0.015 < cls_token.std() < 0.025


def test_dino_vit_small_is_dinos_architecture() -> None:
    model = build_backbone("dino_vit_small", depth=1)
    assert model.num_features == 384 and model.blocks[0].attn.num_heads == 6
    assert model.patch_embed.patch_size == (16, 16) and model.pos_embed.requires_grad
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, nn.LayerNorm))
