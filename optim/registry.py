"""The optimizer registry: small metadata records, looked up by name, built from configs.

Other installed packages add optimizers through the entry-point group ``ssl_toolkit.optimizers``:
each entry point names a module or callable that calls ``register_optimizer`` when loaded. They
are loaded lazily, on the first lookup, so importing ``optim`` stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar

import torch
from pydantic import ValidationError
from torch import nn

from .configs import OptimizerConfig
from .errors import ConfigError, closest, from_validation_error
from .param_rules import name_parameters

__all__ = [
    "ENTRY_POINT_GROUP",
    "OptimizerEntry",
    "build_optimizer",
    "get_optimizer_config",
    "list_optimizers",
    "parse_optimizer_config",
    "register_optimizer",
]

ENTRY_POINT_GROUP = "ssl_toolkit.optimizers"

Builder = Callable[[Any, nn.Module], torch.optim.Optimizer]
"""Builds an optimizer from a validated config and the model whose parameters it optimizes."""

B = TypeVar("B", bound=Builder)


@dataclass(frozen=True)
class OptimizerEntry:
    """One registered optimizer: its name, its config model and its builder."""

    name: str
    config_cls: type[OptimizerConfig]
    builder: Builder
    description: str = ""


_REGISTRY: dict[str, OptimizerEntry] = {}
_entry_points_loaded = False


def register_optimizer(
    name: str,
    config_cls: type[OptimizerConfig],
    builder: Builder | None = None,
    *,
    description: str = "",
) -> Any:
    """Register ``builder`` under ``name``; without ``builder``, return a decorator.

    ``config_cls`` must subclass ``OptimizerConfig`` with ``name`` defaulting to ``name``.
    Registering a taken name is an error.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, OptimizerConfig)):
        raise TypeError(f"config class for {name!r} must subclass optim.OptimizerConfig")
    if config_cls.model_fields["name"].default != name:
        raise ValueError(f"{config_cls.__name__}.name must default to {name!r}")

    def register(fn: B) -> B:
        if name in _REGISTRY:
            raise ValueError(f"optimizer {name!r} is already registered")
        _REGISTRY[name] = OptimizerEntry(name, config_cls, fn, description)
        return fn

    return register if builder is None else register(builder)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry_point.load()
        if callable(loaded) and not isinstance(loaded, type):
            loaded()


def _entry(name: str, prefix: str) -> OptimizerEntry:
    _load_entry_points()
    if name not in _REGISTRY:
        near = closest(name, _REGISTRY)
        guess = f"did you mean '{near[0]}'? " if near else ""
        raise ConfigError(
            [
                f"{prefix}name: unknown optimizer {name!r}; {guess}"
                f"registered: {', '.join(sorted(_REGISTRY))}"
            ]
        )
    return _REGISTRY[name]


def list_optimizers() -> list[str]:
    """Names of every registered optimizer, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_optimizer_config(name: str) -> type[OptimizerConfig]:
    """The Pydantic config class of optimizer ``name``."""
    return _entry(name, "").config_cls


def parse_optimizer_config(
    cfg: Mapping[str, Any] | OptimizerConfig, prefix: str = "optim"
) -> OptimizerConfig:
    """Validate a mapping (e.g. the ``optim:`` block of a YAML) into its optimizer's config.

    The ``name`` key selects the config class; errors name each bad key as ``<prefix>.key``.
    """
    if isinstance(cfg, OptimizerConfig):
        return cfg
    dotted = f"{prefix}." if prefix else ""
    if not isinstance(cfg, Mapping):
        raise ConfigError([f"{prefix or 'config'}: expected a mapping, got {cfg!r}"])
    if "name" not in cfg:
        raise ConfigError([f"{dotted}name: required; one of {', '.join(list_optimizers())}"])
    entry = _entry(str(cfg["name"]), dotted)
    try:
        return entry.config_cls.model_validate(dict(cfg))
    except ValidationError as err:
        raise from_validation_error(err, entry.config_cls, prefix) from None


def build_optimizer(
    cfg: Mapping[str, Any] | OptimizerConfig, model: nn.Module
) -> torch.optim.Optimizer:
    """Build the optimizer ``cfg["name"]`` for ``model``'s trainable parameters.

    Every parameter gets ``param.param_name`` (its full name) first, so rules and LARS
    exclusions see the names they were written against.
    """
    config = parse_optimizer_config(cfg)
    name_parameters(model)
    return _REGISTRY[config.name].builder(config, model)
