"""Registries of named components built from validated configs, and the optimizer registry.

A :class:`Registry` maps names to small records (name, config class, what it builds). Other
installed packages add entries through an entry-point group: each entry point names a module or
callable that registers when loaded. Entry points load lazily, on the first lookup, so importing
a registry stays cheap. The optimizers use the group ``ssl_toolkit.optimizers``; the SSL methods
of ``ssl_toolkit`` use the same class with their own group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from .configs import OptimizerConfig
from .errors import ConfigError, closest, from_validation_error, short_repr
from .param_rules import name_parameters
from .step_hooks import install_step_hooks

__all__ = [
    "ENTRY_POINT_GROUP",
    "OPTIMIZERS",
    "Registry",
    "RegistryEntry",
    "build_optimizer",
    "get_optimizer_config",
    "list_optimizers",
    "parse_optimizer_config",
    "register_optimizer",
    "require_trainable",
]

ENTRY_POINT_GROUP = "ssl_toolkit.optimizers"
"""Where installed packages register optimizers (a module or a callable that registers)."""

Builder = Callable[[Any, nn.Module], torch.optim.Optimizer]
"""Builds an optimizer from a validated config and the model whose parameters it optimizes."""

T = TypeVar("T")


@dataclass(frozen=True)
class RegistryEntry(Generic[T]):
    """One registered component: its config model and what builds it."""

    config_cls: type[BaseModel]
    target: T


class Registry(Generic[T]):
    """Names → (config class, target), with entry-point plugins and config validation.

    ``kind`` names the component in messages ("optimizer", "method"); ``base_config`` is the
    class every registered config must subclass, with a ``name`` field defaulting to the
    registered name, which is how a mapping picks its config class.
    """

    def __init__(self, kind: str, group: str, base_config: type[BaseModel]) -> None:
        self.kind = kind
        self.group = group
        self.base_config = base_config
        self._entries: dict[str, RegistryEntry[T]] = {}
        self._entry_points_loaded = False

    def register(self, name: str, config_cls: type[BaseModel], target: T) -> T:
        """Add ``target`` under ``name``; a taken name or a mismatched config is an error."""
        if not (isinstance(config_cls, type) and issubclass(config_cls, self.base_config)):
            raise TypeError(f"config class for {name!r} must subclass {self.base_config.__name__}")
        if config_cls.model_fields["name"].default != name:
            raise ValueError(f"{config_cls.__name__}.name must default to {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = RegistryEntry(config_cls, target)
        return target

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for entry_point in entry_points(group=self.group):
            try:
                loaded = entry_point.load()
                if callable(loaded) and not isinstance(loaded, type):
                    loaded()
            except Exception as err:
                raise ConfigError(
                    [
                        f"entry point {entry_point.name!r} ({entry_point.value}) of group "
                        f"{self.group} failed to load: {type(err).__name__}: {err}"
                    ]
                ) from err

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load_entry_points()
        return sorted(self._entries)

    def entry(self, name: str, prefix: str = "") -> RegistryEntry[T]:
        """The entry of ``name``; an unknown name is a ``ConfigError`` listing the known ones."""
        self._load_entry_points()
        if name not in self._entries:
            near = closest(name, self._entries)
            guess = f"did you mean '{near[0]}'? " if near else ""
            raise ConfigError(
                [
                    f"{prefix}name: unknown {self.kind} {short_repr(name)}; {guess}"
                    f"registered: {', '.join(self.names())}"
                ]
            )
        return self._entries[name]

    def parse(self, cfg: Mapping[str, Any] | BaseModel, prefix: str) -> BaseModel:
        """Validate a mapping into the config class its ``name`` selects.

        Errors name each bad key as ``<prefix>.key``; a config object is returned as it is.
        """
        if isinstance(cfg, self.base_config):
            return cfg
        dotted = f"{prefix}." if prefix else ""
        if not isinstance(cfg, Mapping):
            raise ConfigError([f"{prefix or 'config'}: expected a mapping, got {short_repr(cfg)}"])
        if "name" not in cfg:
            raise ConfigError([f"{dotted}name: required; one of {', '.join(self.names())}"])
        entry = self.entry(str(cfg["name"]), dotted)
        try:
            return entry.config_cls.model_validate(dict(cfg))
        except ValidationError as err:
            raise from_validation_error(err, entry.config_cls, prefix) from None


OPTIMIZERS: Registry[Builder] = Registry("optimizer", ENTRY_POINT_GROUP, OptimizerConfig)
"""Every registered optimizer; use the functions below rather than this object."""

B = TypeVar("B", bound=Builder)


def register_optimizer(
    name: str, config_cls: type[OptimizerConfig], builder: Builder | None = None
) -> Any:
    """Register ``builder`` under ``name``; without ``builder``, return a decorator.

    ``config_cls`` must subclass ``OptimizerConfig`` with ``name`` defaulting to ``name``.
    Registering a taken name is an error.
    """

    def register(fn: B) -> B:
        return OPTIMIZERS.register(name, config_cls, fn)

    return register if builder is None else register(builder)


def list_optimizers() -> list[str]:
    """Names of every registered optimizer, sorted."""
    return OPTIMIZERS.names()


def get_optimizer_config(name: str) -> type[OptimizerConfig]:
    """The Pydantic config class of optimizer ``name``."""
    return OPTIMIZERS.entry(name).config_cls


def parse_optimizer_config(
    cfg: Mapping[str, Any] | OptimizerConfig, prefix: str = "optim"
) -> OptimizerConfig:
    """Validate a mapping (e.g. the ``optim:`` block of a YAML) into its optimizer's config.

    The ``name`` key selects the config class; errors name each bad key as ``<prefix>.key``.
    """
    return OPTIMIZERS.parse(cfg, prefix)


def require_trainable(model: nn.Module) -> None:
    """Raise :class:`ConfigError` when ``model`` has no parameter to train (none at all, or
    all frozen): torch would say only "optimizer got an empty parameter list", and DDP fails
    on it with a traceback before any optimizer is built."""
    params = list(model.parameters())
    if not any(param.requires_grad for param in params):
        frozen = f"all {len(params)} are frozen"
        what = f"no trainable parameters ({frozen})" if params else "no parameters"
        raise ConfigError([f"optim: the model has {what}"])


def build_optimizer(
    cfg: Mapping[str, Any] | OptimizerConfig, model: nn.Module
) -> torch.optim.Optimizer:
    """Build the optimizer ``cfg["name"]`` for ``model``'s trainable parameters.

    Every parameter gets ``param.param_name`` (its full name) first, so rules and LARS
    exclusions see the names they were written against. ``clip_grad`` and ``freeze`` become
    step pre-hooks (:mod:`optim.step_hooks`), so they hold for any optimizer and any trainer.
    A model with nothing to train is a ``ConfigError`` (torch would say only "optimizer got an
    empty parameter list").
    """
    config = parse_optimizer_config(cfg)
    require_trainable(model)
    name_parameters(model)
    optimizer = OPTIMIZERS.entry(config.name).target(config, model)
    install_step_hooks(optimizer, config)
    return optimizer
