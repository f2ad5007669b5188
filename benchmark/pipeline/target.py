"""The black-box and gray-box interfaces: the only handles an attack ever gets on a model.

Black box: captions (and, where the provider offers image-to-image access, images) go in,
generated images come out, and every query is counted. Gray box (`GrayBoxTarget`): the
model's noise prediction for caller-chosen (image, caption, timestep, noise), still
without weights, gradients or labels, every prediction counted. The model itself lives in a closure created by
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


@dataclass(frozen=True)
class NoisePrediction:
    """What a gray-box query returns: the noise that was added and the model's prediction of it."""

    noise: np.ndarray  # (N, *latent_shape) float32, the noise that was added (given or drawn)
    prediction: np.ndarray  # (N, *latent_shape) float32, the model's predicted noise


# (images (N, H, W, 3) in [0, 1], captions ("" = null caption), timesteps (N,) int64,
#  noise (N, *latent_shape) float32 or None, seed) -> (noise, prediction), both (N, *latent_shape) float32
PredictNoiseFn = Callable[[np.ndarray, list[str], np.ndarray, "np.ndarray | None", int], tuple[np.ndarray, np.ndarray]]


class GrayBoxTarget:
    """Gray-box access: the target's denoising prediction eps_theta(x_t, t, c) for caller-chosen inputs.

    The model encodes the images with its own VAE (as a provider's API would), adds
    the noise at each timestep with its own scheduler and returns its prediction of
    that noise. No weights, gradients, losses or labels; every prediction is counted
    (one UNet evaluation each).
    """

    __slots__ = (
        "_predict",
        "_queries",
        "_unet_calls",
        "_images",
        "_seconds",
        "name",
        "num_train_timesteps",
        "latent_shape",
    )

    def __init__(
        self, predict_fn: PredictNoiseFn, *, name: str, num_train_timesteps: int, latent_shape: tuple[int, ...]
    ) -> None:
        self._predict = predict_fn
        self._queries = 0
        self._unet_calls = 0
        self._images = 0
        self._seconds = 0.0
        self.name = name
        self.num_train_timesteps = int(num_train_timesteps)
        self.latent_shape = tuple(int(d) for d in latent_shape)

    def predict_noise(
        self,
        images: np.ndarray,
        captions: Sequence[str | None],
        *,
        timesteps: Sequence[int] | np.ndarray,
        noise: np.ndarray | None = None,
        seed: int = 0,
    ) -> NoisePrediction:
        """The model's noise prediction for each (image, caption, timestep, noise).

        Args:
            images: (N, H, W, 3) in [0, 1].
            captions: one per image; None is the null caption.
            timesteps: one per image, 0 <= t < num_train_timesteps.
            noise: (N, *latent_shape), or None to draw N(0, I) from `seed`.
            seed: seeds the noise draw (and nothing else): a fixed seed gives the same answer.

        Raises:
            ValueError: mismatched lengths or shapes, or a timestep out of range (nothing is counted).
        """
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
        n = len(images)
        captions = ["" if c is None else str(c) for c in captions]
        if len(captions) != n:
            raise ValueError(f"{n} images but {len(captions)} captions")
        steps = np.asarray(timesteps)
        if steps.shape != (n,) or (n and not np.issubdtype(steps.dtype, np.integer)):
            raise ValueError(f"timesteps must be {n} integers (one per image), got shape {steps.shape}")
        steps = steps.astype(np.int64)
        if n and (steps.min() < 0 or steps.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must be in [0, {self.num_train_timesteps}), got {steps.min()}..{steps.max()}")
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != (n, *self.latent_shape):
                raise ValueError(f"noise must have shape {(n, *self.latent_shape)}, got {noise.shape}")
        if n == 0:
            empty = np.zeros((0, *self.latent_shape), dtype=np.float32)
            return NoisePrediction(noise=empty, prediction=empty.copy())
        start = time.perf_counter()
        drawn, prediction = self._predict(images, captions, steps, noise, int(seed))
        self._seconds += time.perf_counter() - start
        self._queries += n
        self._unet_calls += n
        self._images += n
        return NoisePrediction(noise=np.asarray(drawn, dtype=np.float32), prediction=np.asarray(prediction, np.float32))

    @property
    def query_count(self) -> int:
        """Noise predictions asked for so far (one per (image, caption, timestep, noise))."""
        return self._queries

    @property
    def unet_calls(self) -> int:
        """UNet evaluations spent (one per prediction: no guidance in a gray-box query)."""
        return self._unet_calls

    @property
    def images_encoded(self) -> int:
        """Images the model encoded for the queries (one per prediction)."""
        return self._images

    @property
    def images_generated(self) -> int:
        """Always 0: a gray-box query generates no image (kept for the same cost bookkeeping)."""
        return 0

    @property
    def seconds_generating(self) -> float:
        """Wall time spent inside the model."""
        return self._seconds

    def __repr__(self) -> str:
        return f"GrayBoxTarget({self.name!r}, queries={self._queries}, unet_calls={self._unet_calls})"
