"""BYOL (Grill et al. 2020, arXiv:2006.07733): predict a slow-moving target network's projection.

The online network (backbone, projector, predictor) is trained; the target network (a copy of
backbone + projector) follows it as an exponential moving average, updated by the trainer after
each optimizer step with :meth:`BYOL.update_target` and a τ from :func:`cosine_tau`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from ssl_toolkit.losses import byol_loss

__all__ = ["BYOL", "cosine_tau"]


def cosine_tau(step: int, total_steps: int, tau_base: float, tau_final: float = 1.0) -> float:
    """BYOL's EMA decay schedule: τ rises from ``tau_base`` at step 0 to ``tau_final`` at
    ``total_steps`` on a half cosine, ``τ = τ_f - (τ_f - τ_b)·(cos(π·step/total) + 1)/2``.

    Steps outside ``[0, total_steps]`` are clamped, so τ stays within its two endpoints.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return tau_final - (tau_final - tau_base) * (math.cos(math.pi * progress) + 1) / 2


class BYOL(nn.Module):
    """Online backbone + projector + predictor regressing onto an EMA target network.

    Module layout and parameter names:

    - ``backbone.*``, ``projector.*``, ``predictor.*``: the online network, trained. These are
      the names SimCLR uses too, so optimizer rules read the same for both methods.
    - ``target.backbone.*``, ``target.projector.*``: the target network, a deep copy of the
      online backbone and projector made at construction. Its parameters have
      ``requires_grad=False`` and are updated only by :meth:`update_target`; they are in
      ``state_dict()`` (so checkpoints hold them) but must not reach the optimizer: build it from
      :meth:`trainable_module`, whose ``named_parameters()`` are exactly the online parameters
      under the same names as in this module.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.target = nn.ModuleDict(
            {"backbone": copy.deepcopy(backbone), "projector": copy.deepcopy(projector)}
        )
        self.target.requires_grad_(False)

    def trainable_module(self) -> nn.Module:
        """A container of the online modules, for building the optimizer.

        Its ``named_parameters()`` yields ``backbone.*``, ``projector.*`` and ``predictor.*``,
        the same objects and names as in ``self.named_parameters()``, and nothing of the target.
        """
        return nn.ModuleDict(
            {"backbone": self.backbone, "projector": self.projector, "predictor": self.predictor}
        )

    def forward(self, view_a: Tensor, view_b: Tensor) -> Tensor:
        """Return the symmetric BYOL loss ``L(p_a, z'_b) + L(p_b, z'_a)``, in [0, 8].

        ``p`` are online predictions, ``z'`` target projections computed without gradient, and
        ``L`` is :func:`~ssl_toolkit.losses.byol_loss`. Both views go through each network in one
        forward pass (batch concatenation), so batch-norm statistics cover all 2n views.
        """
        n = view_a.shape[0]
        views = torch.cat([view_a, view_b])
        p = self.predictor(self.projector(self.backbone(views)))
        with torch.no_grad():
            z = self.target["projector"](self.target["backbone"](views))
        return byol_loss(p[:n], z[n:]) + byol_loss(p[n:], z[:n])

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """EMA step ``target = τ·target + (1 - τ)·online`` for parameters; buffers are copied.

        Call after each optimizer step. Buffers (batch-norm running statistics) are copied rather
        than averaged, so the target normalises with the online network's current statistics.
        """
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {tau}")
        online = (self.backbone, self.projector)
        target = (self.target["backbone"], self.target["projector"])
        online_params = [p for m in online for p in m.parameters()]
        target_params = [p for m in target for p in m.parameters()]
        if target_params:
            torch._foreach_lerp_(target_params, online_params, 1.0 - tau)
        online_buffers = [b for m in online for b in m.buffers()]
        target_buffers = [b for m in target for b in m.buffers()]
        if target_buffers:
            torch._foreach_copy_(target_buffers, online_buffers)

    def embed(self, x: Tensor) -> Tensor:
        """Online backbone features, the representation that is evaluated."""
        return self.backbone(x)
