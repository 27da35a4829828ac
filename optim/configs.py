"""Validated optimizer configurations: one Pydantic model per optimizer, tagged by ``name``.

Every model forbids unknown keys, so a typo in YAML fails loudly instead of being ignored,
and refuses a number that is not finite or is a boolean, so that ``lr: inf`` or ``lr: true``
fails before training rather than during it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import short_repr

__all__ = [
    "AdamWConfig",
    "BuiltinOptimizerConfig",
    "ClipGradConfig",
    "ConfigModel",
    "FreezeConfig",
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


def _leaf_types(annotation: Any) -> set[Any]:
    """The types ``annotation`` admits, through Optional, Union, containers and Annotated."""
    if get_origin(annotation) is Annotated:
        return _leaf_types(get_args(annotation)[0])
    args = get_args(annotation)
    return set().union(*map(_leaf_types, args)) if args else {annotation}


class ConfigModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are frozen, and a number is
    finite and never a boolean (pydantic would read ``inf`` as a float and ``true`` as 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        types = _leaf_types(cls.model_fields[info.field_name].annotation)
        items = value if isinstance(value, (list, tuple)) else [value]
        if types & {int, float} and bool not in types and any(isinstance(v, bool) for v in items):
            raise ValueError(f"a boolean is not a number (got {short_repr(value)})")
        return value


class ParamGroupRule(ConfigModel):
    """Settings for the parameters matched by ``match``; the first matching rule wins."""

    match: list[str] = Field(min_length=1, description="patterns of the parameters it applies to")
    lr_scale: float = Field(1.0, ge=0.0, description="multiplies the scheduled lr")
    weight_decay: float | None = Field(
        None, ge=0.0, description="replaces the optimizer's weight decay (null: keep it)"
    )


class ClipGradConfig(ConfigModel):
    """Gradient clipping before every step, on the device (after a GradScaler's unscale)."""

    max_norm: float = Field(gt=0.0, description="largest gradient norm kept")
    per_parameter: bool = Field(
        False,
        description="clip each parameter's gradient to `max_norm` (DINO's `clip_gradients`); "
        "false: the norm of all gradients together (`torch.nn.utils.clip_grad_norm_`)",
    )


class FreezeConfig(ConfigModel):
    """Parameters left untouched, optimizer state included, for the first steps."""

    params: list[str] = Field(
        min_length=1, description="patterns of the parameters frozen (the rules' syntax)"
    )
    steps: int = Field(ge=1, description="optimizer steps during which they stay frozen")


class OptimizerConfig(ConfigModel):
    """Keys every optimizer shares; subclasses fix ``name`` to a literal and add their own."""

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
    clip_grad: ClipGradConfig | None = Field(
        None, description="clip gradients before each step (null: never)"
    )
    freeze: FreezeConfig | None = Field(
        None, description="freeze parameters for the first steps (null: none)"
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
    trust_ratio: Literal["original", "update"] = Field(
        "original",
        description="original: η‖w‖/(‖g‖ + λ‖w‖ + ε); update: η‖w‖/‖g + λw‖ (SimCLR, BYOL, "
        "Barlow Twins, VICReg, MoCo v3)",
    )
    lr_in_buffer: bool = Field(
        True,
        description="lr inside the momentum buffer (original, SimCLR); false: p -= lr·buf "
        "(BYOL, Barlow Twins, VICReg, MoCo v3)",
    )
    foreach: bool | None = Field(None, description=_FOREACH)
    fused: bool = Field(False, description="compile the update with `torch.compile`")
    unscale_in_step: bool = Field(
        True,
        description="under a GradScaler, unscale and skip overflow steps inside `step()`, "
        "with no host sync; false: the scaler unscales first, as a trainer that clips "
        "gradients itself needs (Lightning's `gradient_clip_val`)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> LARSConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        # Compared with the default, not with the keys set: a resolved config lists them all.
        if (
            self.trust_ratio == "update"
            and self.epsilon != type(self).model_fields["epsilon"].default
        ):
            raise ValueError(
                "epsilon is part of the original trust ratio only; trust_ratio: update has none"
            )
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
