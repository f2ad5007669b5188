"""Image encoders: map images to patch embeddings the similarity is computed on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from benchmark.registry import Registry


class ImageEncoder(Protocol):
    name: str

    def embed(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) images in [0, 1] -> (N, patches, dim) embeddings."""
        ...

    def describe(self) -> dict[str, object]: ...


ENCODERS: Registry[Callable[[], ImageEncoder]] = Registry("encoder")


def register_encoder(name: str) -> Callable[[Callable[[], ImageEncoder]], Callable[[], ImageEncoder]]:
    return ENCODERS.register(name)


@dataclass
class PixelEncoder:
    """Raw pixels, average-pooled, each image centred on its own mean colour.

    Pooling removes sampling noise finer than the detail a model memorises;
    centring stops the (captioned) overall colour from dominating the similarity.
    """

    pool: int = 2
    name: str = "pixels"

    def embed(self, images: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        x = x.flatten(1)
        return (x - x.mean(dim=1, keepdim=True)).unsqueeze(1)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "pool": self.pool, "centred": True, "patches": 1}


@register_encoder("pixels")
def build_pixel_encoder() -> ImageEncoder:
    """Average-pooled, mean-centred raw pixels (no network)."""
    return PixelEncoder()
