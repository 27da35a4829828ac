"""The method registry: SSL methods by name, their configs validated by it.

The same design as the optimizer registry: ``register_method(name, config_cls)`` decorates a
:class:`~ssl_toolkit.methods.base.Method` subclass, and other installed packages add methods
through the entry-point group ``ssl_toolkit.methods`` (a module that registers on import, or a
callable that registers when called), loaded on the first lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from models import build_backbone
from optim import ConfigError
from optim.registry import Registry

from .base import Method, MethodConfig

__all__ = [
    "ENTRY_POINT_GROUP",
    "METHODS",
    "build_method",
    "get_method",
    "list_methods",
    "parse_method_config",
    "register_method",
]

ENTRY_POINT_GROUP = "ssl_toolkit.methods"
"""Where installed packages register methods (a module or a callable that registers)."""

METHODS: Registry[type[Method]] = Registry("method", ENTRY_POINT_GROUP, MethodConfig)
"""Every registered method; use the functions below rather than this object."""

_M = TypeVar("_M", bound=type[Method])


def register_method(name: str, config_cls: type[MethodConfig]) -> Callable[[_M], _M]:
    """Class decorator: register a ``Method`` subclass under ``name`` with its config class.

    ``config_cls`` must subclass ``MethodConfig`` with ``name`` defaulting to ``name``.
    Registering a taken name is an error.
    """

    def register(cls: _M) -> _M:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"method {name!r} must subclass ssl_toolkit.methods.Method")
        return METHODS.register(name, config_cls, cls)

    return register


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return METHODS.names()


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; an unknown name is a ``ConfigError``."""
    return METHODS.entry(name, "method.").target


def parse_method_config(
    cfg: Mapping[str, Any] | MethodConfig, prefix: str = "method"
) -> MethodConfig:
    """Validate a mapping (the ``method:`` block of a YAML) into its method's config."""
    return METHODS.parse(cfg, prefix)


def build_method(
    config: MethodConfig,
    backbone: str,
    *,
    cifar_stem: bool = False,
    zero_init_residual: bool = False,
    **backbone_kwargs: Any,
) -> Method:
    """The method of ``config`` on a fresh ``backbone`` (a name ``models.build_backbone``
    takes, with its ``cifar_stem``, ``zero_init_residual`` and constructor keywords such as a
    timm model's ``drop_path_rate``), its loss and gradient scaled as ``config`` says."""
    try:
        network = build_backbone(
            backbone,
            cifar_stem=cifar_stem,
            zero_init_residual=zero_init_residual,
            **backbone_kwargs,
        )
    except (ValueError, TypeError) as err:  # cifar_stem without a ResNet stem, a bad keyword
        raise ConfigError([f"model: {err}"]) from None
    method = get_method(config.name).build(config, network)
    method.loss_scale, method.gradient_scale = config.loss_scale, config.gradient_scale
    return method
