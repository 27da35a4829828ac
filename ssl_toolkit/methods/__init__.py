"""Self-supervised methods behind a registry, one file per method.

``register_method(name, config_cls)`` decorates a :class:`Method` subclass; ``list_methods()``
and ``get_method(name)`` look them up; other packages add methods through the entry-point group
``ssl_toolkit.methods``. Built in (registered by importing their modules here): ``simclr``,
``byol`` and ``barlow_twins``. A method is two steps, ``embed(views) -> embeddings`` and
``loss(embeddings) -> Tensor`` (see :mod:`ssl_toolkit.methods.base`).
"""

from .barlow_twins import BarlowTwins, BarlowTwinsConfig
from .base import Embeddings, HeadConfig, Method, MethodConfig, at_least_fp32, two_views
from .byol import BYOL, BYOLConfig, cosine_tau
from .registry import (
    METHODS,
    build_method,
    get_method,
    list_methods,
    parse_method_config,
    register_method,
)
from .simclr import SimCLR, SimCLRConfig

__all__ = [
    "BYOL",
    "METHODS",
    "BYOLConfig",
    "BarlowTwins",
    "BarlowTwinsConfig",
    "Embeddings",
    "HeadConfig",
    "Method",
    "MethodConfig",
    "SimCLR",
    "SimCLRConfig",
    "at_least_fp32",
    "build_method",
    "cosine_tau",
    "get_method",
    "list_methods",
    "parse_method_config",
    "register_method",
    "two_views",
]
