"""DINO (Caron et al., ICCV 2021, arXiv:2104.14294): a student matches the sharpened, centred
output distribution of its EMA teacher on other crops.

The method as facebookresearch/dino ``main_dino.py`` computes it:

- student and teacher are a backbone and a :class:`~models.DINOHead` (weight-normalised last
  layer, 65536 outputs); the teacher starts as a copy of the student and follows it by an EMA
  of its parameters with a momentum rising from 0.996 to 1 on a cosine (``tau_base`` /
  ``tau_final``, per step). Its BatchNorm statistics are its own (not copied), and it has no
  stochastic depth (the authors build it without ``drop_path_rate``);
- the teacher sees the global crops, its outputs are centred and sharpened with a temperature
  that warms up from 0.04 to 0.07 over the first epochs, and the student's softmax at
  temperature 0.1 on every other crop is trained against them (``DINOLoss``);
- the centre is an EMA (momentum 0.9) of the teacher's mean output over every process's
  batch, updated once per optimizer step (on all of its micro-batches under accumulation);
- what is evaluated and exported is the teacher's backbone, as the authors evaluate.

The EMA momentum is a method key, not a ``schedule:`` entry: ``schedule:`` drives the
optimizer's hyperparameters, and τ belongs to no optimizer (as BYOL's and MoCo v3's).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from models import DINOHead
from optim.configs import ConfigModel
from ssl_toolkit.data import BYOLAugment
from ssl_toolkit.distributed import all_reduce_sum_, world_size

from .base import (
    Method,
    MethodConfig,
    at_least_fp32,
    check_temperature,
    features_by_size,
)
from .byol import cosine_tau
from .registry import register_method

__all__ = [
    "DINO",
    "DINOConfig",
    "DINOHeadConfig",
    "dino_loss",
    "teacher_temperature",
    "updated_center",
]


class DINOHeadConfig(ConfigModel):
    """DINO's head: MLP to a bottleneck, L2 normalisation, weight-normalised prototypes."""

    out_dim: int = Field(65536, ge=1, description="outputs of the last layer (--out_dim)")
    hidden_dim: int = Field(2048, ge=1, description="width of the hidden layers")
    bottleneck_dim: int = Field(256, ge=1, description="width before the last layer")
    num_layers: int = Field(3, ge=1, description="Linear layers of the MLP")
    use_bn: bool = Field(False, description="BatchNorm after each hidden layer (--use_bn_in_head)")
    norm_last_layer: bool = Field(
        True,
        description="the last layer's magnitude fixed at 1 (--norm_last_layer; false for the "
        "authors' best ViT-S/16 run)",
    )

    def build(self, in_dim: int) -> DINOHead:
        """The head on ``in_dim`` features."""
        return DINOHead(
            in_dim,
            self.out_dim,
            hidden_dim=self.hidden_dim,
            bottleneck_dim=self.bottleneck_dim,
            num_layers=self.num_layers,
            use_bn=self.use_bn,
            norm_last_layer=self.norm_last_layer,
        )


class DINOConfig(MethodConfig):
    """DINO: a student matching its EMA teacher's centred, sharpened outputs across crops."""

    name: Literal["dino"] = Field("dino", description="selects this method")
    head: DINOHeadConfig = Field(default_factory=DINOHeadConfig, description="the DINO head")
    global_crops: int = Field(2, ge=1, description="the first crops, which the teacher sees")
    student_temperature: float = Field(0.1, gt=0.0, description="the student's temperature")
    teacher_temperature: float = Field(
        0.07, gt=0.0, description="the teacher's temperature after the warmup (--teacher_temp)"
    )
    teacher_temperature_start: float = Field(
        0.04, gt=0.0, description="the teacher's temperature at epoch 0 (--warmup_teacher_temp)"
    )
    teacher_temperature_warmup_epochs: int = Field(
        30, ge=0, description="epochs of the linear warmup (--warmup_teacher_temp_epochs)"
    )
    center_momentum: float = Field(0.9, ge=0.0, le=1.0, description="EMA momentum of the centre")
    tau_base: float = Field(
        0.996, ge=0.0, le=1.0, description="teacher EMA momentum at the start (--momentum_teacher)"
    )
    tau_final: float = Field(1.0, ge=0.0, le=1.0, description="teacher EMA momentum at the end")

    @model_validator(mode="after")
    def _consistent(self) -> DINOConfig:
        if self.tau_final < self.tau_base:
            raise ValueError("tau_final must be >= tau_base")
        return self


