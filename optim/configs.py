"""Validated optimizer configurations: one Pydantic model per optimizer, tagged by ``name``.

Every model forbids unknown keys, so a typo in YAML fails loudly instead of being ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AdamWConfig",
    "BuiltinOptimizerConfig",
    "LAMBConfig",
    "LARSConfig",
    "OptimizerConfig",
    "ParamGroupRule",
    "SGDConfig",
]

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]

# Descriptions of keys that several optimizers share.
_WEIGHT_DECAY = "weight decay λ"
_MOMENTUM = "momentum μ"
_NESTEROV = "Nesterov momentum (needs momentum > 0)"
_FOREACH = "multi-tensor path; null: the faster path for the device"
_TRUST_CLIP = "LARC: effective lr = min(lr, trust ratio)"
_BETAS = "Adam's moment decays"
_EPS = "added to Adam's denominator"


class ParamGroupRule(BaseModel):
    """Settings for the parameters matched by ``match``; the first matching rule wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: list[str] = Field(min_length=1, description="patterns of the parameters it applies to")
    lr_scale: float = Field(1.0, ge=0.0, description="multiplies the scheduled lr")
    weight_decay: float | None = Field(
        None, ge=0.0, description="replaces the optimizer's weight decay (null: keep it)"
    )


class OptimizerConfig(BaseModel):
    """Keys every optimizer shares; subclasses fix ``name`` to a literal and add their own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="the registered optimizer")
    lr: float = Field(ge=0.0, description="base learning rate (the schedule scales it)")
    weight_decay: float = Field(0.0, ge=0.0, description=_WEIGHT_DECAY)
    exclude_from_weight_decay: list[str] = Field(
        default_factory=list, description="patterns of parameters without weight decay"
    )
    param_groups: list[ParamGroupRule] = Field(
        default_factory=list,
        description="ordered rules; the first that matches a parameter sets its lr scale "
        "and weight decay",
    )


class LARSConfig(OptimizerConfig):
    """LARS; the defaults are the original minerva LARS."""

    name: Literal["lars"] = Field("lars", description="selects this optimizer")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description=_MOMENTUM)
    weight_decay: float = Field(1e-6, ge=0.0, description=_WEIGHT_DECAY)
    eta: float = Field(0.001, gt=0.0, description="trust coefficient η of the layer-wise ratio")
    epsilon: float = Field(1e-8, ge=0.0, description="added to the ratio's denominator")
    exclude_from_layer_adaptation: list[str] = Field(
        default_factory=list, description="patterns of parameters updated with ratio 1"
    )
    trust_clip: bool = Field(False, description=_TRUST_CLIP)
    nesterov: bool = Field(False, description=_NESTEROV)
    foreach: bool | None = Field(None, description=_FOREACH)
    fused: bool = Field(False, description="compile the update with `torch.compile`")

    @model_validator(mode="after")
    def _consistent(self) -> LARSConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        if self.fused and self.foreach:
            raise ValueError("fused and foreach cannot both be true")
        return self


class SGDConfig(OptimizerConfig):
    """``torch.optim.SGD``."""

    name: Literal["sgd"] = Field("sgd", description="selects this optimizer")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description=_MOMENTUM)
    dampening: float = Field(0.0, ge=0.0, lt=1.0, description="dampening of the momentum")
    nesterov: bool = Field(False, description=_NESTEROV)
    foreach: bool | None = Field(None, description=_FOREACH)

    @model_validator(mode="after")
    def _consistent(self) -> SGDConfig:
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0")
        return self


class AdamWConfig(OptimizerConfig):
    """``torch.optim.AdamW``."""

    name: Literal["adamw"] = Field("adamw", description="selects this optimizer")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description=_BETAS)
    eps: float = Field(1e-8, gt=0.0, description=_EPS)
    weight_decay: float = Field(0.01, ge=0.0, description=_WEIGHT_DECAY)
    foreach: bool | None = Field(None, description=_FOREACH)


class LAMBConfig(OptimizerConfig):
    """timm's LAMB (layer-wise adaptive moments)."""

    name: Literal["lamb"] = Field("lamb", description="selects this optimizer")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description=_BETAS)
    eps: float = Field(1e-6, gt=0.0, description=_EPS)
    weight_decay: float = Field(0.01, ge=0.0, description=_WEIGHT_DECAY)
    trust_clip: bool = Field(False, description=_TRUST_CLIP)
    always_adapt: bool = Field(False, description="adapt parameters without weight decay too")


BuiltinOptimizerConfig = Annotated[
    Union[LARSConfig, SGDConfig, AdamWConfig, LAMBConfig],  # noqa: UP007
    Field(discriminator="name"),
]
"""The built-in configs as a union discriminated by ``name`` (for typing and JSON schema)."""
