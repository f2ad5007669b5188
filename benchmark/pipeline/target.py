"""The black-box interface: the only handle an attack ever gets on a model.

Captions (and, where the provider offers image-to-image access, images) go in,
generated images come out, and every query is counted. The model itself lives in a closure created by
`benchmark.pipeline.models.diffusion.black_box`; the object carries no weights, losses or labels, and
the attack package is checked by a test never to reach past this interface.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    """How the provider samples images for a query (paper: 30 DDIM steps, guidance 7.5)."""

    num_inference_steps: int = field(default=20, metadata={"help": "DDIM steps per generation", "min": 1})
    guidance_scale: float = field(default=1.0, metadata={"help": "classifier-free guidance scale (1: none)", "min": 0})
    batch_size: int = field(default=256, metadata={"help": "images per call to the model when sampling", "min": 1})

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


GenerateFn = Callable[[list[str], int], np.ndarray]
# (images (N, H, W, 3) in [0, 1], captions, strength, seed) -> (N, H, W, 3) in [0, 1]
Img2ImgFn = Callable[[np.ndarray, list[str], float, int], np.ndarray]


class BlackBoxTarget:
    """Text in (or image + text in, where img2img is offered), images out, queries counted."""

    __slots__ = ("_generate", "_img2img", "_queries", "_images", "_seconds", "name")

    def __init__(self, generate_fn: GenerateFn, *, name: str, img2img_fn: Img2ImgFn | None = None) -> None:
        self._generate = generate_fn
        self._img2img = img2img_fn
        self._queries = 0
        self._images = 0
        self._seconds = 0.0
        self.name = name

    def generate(self, captions: Sequence[str], *, num_images: int, seed: int) -> np.ndarray:
        """Generate `num_images` images per caption.

        Returns:
            float32 array (len(captions), num_images, H, W, 3) in [0, 1].
        """
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        captions = [str(c) for c in captions]
        flat = [c for c in captions for _ in range(num_images)]
        start = time.perf_counter()
        images = self._generate(flat, seed)
        self._seconds += time.perf_counter() - start
        self._queries += len(captions)
        self._images += len(flat)
        return images.reshape(len(captions), num_images, *images.shape[1:])

    def img2img(
        self, images: np.ndarray, captions: Sequence[str], *, strength: float, num_images: int, seed: int
    ) -> np.ndarray:
        """Noise each image to `strength` and denoise it with its caption, `num_images` times.

        One (image, caption) pair is one query, counted as in `generate`.

        Returns:
            float32 array (len(captions), num_images, H, W, 3) in [0, 1].

        Raises:
            PermissionError: this provider offers no image-to-image access.
        """
        if self._img2img is None:
            raise PermissionError(f"target {self.name!r} offers no image-to-image access")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        images = np.asarray(images, dtype=np.float32)
        captions = [str(c) for c in captions]
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        flat_images = np.repeat(images, num_images, axis=0)
        flat = [c for c in captions for _ in range(num_images)]
        start = time.perf_counter()
        out = self._img2img(flat_images, flat, float(strength), seed)
        self._seconds += time.perf_counter() - start
        self._queries += len(captions)
        self._images += len(flat)
        return out.reshape(len(captions), num_images, *out.shape[1:])

    @property
    def offers_img2img(self) -> bool:
        return self._img2img is not None

    @property
    def query_count(self) -> int:
        """Captions submitted so far (one query may ask for several images)."""
        return self._queries

    @property
    def images_generated(self) -> int:
        return self._images

    @property
    def seconds_generating(self) -> float:
        """Wall time spent inside the model (for images-per-second and cost figures)."""
        return self._seconds

    def __repr__(self) -> str:
        return f"BlackBoxTarget({self.name!r}, queries={self._queries}, images={self._images})"
