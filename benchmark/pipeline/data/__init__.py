"""Datasets: registry entries that build a pool of captioned images.

The built-ins (scenes, folder) and third-party datasets are found through the
`benchmark.datasets` entry-point group on the registry's first use.
"""

from benchmark.pipeline.data.base import DATASETS, DatasetError, DatasetSpec, ImageTextDataset, register_dataset

__all__ = ["DATASETS", "DatasetError", "DatasetSpec", "ImageTextDataset", "register_dataset"]
