"""BYOL (Grill et al. 2020, arXiv:2006.07733): predict a slow-moving target network's projection.

Config, model (online backbone + projector + predictor, EMA target), the regression loss, the
asymmetric augmentation and the EMA hook, all here. The online network is trained; the target
network (a copy of backbone + projector) follows it as an exponential moving average after each
optimizer step, with τ rising on a cosine from ``tau_base`` to ``tau_final``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from optim.schedules import cosine_ramp

from .base import (
    BYOLAugmentation,
    HeadConfig,
    Method,
    MethodConfig,
    at_least_fp32,
    check_pair,
    two_views,
)
from .registry import register_method

__all__ = ["BYOL", "BYOLConfig", "byol_loss", "cosine_tau"]


class BYOLConfig(MethodConfig):
    """BYOL: online network + predictor against an EMA target network."""

    name: Literal["byol"] = Field("byol", description="selects this method")
    projector: HeadConfig = Field(
        HeadConfig(hidden_dim=4096, out_dim=256, num_layers=2),
        description="projection head, online and target",
    )
    predictor: HeadConfig = Field(
        HeadConfig(hidden_dim=4096, out_dim=256, num_layers=2),
        description="prediction head on the online projection; out_dim as the projector's",
    )
    tau_base: float = Field(0.996, ge=0.0, le=1.0, description="target EMA decay at the start")
    tau_final: float = Field(1.0, ge=0.0, le=1.0, description="target EMA decay at the end")

    @model_validator(mode="after")
    def _consistent(self) -> BYOLConfig:
        if self.tau_final < self.tau_base:
            raise ValueError("tau_final must be >= tau_base")
        if self.predictor.out_dim != self.projector.out_dim:
            raise ValueError(
                f"predictor.out_dim ({self.predictor.out_dim}) must equal projector.out_dim "
                f"({self.projector.out_dim}): the prediction regresses the target projection"
            )
        return self


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss: the batch mean of ``2 - 2·cos(p, z)``, in [0, 4].

    ``p`` is the online prediction and ``z`` the target projection, shape ``(n, d)``. ``z`` is
    detached here, so the target never receives a gradient whatever the caller does. Computes in
    at least fp32, also under autocast.
    """
    check_pair(p, z, "byol_loss")
    with torch.autocast(device_type=p.device.type, enabled=False):
        p = F.normalize(at_least_fp32(p), dim=1)
        z = F.normalize(at_least_fp32(z.detach()), dim=1)
        return (2 - 2 * (p * z).sum(dim=1)).mean()


def cosine_tau(step: int, total_steps: int, tau_base: float, tau_final: float = 1.0) -> float:
    """BYOL's EMA decay schedule: τ rises from ``tau_base`` at step 0 to ``tau_final`` at
    ``total_steps`` on a half cosine (:func:`optim.schedules.cosine_ramp`; steps outside
    ``[0, total_steps]`` are clamped)."""
    return cosine_ramp(step, total_steps, tau_base, tau_final)


@register_method("byol", BYOLConfig)
class BYOL(BYOLAugmentation, Method):
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

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module,
        predictor: nn.Module,
        *,
        tau_base: float = 0.996,
        tau_final: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.target = nn.ModuleDict(
            {"backbone": copy.deepcopy(backbone), "projector": copy.deepcopy(projector)}
        )
        self.target.requires_grad_(False)
        self.tau_base = tau_base
        self.tau_final = tau_final
        self.tau = tau_base

    @classmethod
    def build(cls, config: BYOLConfig, backbone: nn.Module) -> BYOL:
        """BYOL with ``config``'s heads and τ schedule on ``backbone``: each head is the
        authors' ``MLP`` (``networks.py``), its hidden Linear biased, its output Linear not."""
        projector = config.projector.build(backbone.num_features, last_bias=False, hidden_bias=True)
        predictor = config.predictor.build(
            config.projector.out_dim, last_bias=False, hidden_bias=True
        )
        return cls(
            backbone, projector, predictor, tau_base=config.tau_base, tau_final=config.tau_final
        )

    def trainable_module(self) -> nn.Module:
        """A container of the online modules, for building the optimizer.

        Its ``named_parameters()`` yields ``backbone.*``, ``projector.*`` and ``predictor.*``,
        the same objects and names as in ``self.named_parameters()``, and nothing of the target.
        """
        return nn.ModuleDict(
            {"backbone": self.backbone, "projector": self.projector, "predictor": self.predictor}
        )

    def embed(self, views: Sequence[Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Online predictions ``p`` and target projections ``z'`` (without gradient) of both
        views: ``{"online": (p_a, p_b), "target": (z'_a, z'_b)}``.

        Each view goes through each network in its own forward pass, as in the authors' code,
        so batch-norm statistics are per view.
        """
        views = two_views(views, "byol")
        online = tuple(self.predictor(self.projector(self.backbone(v))) for v in views)
        with torch.no_grad():
            target = tuple(self.target["projector"](self.target["backbone"](v)) for v in views)
        return {"online": online, "target": target}

    def loss(self, embeddings: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        """The symmetric BYOL loss ``L(p_a, z'_b) + L(p_b, z'_a)`` (:func:`byol_loss`), in
        [0, 8]."""
        (p_a, p_b), (z_a, z_b) = embeddings["online"], embeddings["target"]
        return byol_loss(p_a, z_b) + byol_loss(p_b, z_a)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Move the target towards the online network with τ of step ``step``.

        Step ``step`` (1-based) uses ``cosine_tau(step - 1, ...)``: the first update uses
        ``tau_base``, as the authors' schedule indexed from 0 does.
        """
        self.tau = cosine_tau(step - 1, total_steps, self.tau_base, self.tau_final)
        self.update_target(self.tau)

    def log_metrics(self) -> dict[str, Tensor | float]:
        """The τ of the last target update, as ``method/tau``."""
        return {"method/tau": self.tau}

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """EMA step ``target = τ·target + (1 - τ)·online`` for parameters; buffers are copied.

        Buffers (batch-norm running statistics) are copied rather than averaged, so the target
        normalises with the online network's current statistics.
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
