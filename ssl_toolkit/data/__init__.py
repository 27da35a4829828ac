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
    InMemoryImageDataset,
    build_dataset,
    stratified_split,
)
from ssl_toolkit.data.folders import (
    BadImageError,
    CropViews,
    DatasetNotFoundError,
    ImageFiles,
    find_images,
)
from ssl_toolkit.data.loader import (
    EpochBatchSampler,
    TensorBatchLoader,
    WorkerBatchLoader,
    build_loader,
)

__all__ = [
    "DATASET_NAMES",
    "BYOLAugment",
    "BadImageError",
    "CropViews",
    "DatasetName",
    "DatasetNotFoundError",
    "EpochBatchSampler",
    "ImageFiles",
    "InMemoryImageDataset",
    "SimCLRAugment",
    "TensorBatchLoader",
    "TwoViewAugment",
    "ViewParams",
    "ViewPolicy",
    "WorkerBatchLoader",
    "build_dataset",
    "build_loader",
    "find_images",
    "stratified_split",
]
