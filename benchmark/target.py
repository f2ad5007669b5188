"""The black-box interface: the only handle an attack ever gets on a model.

Captions (and, where a scenario allows, images) go in, generated images come out,
and every query is counted. The model itself lives in a closure created by
`BlackBoxTarget.from_model`; the object carries no weights, losses or labels, and
the attack package is checked by a test never to reach past this interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from benchmark.data.base import tensor_to_images


@dataclass(frozen=True)
class SamplingConfig:
    """How the provider samples images for a query (paper: 30 DDIM steps, guidance 7.5)."""

    num_inference_steps: int = 20
    guidance_scale: float = 1.0
    batch_size: int = 256

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


GenerateFn = Callable[[list[str], int], np.ndarray]


class BlackBoxTarget:
    """Text in, images out, queries counted."""

    __slots__ = ("_generate", "_queries", "_images", "name")

    def __init__(self, generate_fn: GenerateFn, *, name: str) -> None:
        self._generate = generate_fn
        self._queries = 0
        self._images = 0
        self.name = name

    @classmethod
    def from_model(cls, model: object, sampling: SamplingConfig, *, name: str) -> BlackBoxTarget:
        from benchmark.models.diffusion import DiffusionModel, generate

        if not isinstance(model, DiffusionModel):
            raise TypeError(f"expected a DiffusionModel, got {type(model).__name__}")

        def generate_fn(captions: list[str], seed: int) -> np.ndarray:
            images = generate(
                model,
                captions,
                seed=seed,
                num_inference_steps=sampling.num_inference_steps,
                guidance_scale=sampling.guidance_scale,
                batch_size=sampling.batch_size,
            )
            return tensor_to_images(images)

        return cls(generate_fn, name=name)

    def generate(self, captions: Sequence[str], *, num_images: int, seed: int) -> np.ndarray:
        """Generate `num_images` images per caption.

        Returns:
            float32 array (len(captions), num_images, H, W, 3) in [0, 1].
        """
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        captions = [str(c) for c in captions]
        flat = [c for c in captions for _ in range(num_images)]
        images = self._generate(flat, seed)
        self._queries += len(captions)
        self._images += len(flat)
        return images.reshape(len(captions), num_images, *images.shape[1:])

    @property
    def query_count(self) -> int:
        """Captions submitted so far (one query may ask for several images)."""
        return self._queries

    @property
    def images_generated(self) -> int:
        return self._images

    def __repr__(self) -> str:
        return f"BlackBoxTarget({self.name!r}, queries={self._queries}, images={self._images})"
