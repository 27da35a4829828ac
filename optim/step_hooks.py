"""What runs before every optimizer step, for any registered optimizer: gradient clipping
(``clip_grad``) and freezing (``freeze``).

Both are ``Optimizer.register_step_pre_hook`` hooks, so they run inside ``step()`` however a
trainer calls it (the toolkit's, Lightning's, a plain loop). Under a GradScaler they see the
gradients unscaled: the scaler unscales before ``step()`` for an optimizer that cannot, and an
optimizer that unscales in its step (LARS) hands the clip its ``grad_scale``. Neither reads a
tensor's value on the host.
"""

from __future__ import annotations

from typing import Any

import torch

from .clip_grad import clip_grad_norms_
from .configs import ClipGradConfig, OptimizerConfig
from .errors import ConfigError

__all__ = ["ClipGradients", "FreezeParameters", "install_step_hooks"]


class ClipGradients:
    """Clip every gradient the optimizer holds to ``max_norm`` before it steps."""

    def __init__(self, config: ClipGradConfig) -> None:
        self.max_norm = config.max_norm
        self.per_parameter = config.per_parameter

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # Set by a GradScaler only for an optimizer that unscales inside its step.
        grad_scale = getattr(optimizer, "grad_scale", None)
        clip_grad_norms_(
            grads, self.max_norm, per_parameter=self.per_parameter, grad_scale=grad_scale
        )


class FreezeParameters:
    """Drop the gradients of the groups whose ``frozen_steps`` has not run out, and count it
    down: the optimizer then skips those parameters, leaving their state untouched (DINO's
    ``cancel_gradients_last_layer``). The count lives in the param groups, so it is saved
    and restored with the optimizer's state."""

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            left = group.get("frozen_steps", 0)
            if left > 0:
                for param in group["params"]:
                    param.grad = None
                group["frozen_steps"] = left - 1


def install_step_hooks(optimizer: torch.optim.Optimizer, config: OptimizerConfig) -> None:
    """Register the hooks ``config`` asks for: clipping first, then freezing (DINO's order).

    A ``freeze`` whose parameters the optimizer's builder did not put in counted groups
    (``optim.param_rules.group_params`` does) is a ``ConfigError``.
    """
    if config.clip_grad is not None:
        optimizer.register_step_pre_hook(ClipGradients(config.clip_grad))
    if config.freeze is not None:
        if not any(group.get("frozen_steps") for group in optimizer.param_groups):
            raise ConfigError(
                [
                    f"optim.freeze: optimizer {config.name!r} builds its param groups itself "
                    "and has no frozen group (build them with optim.param_rules.group_params)"
                ]
            )
        optimizer.register_step_pre_hook(FreezeParameters())