def dino_loss(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    center: Tensor,
    *,
    teacher_temp: float = 0.04,
    student_temp: float = 0.1,
) -> Tensor:
    """Cross-entropy of the student's crops against the teacher's centred, sharpened outputs.

    ``student[v]`` is crop ``v``'s ``(B, K)`` output, the global crops first; ``teacher[g]`` is
    the teacher's output of global crop ``g`` (no gradient flows into it); ``center`` is
    ``(1, K)``. Every (teacher crop ``g``, student crop ``v != g``) pair is one term; the loss is
    their mean. Computes in at least fp32.
    """
    check_temperature(teacher_temp)
    check_temperature(student_temp)
    if len(teacher) < 1 or len(student) < 2 or len(teacher) > len(student):
        raise ValueError(
            f"dino_loss needs teacher crops among at least 2 student crops, got "
            f"{len(teacher)} and {len(student)}"
        )
    shape = student[0].shape
    if any(t.shape != shape or t.ndim != 2 for t in (*student, *teacher)):
        raise ValueError(
            "every crop's output must be one (B, K) shape, got "
            f"{[tuple(t.shape) for t in (*student, *teacher)]}"
        )
    with torch.autocast(device_type=student[0].device.type, enabled=False):
        centre = at_least_fp32(center.detach())
        targets = [
            F.softmax((at_least_fp32(t.detach()) - centre) / teacher_temp, dim=-1) for t in teacher
        ]
        log_p = [F.log_softmax(at_least_fp32(s) / student_temp, dim=-1) for s in student]
        terms = [
            (-q * log_p[v]).sum(dim=-1).mean()
            for g, q in enumerate(targets)
            for v in range(len(log_p))
            if v != g
        ]
        return sum(terms) / len(terms)


