"""The built-in optimizers: LARS, and torch's SGD and AdamW and timm's LAMB for comparison."""

from __future__ import annotations

import torch
from timm.optim import Lamb
from torch import nn

from .configs import AdamWConfig, LAMBConfig, LARSConfig, OptimizerConfig, SGDConfig
from .lars import LARS
from .param_rules import group_params, resolve_params
from .registry import register_optimizer

__all__: list[str] = []


def _decay_groups(config: OptimizerConfig, model: nn.Module) -> list[dict[str, object]]:
    """Param groups split by effective weight decay and lr scale."""
    rows = resolve_params(model, config)
    return group_params(
        model,
        rows,
        config.lr,
        key=lambda row: {
            "weight_decay": row.weight_decay,
            "weight_decay_scale": row.weight_decay_scale,
        },
    )


@register_optimizer("lars", LARSConfig)
def build_lars(config: LARSConfig, model: nn.Module) -> LARS:
    """LARS with the config's rules.

    A group keeps its weight decay for the trust ratio (and a schedule scales it with the
    group's ``weight_decay_scale``); parameters excluded from decay or from adaptation are passed
    by name, so exclusions never split a group (one multi-tensor bucket per device and dtype)
    and their update drops the term exactly as ``LARS`` documents.
    """
    rows = resolve_params(model, config)
    groups = group_params(
        model,
        rows,
        config.lr,
        key=lambda row: {
            "weight_decay": row.group_weight_decay,
            "weight_decay_scale": row.decay_scale,
        },
    )
    return LARS(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        eta=config.eta,
        epsilon=config.epsilon,
        exclude_from_layer_adaptation={row.name for row in rows if not row.adapted},
        exclude_from_weight_decay={
            row.name for row in rows if row.weight_decay != row.group_weight_decay
        },
        trust_clip=config.trust_clip,
        nesterov=config.nesterov,
        trust_ratio=config.trust_ratio,
        lr_in_buffer=config.lr_in_buffer,
        foreach=config.foreach,
        fused=config.fused,
        unscale_in_step=config.unscale_in_step,
    )


@register_optimizer("sgd", SGDConfig)
def build_sgd(config: SGDConfig, model: nn.Module) -> torch.optim.SGD:
    """SGD with momentum and the config's rules."""
    return torch.optim.SGD(
        _decay_groups(config, model),
        lr=config.lr,
        momentum=config.momentum,
        dampening=config.dampening,
        nesterov=config.nesterov,
        foreach=config.foreach,
    )


@register_optimizer("adamw", AdamWConfig)
def build_adamw(config: AdamWConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW with the config's rules."""
    return torch.optim.AdamW(
        _decay_groups(config, model),
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        foreach=config.foreach,
    )


@register_optimizer("lamb", LAMBConfig)
def build_lamb(config: LAMBConfig, model: nn.Module) -> Lamb:
    """LAMB with the config's rules."""
    return Lamb(
        _decay_groups(config, model),
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        trust_clip=config.trust_clip,
        always_adapt=config.always_adapt,
    )
