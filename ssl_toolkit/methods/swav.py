"""SwAV (Caron et al., NeurIPS 2020, arXiv:2006.09882): predict the cluster assignment of one
crop from every other crop, with assignments balanced over prototypes by Sinkhorn-Knopp.

The method as facebookresearch/swav ``main_swav.py`` and ``src/resnet50.py`` compute it:

- every crop goes through the backbone (one pass per run of crops of one size), a projection
  head (2048-2048-128 with a BatchNorm, over all crops together) and L2 normalisation; its
  scores are the dot products with the prototypes (3000 by default, a Linear without bias);
- the prototypes are L2-normalised before every step, and frozen for the first iterations
  through the optimizer (``optim.freeze: {params: ["prototypes.*"], steps: 313}``);
- for each crop used for assignment, the codes ``q`` are Sinkhorn-Knopp's equipartition of its
  scores (without gradient, its sums taken over every process as ``distributed_sinkhorn``
  does, optionally with a queue of earlier embeddings' scores in front), and every other crop
  predicts them with a softmax of its own scores at temperature 0.1;
- the queue (``queue_length``, from epoch ``queue_start_epoch``) is each process's own, as the
  authors keep one per rank; its length is cut to a multiple of the step's embeddings over all
  processes as ``main_swav.py`` cuts it (:func:`rounded_queue_length`), it is used once full
  and is saved in the checkpoint per process.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ssl_toolkit.data import SimCLRAugment, TwoViewAugment
from ssl_toolkit.distributed import all_reduce_sum_, world_size

from .base import (
    HeadConfig,
    Method,
    MethodConfig,
    at_least_fp32,
    check_temperature,
    features_by_size,
    full_tensor,
)
from .registry import register_method

__all__ = ["SwAV", "SwAVConfig", "rounded_queue_length", "sinkhorn", "swav_loss"]

# SwAV's normalisation: ImageNet's, with 0.228 as the red channel's std (multicropdataset.py).
_SWAV_STD = (0.228, 0.224, 0.225)


class SwAVConfig(MethodConfig):
    """SwAV: swapped prediction of Sinkhorn-Knopp codes over prototypes, across crops."""

    name: Literal["swav"] = Field("swav", description="selects this method")
    projector: HeadConfig = Field(
        HeadConfig(hidden_dim=2048, out_dim=128, num_layers=2),
        description="projection head (--hidden_mlp, --feat_dim)",
    )
    prototypes: int = Field(3000, ge=1, description="number of prototypes (--nmb_prototypes)")
    temperature: float = Field(0.1, gt=0.0, description="softmax temperature of the predictions")
    epsilon: float = Field(0.05, gt=0.0, description="Sinkhorn-Knopp's regularisation")
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn-Knopp's iterations")
    crops_for_assign: list[int] = Field(
        [0, 1], min_length=1, description="the crops whose codes the others predict"
    )
    queue_length: int = Field(
        0,
        ge=0,
        description="embeddings queued over all processes, for small batches, cut to a "
        "multiple of the global batch (0: no queue; the authors': 3840 at batch 256)",
    )
    queue_start_epoch: int = Field(
        15, ge=0, description="the epoch from which the queue fills (--epoch_queue_starts)"
    )

    @model_validator(mode="after")
    def _distinct_crops(self) -> SwAVConfig:
        if min(self.crops_for_assign) < 0 or len(set(self.crops_for_assign)) != len(
            self.crops_for_assign
        ):
            raise ValueError(
                f"crops_for_assign must be distinct crop indices, got {self.crops_for_assign}"
            )
        return self


def rounded_queue_length(queue_length: int, batch_size: int, world_size: int) -> int:
    """``queue_length`` cut to a multiple of ``batch_size`` (per process and step) times
    ``world_size``, as ``main_swav.py`` cuts ``--queue_length`` before training: every
    process's queue then holds a whole number of its batches."""
    return queue_length - queue_length % (batch_size * world_size)


