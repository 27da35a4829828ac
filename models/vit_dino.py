"""DINO's ViT (facebookresearch/dino ``vision_transformer.py``): timm's ViT with the authors'
resizing of the position embedding for crops of another size, and their class-token init.

Multi-crop sends 96-px local crops through a ViT trained at 224 px, so the 14 x 14 grid of
patch position embeddings is resized to 6 x 6. timm (``dynamic_img_size``) resizes to that
size with an antialiased bicubic; DINO's ``interpolate_pos_encoding`` calls a plain bicubic
with the scale factor ``(new + 0.1) / old`` (the 0.1 keeps the output size from rounding
down), which samples other points: the local crops see other embeddings. The class token
starts from a normal of std 0.02 truncated at ±2, as DINO's, where timm's starts at 1e-6.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

__all__ = [
    "DINOVisionTransformer",
    "dino_interpolate_pos_embed",
    "dino_vit_base",
    "dino_vit_small",
    "dino_vit_tiny",
]


def dino_interpolate_pos_embed(
    pos_embed: Tensor, old: tuple[int, int], new: tuple[int, int]
) -> Tensor:
    """``pos_embed`` (1, 1 + old_h·old_w, D), class token first, for a ``new`` patch grid.

    Unchanged at the native grid; otherwise the patch embeddings are resized by a bicubic
    with scale factor ``(new + 0.1) / old`` per side (no antialiasing, corners not aligned),
    as ``interpolate_pos_encoding`` does, in ``pos_embed``'s dtype."""
    if tuple(new) == tuple(old):
        return pos_embed
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].reshape(1, *old, dim).permute(0, 3, 1, 2)
    scale = tuple((n + 0.1) / o for n, o in zip(new, old, strict=True))
    patches = F.interpolate(patches, scale_factor=scale, mode="bicubic")
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


class DINOVisionTransformer(VisionTransformer):
    """timm's ViT that takes crops of any size as DINO's does; no classifier."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "num_classes": 0, "dynamic_img_size": True})
        trunc_normal_(self.cls_token, std=0.02)

    def _pos_embed(self, x: Tensor) -> Tensor:
        """Class token in front of the (B, H, W, D) patch tokens, plus the position
        embedding resized by :func:`dino_interpolate_pos_embed`."""
        batch, height, width, dim = x.shape
        pos_embed = dino_interpolate_pos_embed(
            self.pos_embed, tuple(self.patch_embed.grid_size), (height, width)
        )
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], 1)
        return self.pos_drop(tokens + pos_embed)


# vision_transformer.py's architecture keys: the sizes differ in width and heads.
_VIT = {
    "patch_size": 16,
    "depth": 12,
    "mlp_ratio": 4,
    "qkv_bias": True,
    "norm_layer": partial(nn.LayerNorm, eps=1e-6),
}


def dino_vit_tiny(**kwargs: Any) -> DINOVisionTransformer:
    """DINO's ``vit_tiny``: ViT-Ti/16, 3 heads."""
    return DINOVisionTransformer(**{**_VIT, "embed_dim": 192, "num_heads": 3, **kwargs})


def dino_vit_small(**kwargs: Any) -> DINOVisionTransformer:
    """DINO's ``vit_small``: ViT-S/16, 6 heads (``patch_size=8`` for ViT-S/8)."""
    return DINOVisionTransformer(**{**_VIT, "embed_dim": 384, "num_heads": 6, **kwargs})


def dino_vit_base(**kwargs: Any) -> DINOVisionTransformer:
    """DINO's ``vit_base``: ViT-B/16, 12 heads."""
    return DINOVisionTransformer(**{**_VIT, "embed_dim": 768, "num_heads": 12, **kwargs})
