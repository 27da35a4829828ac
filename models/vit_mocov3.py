"""MoCo v3's ViT (facebookresearch/moco-v3 ``vits.py``): timm's ViT with a fixed 2-D sin-cos
position embedding and the authors' initialisation.

What differs from timm's ``vit_small_patch16_224``, and changes the method:

- 12 heads in ViT-S (timm's has 6): the authors' ``vit_small`` keeps ViT-B's head count;
- the position embedding is fixed (not learned): sin-cos of each patch's row and column at
  temperature 10000, zero for the class token (``build_2d_sincos_position_embedding``);
- xavier-uniform Linear layers with Q, K and V each treated as its own matrix (timm's
  ``weight_init="moco"``), the class token from N(0, 1e-6), and the patch projection
  xavier-uniform on its flattened ``3·p·p → D`` weight, zero bias.

``--stop-grad-conv1`` (a patch projection kept at its random init, which the authors' ViT
recipes use) is ``build_backbone(..., stop_grad_conv1=True)``, ``model.stop_grad_conv1``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["MoCoV3VisionTransformer", "mocov3_vit_base", "mocov3_vit_small"]


class MoCoV3VisionTransformer(VisionTransformer):
    """timm's ViT as ``VisionTransformerMoCo`` builds and initialises it; no classifier."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "num_classes": 0, "weight_init": "moco"})
        grid = build_sincos2d_pos_embed(
            list(self.patch_embed.grid_size),
            self.embed_dim,
            temperature=10000.0,
            interleave_sin_cos=True,  # the authors' order: sin, cos of the row, then the column
        )
        self.pos_embed = nn.Parameter(
            torch.cat([grid.new_zeros(1, self.embed_dim), grid])[None], requires_grad=False
        )
        proj = self.patch_embed.proj
        bound = math.sqrt(6.0 / (proj.weight[0].numel() + self.embed_dim))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)


# vits.py's architecture keys: ViT-S and ViT-B differ in width only.
_VIT = {
    "patch_size": 16,
    "depth": 12,
    "num_heads": 12,
    "mlp_ratio": 4,
    "qkv_bias": True,
    "norm_layer": partial(nn.LayerNorm, eps=1e-6),
}


def mocov3_vit_small(**kwargs: Any) -> MoCoV3VisionTransformer:
    """``vits.vit_small``: ViT-S/16 with 12 heads of 32 dimensions."""
    return MoCoV3VisionTransformer(**{**_VIT, "embed_dim": 384, **kwargs})


def mocov3_vit_base(**kwargs: Any) -> MoCoV3VisionTransformer:
    """``vits.vit_base``: ViT-B/16."""
    return MoCoV3VisionTransformer(**{**_VIT, "embed_dim": 768, **kwargs})
