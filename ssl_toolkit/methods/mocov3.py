"""MoCo v3 for ResNets (Chen, Xie and He, ICCV 2021, arXiv:2104.02057): contrast each view's
prediction with the other view's key from a momentum encoder.

Config, heads, the loss and the momentum schedule, all here, as the authors'
``moco/builder.py`` and ``main_moco.py`` compute them. The architecture is BYOL's (an online
backbone + projector + predictor, a momentum copy of backbone + projector), so the method
extends :class:`~ssl_toolkit.methods.byol.BYOL` and changes what differs:

- heads without biases; the projector ends with a BatchNorm without affine parameters, the
  predictor with none (``_build_mlp``; a ViT's projector has 3 layers and its predictor ends
  with the plain BatchNorm too: set them in the config);
- the loss: InfoNCE of each view's normalised prediction against the other view's keys of every
  process (gathered without gradient), times ``2τ``, summed over both directions;
- the momentum ``m`` rises from 0.99 to 1 on a half cosine over the run (``--moco-m-cos``),
  applied before each forward with that iteration's ``m``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ssl_toolkit.distributed import all_gather_rows, world_size

from .base import HeadConfig, MethodConfig, at_least_fp32, check_pair, check_temperature
from .byol import BYOL, cosine_tau
from .registry import register_method

__all__ = ["MoCoV3", "MoCoV3Config", "moco_v3_loss"]


class MoCoV3Projector(HeadConfig):
    """The authors' ResNet projector: 2048-4096-256, a plain BatchNorm on the output."""

    hidden_dim: int = Field(4096, ge=1, description="width of the hidden layers (--moco-mlp-dim)")
    out_dim: int = Field(256, ge=1, description="width of the output (--moco-dim)")
    num_layers: int = Field(2, ge=1, description="number of linear layers (3 for a ViT)")
    last_batch_norm: Literal["none", "affine", "scale", "plain"] = Field(
        "plain", description="batch norm on the output (the authors': plain, affine=False)"
    )


class MoCoV3Predictor(HeadConfig):
    """The authors' ResNet predictor: 256-4096-256, no BatchNorm on the output."""

    hidden_dim: int = Field(4096, ge=1, description="width of the hidden layers")
    out_dim: int = Field(256, ge=1, description="width of the output, the projector's")
    num_layers: int = Field(2, ge=1, description="number of linear layers")
    last_batch_norm: Literal["none", "affine", "scale", "plain"] = Field(
        "none", description="batch norm on the output (a ViT's: plain)"
    )


class MoCoV3Config(MethodConfig):
    """MoCo v3: predictions against a momentum encoder's keys, InfoNCE both ways."""

    name: Literal["mocov3"] = Field("mocov3", description="selects this method")
    projector: MoCoV3Projector = Field(
        default_factory=MoCoV3Projector, description="projection head, online and momentum"
    )
    predictor: MoCoV3Predictor = Field(
        default_factory=MoCoV3Predictor, description="prediction head on the online projection"
    )
    temperature: float = Field(
        1.0,
        gt=0.0,
        description="τ of InfoNCE (main_moco.py's default, kept by its ResNet recipes; 0.2 "
        "for ViTs)",
    )
    tau_base: float = Field(
        0.99, ge=0.0, le=1.0, description="momentum m of the key encoder at the start"
    )
    tau_final: float = Field(1.0, ge=0.0, le=1.0, description="momentum m at the end")

    @model_validator(mode="after")
    def _consistent(self) -> MoCoV3Config:
        if self.tau_final < self.tau_base:
            raise ValueError("tau_final must be >= tau_base")
        if self.predictor.out_dim != self.projector.out_dim:
            raise ValueError(
                f"predictor.out_dim ({self.predictor.out_dim}) must equal projector.out_dim "
                f"({self.projector.out_dim}): predictions are contrasted with keys"
            )
        return self


def moco_v3_loss(q: Tensor, k: Tensor, *, temperature: float = 1.0) -> Tensor:
    """MoCo v3's contrastive loss of queries ``q`` against keys ``k``, both ``(n, d)``.

    Both are L2-normalised; the keys of every process are gathered without gradient (and ``k``
    is detached here); query ``i`` of rank ``r`` has key ``r·n + i`` as its positive. The loss is
    the cross entropy of ``q @ keys.T / τ`` averaged over this process's queries, times ``2τ``,
    as ``builder.py``'s ``contrastive_loss``. After DDP's mean over ranks, the gradients are
    those of one process on the joined batch. Computes in at least fp32, also under autocast.
    """
    check_pair(q, k, "moco_v3_loss")
    check_temperature(temperature)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(at_least_fp32(q), dim=1)
        keys = all_gather_rows(F.normalize(at_least_fp32(k.detach()), dim=1))
        logits = q @ keys.T / temperature
        offset = dist.get_rank() * q.shape[0] if world_size() > 1 else 0
        labels = offset + torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, labels) * (2 * temperature)


@register_method("mocov3", MoCoV3Config)
class MoCoV3(BYOL):
    """Online backbone + projector + predictor against a momentum encoder's keys.

    Module layout and parameter names are BYOL's: ``backbone.*``, ``projector.*`` and
    ``predictor.*`` are trained (:meth:`trainable_module`), ``target.backbone.*`` and
    ``target.projector.*`` are the momentum encoder, updated only by the momentum step. The
    embeddings are BYOL's: ``{"online": (q_a, q_b), "target": (k_a, k_b)}``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module,
        predictor: nn.Module,
        *,
        temperature: float = 1.0,
        tau_base: float = 0.99,
        tau_final: float = 1.0,
    ) -> None:
        super().__init__(backbone, projector, predictor, tau_base=tau_base, tau_final=tau_final)
        self.temperature = check_temperature(temperature)

    @classmethod
    def build(cls, config: MoCoV3Config, backbone: nn.Module) -> MoCoV3:
        """MoCo v3 with ``config``'s heads (no biases, as ``_build_mlp``), τ and momentum."""
        return cls(
            backbone,
            config.projector.build(backbone.num_features, last_bias=False),
            config.predictor.build(config.projector.out_dim, last_bias=False),
            temperature=config.temperature,
            tau_base=config.tau_base,
            tau_final=config.tau_final,
        )

    def loss(self, embeddings: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        """``L(q_a, k_b) + L(q_b, k_a)`` (:func:`moco_v3_loss`)."""
        (q_a, q_b), (k_a, k_b) = embeddings["online"], embeddings["target"]
        return moco_v3_loss(q_a, k_b, temperature=self.temperature) + moco_v3_loss(
            q_b, k_a, temperature=self.temperature
        )

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """The momentum step of the next iteration, ``step`` (0-based), with its ``m``.

        The authors update the momentum encoder before each forward with ``m`` of that
        iteration; before the first it is still the online network's copy, so that update
        changes nothing and the one after optimizer step ``s`` is iteration ``s``'s.
        """
        self.tau = cosine_tau(step, total_steps, self.tau_base, self.tau_final)
        self.update_target(self.tau)
