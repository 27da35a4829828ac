"""Config-driven optimizer registry with an exact, sync-free LARS.

Usable alone by other projects::

    from optim import build_optimizer
    optimizer = build_optimizer({"name": "lars", "lr": 0.3, "exclude_from_layer_adaptation":
                                 ["@norm", "@bias"]}, model)
"""

from . import builtin as _builtin  # noqa: F401  (registers lars, sgd, adamw, lamb)
from .clip_grad import clip_grad_norms_
from .configs import (
    AdamWConfig,
    BuiltinOptimizerConfig,
    ClipGradConfig,
    FreezeConfig,
    LAMBConfig,
    LARSConfig,
    OptimizerConfig,
    ParamGroupRule,
    SGDConfig,
)
from .errors import ConfigError
from .lars import LARS, lars
from .param_rules import ParamRow, name_parameters, render_param_table, resolve_params
from .registry import (
    build_optimizer,
    get_optimizer_config,
    list_optimizers,
    parse_optimizer_config,
    register_optimizer,
    require_trainable,
)
from .schedules import cosine_ramp, scale_lr, set_hyperparameter, set_lr, warmup_cosine

__all__ = [
    "LARS",
    "AdamWConfig",
    "BuiltinOptimizerConfig",
    "ClipGradConfig",
    "ConfigError",
    "FreezeConfig",
    "LAMBConfig",
    "LARSConfig",
    "OptimizerConfig",
    "ParamGroupRule",
    "ParamRow",
    "SGDConfig",
    "build_optimizer",
    "clip_grad_norms_",
    "cosine_ramp",
    "get_optimizer_config",
    "lars",
    "list_optimizers",
    "name_parameters",
    "parse_optimizer_config",
    "register_optimizer",
    "render_param_table",
    "require_trainable",
    "resolve_params",
    "scale_lr",
    "set_hyperparameter",
    "set_lr",
    "warmup_cosine",
]
