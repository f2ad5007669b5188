"""Datasets: registry entries that build a pool of captioned images."""

from benchmark.pipeline.data import folder, scenes  # noqa: F401  (register the built-in datasets)
from benchmark.pipeline.data.base import DATASETS, DatasetError, DatasetSpec, ImageTextDataset, register_dataset

__all__ = ["DATASETS", "DatasetError", "DatasetSpec", "ImageTextDataset", "register_dataset"]
