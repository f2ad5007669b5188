"""What every dataset provides: ids, captions and images at a requested resolution."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from benchmark.kernel.errors import BenchmarkError
from benchmark.kernel.registry import Registry


class DatasetError(BenchmarkError, ValueError):
    """A dataset that cannot be used; the message names the problem and the fix."""


class ImageTextDataset(Protocol):
    """A pool of captioned images. Members and non-members are both drawn from it.

    A dataset may also offer `owner_pool` (a sequence of indices): the domain the
    owner's data comes from, when the public split is broader (see `make_splits`).
    """

    name: str

    def __len__(self) -> int: ...

    @property
    def ids(self) -> Sequence[str]: ...

    def caption(self, index: int) -> str: ...

    def image(self, index: int) -> np.ndarray:
        """HxWx3 float32 in [0, 1] at the dataset's resolution."""
        ...

    def describe(self) -> dict[str, object]:
        """Resolved configuration, recorded with every result."""
        ...


@dataclass(frozen=True)
class DatasetSpec:
    """How to build a dataset: the registry entry's inputs."""

    name: str
    resolution: int
    path: Path | None = None
    size: int | None = None


DatasetBuilder = Callable[[DatasetSpec], ImageTextDataset]
DATASETS: Registry[DatasetBuilder] = Registry("dataset", entry_point_group="benchmark.datasets")


def register_dataset(name: str, **capabilities: Any) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Register a dataset builder; `check=fn(spec)` validates a `DatasetSpec` before any work.

    The check runs in `RunConfig.validate()`, before any data is read or model trained:
    it should be cheap and raise `ConfigError` naming the flag to pass.
    """
    return DATASETS.register(name, **capabilities)


def build_dataset(spec: DatasetSpec) -> ImageTextDataset:
    return DATASETS.get(spec.name)(spec)


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """HxWx3 [0,1] arrays -> NCHW tensor in [-1, 1], the range diffusion models train on."""
    stacked = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).mul(2.0).sub(1.0).contiguous()


def tensor_to_images(tensor: torch.Tensor) -> np.ndarray:
    """NCHW [-1,1] -> NxHxWx3 float32 [0,1]."""
    return tensor.detach().float().clamp(-1, 1).add(1).div(2).permute(0, 2, 3, 1).cpu().numpy()