@torch.no_grad()
def updated_center(center: Tensor, teacher: Sequence[Tensor], momentum: float = 0.9) -> Tensor:
    """DINO's centre after one step: ``momentum * center + (1 - momentum) * mean``, the mean
    of the teacher's outputs over every crop and every process's batch."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"center momentum must be in [0, 1], got {momentum}")
    outputs = torch.cat([at_least_fp32(t.detach()) for t in teacher])
    total = all_reduce_sum_(outputs.sum(dim=0, keepdim=True))
    batch_center = total / (outputs.shape[0] * world_size())
    return center * momentum + batch_center.to(center.dtype) * (1 - momentum)


def teacher_temperature(
    epoch: int, *, warmup_epochs: int = 30, start: float = 0.04, end: float = 0.07
) -> float:
    """The teacher temperature of ``epoch`` (0-based), as ``DINOLoss``'s schedule: evenly
    spaced from ``start`` at epoch 0 to ``end`` at epoch ``warmup_epochs - 1``, then ``end``."""
    if epoch >= warmup_epochs:
        return end
    if warmup_epochs == 1:
        return start
    return start + (end - start) * max(epoch, 0) / (warmup_epochs - 1)


@register_method("dino", DINOConfig)
class DINO(Method):
    """Student backbone + DINO head against an EMA teacher of the same architecture.

    Parameter names: ``backbone.*`` and ``head.*`` are the student, trained
    (:meth:`trainable_module`); ``teacher.backbone.*`` and ``teacher.head.*`` the teacher,
    updated only by the EMA. The last layer is ``head.last_layer.*`` (DINO freezes it for the
    first epoch: ``optim.freeze: {params: ["head.last_layer.*"], steps: <one epoch>}``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: DINOHead,
        *,
        global_crops: int = 2,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        teacher_temperature_start: float = 0.04,
        teacher_temperature_warmup_epochs: int = 30,
        center_momentum: float = 0.9,
        tau_base: float = 0.996,
        tau_final: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.teacher = nn.ModuleDict(
            {"backbone": copy.deepcopy(backbone), "head": copy.deepcopy(head)}
        )
        self.teacher.requires_grad_(False)
        for module in self.teacher.modules():  # timm's DropPath: the teacher has none
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0
        self.register_buffer("center", torch.zeros(1, head.out_dim))
        self.global_crops = global_crops
        self.student_temperature = check_temperature(student_temperature)
        self.teacher_schedule = {
            "warmup_epochs": teacher_temperature_warmup_epochs,
            "start": check_temperature(teacher_temperature_start),
            "end": check_temperature(teacher_temperature),
        }
        self.teacher_temp = teacher_temperature_start
        self.center_momentum = center_momentum
        self.tau_base, self.tau_final, self.tau = tau_base, tau_final, tau_base
        self._teacher_outputs: list[Tensor] = []

    @classmethod
    def build(cls, config: DINOConfig, backbone: nn.Module) -> DINO:
        """DINO with ``config``'s head, temperatures, centre and EMA on ``backbone``."""
        return cls(
            backbone,
            config.head.build(backbone.num_features),
            global_crops=config.global_crops,
            student_temperature=config.student_temperature,
            teacher_temperature=config.teacher_temperature,
            teacher_temperature_start=config.teacher_temperature_start,
            teacher_temperature_warmup_epochs=config.teacher_temperature_warmup_epochs,
            center_momentum=config.center_momentum,
            tau_base=config.tau_base,
            tau_final=config.tau_final,
        )

    def augmentation(
        self,
        image_size: int,
        *,
        crop_scale: tuple[float, float],
        color_strength: float,
        generator: torch.Generator,
    ) -> BYOLAugment:
        """``DataAugmentationDINO``: BYOL's two global views (blur 1.0 / 0.1, solarisation
        0 / 0.2) and, for the local crops, the first view's policy with blur 0.5."""
        augment = BYOLAugment(image_size, scale=crop_scale, generator=generator)
        augment.local_policy = dataclasses.replace(augment.policies[0], blur_p=0.5)
        return augment

    def trainable_module(self) -> nn.Module:
        """The student, ``backbone.*`` and ``head.*``, for building the optimizer."""
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head})

    def evaluated_backbone(self) -> nn.Module:
        """The teacher's backbone (``eval_knn.py`` / ``eval_linear.py``: ``teacher``)."""
        return self.teacher["backbone"]

    def check_views(self, sizes: Sequence[int]) -> None:
        """At least two crops, the ``global_crops`` teacher crops first among them."""
        if len(sizes) < 2 or self.global_crops > len(sizes):
            raise ValueError(
                f"DINO needs at least 2 crops, {self.global_crops} of them global; got {len(sizes)}"
            )

    def before_optimizer_step(self, step: int, steps_per_epoch: int) -> None:
        """The teacher temperature of the step's epoch."""
        self.teacher_temp = teacher_temperature(
            (step - 1) // steps_per_epoch, **self.teacher_schedule
        )

    def embed(self, views: Sequence[Tensor]) -> dict[str, tuple[Tensor, ...]]:
        """The student's outputs of every crop and the teacher's (without gradient) of the
        global crops: ``{"student": (s_0, ...), "teacher": (t_0, ...)}``, ``(B, K)`` each."""
        student = self.head(features_by_size(self.backbone, views))
        with torch.no_grad():
            teacher_views = views[: self.global_crops]
            teacher = self.teacher["head"](
                features_by_size(self.teacher["backbone"], teacher_views)
            )
        return {
            "student": student.chunk(len(views)),
            "teacher": teacher.chunk(len(teacher_views)),
        }

    def loss(self, embeddings: dict[str, tuple[Tensor, ...]]) -> Tensor:
        """:func:`dino_loss` at this epoch's teacher temperature, against the centre."""
        teacher = embeddings["teacher"]
        if self.training:
            self._teacher_outputs.append(torch.cat([t.detach() for t in teacher]))
        return dino_loss(
            embeddings["student"],
            teacher,
            self.center,
            teacher_temp=self.teacher_temp,
            student_temp=self.student_temperature,
        )

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """The teacher's EMA step with the momentum of step ``step`` (``cosine_scheduler``
        indexed from 0), then the centre, from the teacher's outputs of the whole step."""
        self.tau = cosine_tau(step - 1, total_steps, self.tau_base, self.tau_final)
        student = [p for m in (self.backbone, self.head) for p in m.parameters()]
        teacher = list(self.teacher.parameters())
        torch._foreach_lerp_(teacher, student, 1.0 - self.tau)
        if self._teacher_outputs:
            outputs = [torch.cat(self._teacher_outputs)]
            self._teacher_outputs.clear()
            self.center.copy_(updated_center(self.center, outputs, self.center_momentum))

    def log_metrics(self) -> dict[str, Tensor | float]:
        """The EMA momentum and the teacher temperature of the last step."""
        return {"method/tau": self.tau, "method/teacher_temperature": self.teacher_temp}
