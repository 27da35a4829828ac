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


class ParamGroupRule(BaseModel):
    """Settings for the parameters matched by ``match``; the first matching rule wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: list[str] = Field(min_length=1)
    lr_scale: float = Field(1.0, ge=0.0)
    weight_decay: float | None = Field(None, ge=0.0)


class OptimizerConfig(BaseModel):
    """Keys every optimizer shares; subclasses fix ``name`` to a literal and add their own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    lr: float = Field(ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    exclude_from_weight_decay: list[str] = Field(default_factory=list)
    param_groups: list[ParamGroupRule] = Field(default_factory=list)


class LARSConfig(OptimizerConfig):
    """LARS; the defaults are the original minerva LARS."""

    name: Literal["lars"] = "lars"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-6, ge=0.0)
    eta: float = Field(0.001, gt=0.0)
    epsilon: float = Field(1e-8, ge=0.0)
    exclude_from_layer_adaptation: list[str] = Field(default_factory=list)
    trust_clip: bool = False
    nesterov: bool = False
    foreach: bool | None = None
    fused: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> LARSConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        if self.fused and self.foreach:
            raise ValueError("fused and foreach cannot both be true")
        return self


class SGDConfig(OptimizerConfig):
    """``torch.optim.SGD``."""

    name: Literal["sgd"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    dampening: float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    foreach: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SGDConfig:
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0")
        return self


class AdamWConfig(OptimizerConfig):
    """``torch.optim.AdamW``."""

    name: Literal["adamw"] = "adamw"
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    foreach: bool | None = None


class LAMBConfig(OptimizerConfig):
    """timm's LAMB (layer-wise adaptive moments)."""

    name: Literal["lamb"] = "lamb"
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: float = Field(1e-6, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    trust_clip: bool = False
    always_adapt: bool = False


BuiltinOptimizerConfig = Annotated[
    Union[LARSConfig, SGDConfig, AdamWConfig, LAMBConfig],  # noqa: UP007
    Field(discriminator="name"),
]
"""The built-in configs as a union discriminated by ``name`` (for typing and JSON schema)."""
