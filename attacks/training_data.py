"""Data an attack component may train on (public split, attacker's auxiliary data).

The attack package never sees the dataset or the split code: the runner hands it
images and captions through this small, lazily loaded container, together with a
fingerprint (dataset description and ids) that keys the component's cache entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class TrainingData:
    """Captioned images, loaded on first use.

    Attributes:
        fingerprint: everything that determines the data (dataset description, ids);
            it keys the cache entry of whatever is trained on the data.
        loader: returns (N, H, W, 3) float32 images in [0, 1] and N captions.
    """

    fingerprint: dict[str, object]
    loader: Callable[[], tuple[np.ndarray, list[str]]] = field(repr=False, compare=False)

    @cached_property
    def loaded(self) -> tuple[np.ndarray, list[str]]:
        """(images, captions), validated; loaded once."""
        images, captions = self.loader()
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"training images must be (N, H, W, 3), got {images.shape}")
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} training images but {len(captions)} captions")
        if len(images) == 0:
            raise ValueError("no training images")
        return images, list(captions)

    @property
    def images(self) -> np.ndarray:
        return self.loaded[0]

    @property
    def captions(self) -> list[str]:
        return self.loaded[1]

    @classmethod
    def from_arrays(cls, images: np.ndarray, captions: list[str], *, name: str) -> TrainingData:
        """For tests and notebooks: the fingerprint hashes the arrays themselves."""
        import hashlib

        digest = hashlib.sha256(np.ascontiguousarray(images, dtype=np.float32).tobytes())
        digest.update("\n".join(captions).encode())
        return cls({"name": name, "sha256": digest.hexdigest()[:16]}, lambda: (images, list(captions)))
