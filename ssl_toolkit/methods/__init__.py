"""Self-supervised methods behind a registry, one file per method.

``register_method(name, config_cls)`` decorates a :class:`Method` subclass; ``list_methods()``
and ``get_method(name)`` look them up; other packages add methods through the entry-point group
``ssl_toolkit.methods``. Built in (registered by importing their modules here): ``simclr``,
``byol``, ``barlow_twins``, ``vicreg``, ``mocov3``, ``swav`` and ``dino``; their losses are
plain functions of tensors (``nt_xent``, ``byol_loss``, ``barlow_twins_loss``,
``vicreg_loss``, ``moco_v3_loss``, ``swav_loss`` with ``sinkhorn``, and ``dino_loss``) with
the papers' coefficients as keyword defaults. A method is two steps,
``embed(views) -> embeddings`` and ``loss(embeddings) -> Tensor``
(see :mod:`ssl_toolkit.methods.base`).
"""

from .barlow_twins import BarlowTwins, BarlowTwinsConfig, barlow_twins_loss
from .base import (
    Embeddings,
    HeadConfig,
    Method,
    MethodConfig,
    at_least_fp32,
    scale_gradient,
    two_views,
)
from .byol import BYOL, BYOLConfig, byol_loss, cosine_tau
from .dino import DINO, DINOConfig, dino_loss, teacher_temperature, updated_center
from .mocov3 import MoCoV3, MoCoV3Config, moco_v3_loss
from .registry import (
    METHODS,
    build_method,
    get_method,
    list_methods,
    parse_method_config,
    register_method,
)
from .simclr import SimCLR, SimCLRConfig, nt_xent
from .swav import SwAV, SwAVConfig, sinkhorn, swav_loss
from .vicreg import VICReg, VICRegConfig, vicreg_loss

__all__ = [
    "BYOL",
    "DINO",
    "METHODS",
    "BYOLConfig",
    "BarlowTwins",
    "BarlowTwinsConfig",
    "DINOConfig",
    "Embeddings",
    "HeadConfig",
    "Method",
    "MethodConfig",
    "MoCoV3",
    "MoCoV3Config",
    "SimCLR",
    "SimCLRConfig",
    "SwAV",
    "SwAVConfig",
    "VICReg",
    "VICRegConfig",
    "at_least_fp32",
    "barlow_twins_loss",
    "build_method",
    "byol_loss",
    "cosine_tau",
    "dino_loss",
    "get_method",
    "list_methods",
    "moco_v3_loss",
    "nt_xent",
    "parse_method_config",
    "register_method",
    "scale_gradient",
    "sinkhorn",
    "swav_loss",
    "teacher_temperature",
    "two_views",
    "updated_center",
    "vicreg_loss",
]
