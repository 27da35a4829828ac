"""Backbones and MLP heads for self-supervised pretraining (independent of ``ssl_toolkit``)."""

from models.backbones import build_backbone, check_backbone_name, list_backbones
from models.heads import DINOHead, PredictionHead, ProjectionHead

__all__ = [
    "DINOHead",
    "PredictionHead",
    "ProjectionHead",
    "build_backbone",
    "check_backbone_name",
    "list_backbones",
]
