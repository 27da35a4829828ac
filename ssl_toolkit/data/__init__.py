"""Datasets, batch loaders and batched multi-view augmentations for self-supervised pretraining."""

from ssl_toolkit.data.augment import (
    BYOLAugment,
    MultiCropAugment,
    SimCLRAugment,
    TwoViewAugment,
    ViewParams,
    ViewPolicy,
)
from ssl_toolkit.data.crops import CropGroup, crop_sizes
from ssl_toolkit.data.datasets import (
    DATASET_NAMES,
    DatasetName,
    InMemoryImageDataset,
    build_dataset,
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
    ShardBatchSampler,
    TensorBatchLoader,
    WorkerBatchLoader,
    build_loader,
)
from ssl_toolkit.data.shards import ShardFiles
from ssl_toolkit.data.splits import stratified_split

__all__ = [
    "DATASET_NAMES",
    "BYOLAugment",
    "BadImageError",
    "CropGroup",
    "CropViews",
    "DatasetName",
    "DatasetNotFoundError",
    "EpochBatchSampler",
    "ImageFiles",
    "InMemoryImageDataset",
    "MultiCropAugment",
    "ShardBatchSampler",
    "ShardFiles",
    "SimCLRAugment",
    "TensorBatchLoader",
    "TwoViewAugment",
    "ViewParams",
    "ViewPolicy",
    "WorkerBatchLoader",
    "build_dataset",
    "build_loader",
    "crop_sizes",
    "find_images",
    "stratified_split",
]