@torch.no_grad()
def sinkhorn(scores: Tensor, *, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Soft assignments ``(B, K)`` of ``B`` samples to ``K`` prototypes from their scores.

    ``exp(scores / epsilon)`` is scaled alternately so that every prototype gets ``1/K`` of the
    mass and every sample ``1/B`` (``B`` counts the samples of every process); then each row is
    scaled to sum to 1. The sums over samples are all-reduced across processes, so the codes of
    ``N`` processes are those of one process on the joined batch. Computes in at least fp32.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn expects (batch, prototypes) scores, got {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"need epsilon > 0 and iterations >= 1, got {epsilon}, {iterations}")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        q = torch.exp(at_least_fp32(scores) / epsilon).t()  # K x B, as in the paper
        samples = q.shape[1] * world_size()
        prototypes = q.shape[0]
        q /= all_reduce_sum_(q.sum())
        for _ in range(iterations):
            q /= all_reduce_sum_(q.sum(dim=1, keepdim=True))  # each prototype: 1/K
            q /= prototypes
            q /= q.sum(dim=0, keepdim=True)  # each sample: 1/B
            q /= samples
        q *= samples  # each sample's codes sum to 1
        return q.t()


def swav_loss(
    scores: Sequence[Tensor],
    *,
    crops_for_assign: Sequence[int] = (0, 1),
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    queued: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """SwAV's swapped prediction loss over crops.

    ``scores[v]`` is crop ``v``'s ``(B, K)`` prototype scores (normalised embeddings times the
    normalised prototypes). For each crop in ``crops_for_assign``, its codes are
    :func:`sinkhorn` of its scores (with ``queued[i]``, the scores of queued embeddings, in
    front; the last ``B`` rows are kept); every other crop's cross-entropy against them is
    averaged over those crops, then over the assigned crops. Computes in at least fp32.
    """
    check_temperature(temperature)
    if len(scores) < 2:
        raise ValueError(f"swav_loss needs at least 2 crops, got {len(scores)}")
    if any(s.shape != scores[0].shape or s.ndim != 2 for s in scores):
        raise ValueError(
            f"every crop's scores must be one (B, K) shape, got {[tuple(s.shape) for s in scores]}"
        )
    if not crops_for_assign or any(not 0 <= c < len(scores) for c in crops_for_assign):
        raise ValueError(
            f"crops_for_assign {list(crops_for_assign)} must index the {len(scores)} crops"
        )
    batch = scores[0].shape[0]
    with torch.autocast(device_type=scores[0].device.type, enabled=False):
        log_p = [F.log_softmax(at_least_fp32(s) / temperature, dim=1) for s in scores]
        loss = scores[0].new_zeros((), dtype=log_p[0].dtype)
        for i, crop in enumerate(crops_for_assign):
            assigned = scores[crop].detach()
            extra = queued[i] if queued is not None else None
            if extra is not None:
                assigned = torch.cat((extra.detach().to(assigned.dtype), assigned))
            q = sinkhorn(assigned, epsilon=epsilon, iterations=sinkhorn_iterations)[-batch:]
            others = [v for v in range(len(scores)) if v != crop]
            subloss = sum(-(q * log_p[v]).sum(dim=1).mean() for v in others)
            loss = loss + subloss / len(others)
        return loss / len(crops_for_assign)


@register_method("swav", SwAVConfig)
class SwAV(Method):
    """Backbone + projection head + prototypes; codes by Sinkhorn-Knopp, swapped prediction.

    Parameter names: ``backbone.*``, ``projector.*``, ``prototypes.weight``. The queue is
    not a buffer (each process has its own, and DDP would broadcast rank 0's): it is
    :meth:`rank_state_dict`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module,
        prototypes: int,
        *,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        crops_for_assign: Sequence[int] = (0, 1),
        queue_length: int = 0,
        queue_start_epoch: int = 15,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.prototypes = nn.Linear(projector.out_dim, prototypes, bias=False)
        self.temperature = check_temperature(temperature)
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.crops_for_assign = tuple(crops_for_assign)
        self.queue_length = queue_length
        self.queue_start_epoch = queue_start_epoch
        self.queue: Tensor | None = None
        """(assigned crops, queue_length / processes, dim): this process's queued embeddings,
        newest first; ``None`` before ``queue_start_epoch``."""
        self.queued_rows = 0
        """Rows pushed into :attr:`queue` so far (it is used once they fill it)."""
        self._queued_scores: list[Tensor] | None = None
        self._pending: list[Tensor] = []

    @classmethod
    def build(cls, config: SwAVConfig, backbone: nn.Module) -> SwAV:
        """SwAV with ``config``'s head, prototypes, Sinkhorn-Knopp and queue on ``backbone``."""
        return cls(
            backbone,
            config.projector.build(backbone.num_features),
            config.prototypes,
            temperature=config.temperature,
            epsilon=config.epsilon,
            sinkhorn_iterations=config.sinkhorn_iterations,
            crops_for_assign=config.crops_for_assign,
            queue_length=config.queue_length,
            queue_start_epoch=config.queue_start_epoch,
        )

    def augmentation(
        self,
        image_size: int,
        *,
        crop_scale: tuple[float, float],
        color_strength: float,
        generator: torch.Generator,
    ) -> TwoViewAugment:
        """SwAV's crops (``multicropdataset.py``): flip, colour distortion of strength
        ``color_strength`` (p 0.8), grayscale 0.2 and blur 0.5 on every crop, at any size."""
        return SimCLRAugment(
            image_size,
            scale=crop_scale,
            jitter_strength=color_strength,
            blur_p=0.5,
            blur_min_size=0,
            std=_SWAV_STD,
            generator=generator,
        )

    def check_views(self, sizes: Sequence[int]) -> None:
        """At least two crops, and every crop of ``crops_for_assign`` among them."""
        if len(sizes) < 2 or max(self.crops_for_assign) >= len(sizes):
            raise ValueError(
                f"SwAV assigns crops {list(self.crops_for_assign)} and needs at least 2 "
                f"crops; got {len(sizes)}"
            )

    @torch.no_grad()
    def before_optimizer_step(self, step: int, steps_per_epoch: int) -> None:
        """Normalise the prototypes (``main_swav.py`` does so before every forward), start
        the queue at its epoch, and score the queue against the normalised prototypes."""
        weight = self.prototypes.weight
        weight.copy_(F.normalize(weight, dim=1, p=2))
        epoch = (step - 1) // steps_per_epoch
        if self.queue is None and self.queue_length and epoch >= self.queue_start_epoch:
            shape = (len(self.crops_for_assign), self.queue_length // world_size(), weight.shape[1])
            self.queue = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        self._queued_scores = None
        if self.queue is not None and self.queued_rows >= self.queue.shape[1]:
            prototypes = full_tensor(weight)
            self._queued_scores = [q @ prototypes.t() for q in self.queue]

    def embed(self, views: Sequence[Tensor]) -> dict[str, tuple[Tensor, ...]]:
        """Each crop's normalised projection ``z`` and prototype scores:
        ``{"z": (z_0, ...), "scores": (s_0, ...)}``, one ``(B, ·)`` tensor per crop."""
        z = F.normalize(self.projector(features_by_size(self.backbone, views)), dim=1, p=2)
        scores = self.prototypes(z)
        return {"z": z.chunk(len(views)), "scores": scores.chunk(len(views))}

    def loss(self, embeddings: dict[str, tuple[Tensor, ...]]) -> Tensor:
        """:func:`swav_loss` of the crops' scores, with the queue's scores once it is full."""
        loss = swav_loss(
            embeddings["scores"],
            crops_for_assign=self.crops_for_assign,
            temperature=self.temperature,
            epsilon=self.epsilon,
            sinkhorn_iterations=self.sinkhorn_iterations,
            queued=self._queued_scores,
        )
        if self.training and self.queue is not None:
            z = embeddings["z"]
            self._pending.append(torch.stack([z[c].detach() for c in self.crops_for_assign]))
        return loss

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Push the step's embeddings of the assigned crops into the queue, newest first."""
        if self.queue is None or not self._pending:
            self._pending.clear()
            return
        new = torch.cat(self._pending, dim=1).to(self.queue.dtype)
        self._pending.clear()
        if self.queued_rows == 0:
            self._cut_queue(new.shape[1])
            if self.queue is None:
                return
        self.queue = torch.cat((new, self.queue), dim=1)[:, : self.queue.shape[1]]
        self.queued_rows += new.shape[1]

    def _cut_queue(self, batch_size: int) -> None:
        """Cut the new queue to :func:`rounded_queue_length` for the first step's
        ``batch_size`` rows per process (no queue when that is 0), with a warning when cut."""
        processes = world_size()
        length = rounded_queue_length(self.queue_length, batch_size, processes)
        if length < self.queue_length:
            warnings.warn(
                f"method.queue_length {self.queue_length} is cut to {length}, a multiple of "
                f"the {batch_size * processes} embeddings of a step over all processes "
                f"({batch_size} x {processes}), as main_swav.py cuts it",
                stacklevel=2,
            )
        self.queue_length = length
        self.queue = self.queue[:, : length // processes] if length else None

    def rank_state_dict(self) -> dict[str, Any]:
        """This process's queue (on the CPU) and how many rows it has taken."""
        queue = self.queue.cpu() if self.queue is not None else None
        return {"queue": queue, "queued_rows": self.queued_rows}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`rank_state_dict` (an empty dict: no queue yet)."""
        queue = state.get("queue")
        device = self.prototypes.weight.device
        self.queue = queue.to(device) if queue is not None else None
        self.queued_rows = int(state.get("queued_rows", 0))
