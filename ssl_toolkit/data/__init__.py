"""Datasets, batch loaders and batched two-view augmentations for self-supervised pretraining."""

from ssl_toolkit.data.augment import (
    BYOLAugment,
    SimCLRAugment,
    TwoViewAugment,
    ViewParams,
    ViewPolicy,
)
from ssl_toolkit.data.datasets import (
    DATASET_NAMES,
    DatasetName,
    DatasetNotFoundError,
    InMemoryImageDataset,
    build_dataset,
    stratified_split,
)
from ssl_toolkit.data.loader import EpochBatchSampler, TensorBatchLoader, build_loader

__all__ = [
    "DATASET_NAMES",
    "BYOLAugment",
    "DatasetName",
    "DatasetNotFoundError",
    "EpochBatchSampler",
    "InMemoryImageDataset",
    "SimCLRAugment",
    "TensorBatchLoader",
    "TwoViewAugment",
    "ViewParams",
    "ViewPolicy",
    "build_dataset",
    "build_loader",
    "stratified_split",
]
