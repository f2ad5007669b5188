"""What the gray-box attacks share: the interface they code against, costs, timesteps, the robust scaler.

The attacks see a model only through `predict_noise` (the caller picks the image, caption,
timestep and noise and reads the predicted noise back), typed here as a `Protocol` so that
`benchmark.pipeline.target.GrayBoxTarget` and test fakes both fit the scoring functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from attacks.attack import Query
from benchmark.kernel.errors import ConfigError

# The papers quote timesteps on Stable Diffusion's 1000-step schedule.
REFERENCE_TIMESTEPS = 1000


class NoisePredictionLike(Protocol):
    @property
    def noise(self) -> np.ndarray: ...
    @property
    def prediction(self) -> np.ndarray: ...


class NoisePredictor(Protocol):
    """The gray-box interface: `predict_noise` called as `benchmark.pipeline.target.GrayBoxTarget.predict_noise`
    (images, captions, *, timesteps, noise=None, seed=0) -> NoisePredictionLike."""

    name: str
    num_train_timesteps: int
    predict_noise: Callable[..., NoisePredictionLike]


def check_paper_timestep(name: str, t: int) -> None:
    """A timestep on the papers' 1000-step scale must lie in [1, 999]."""
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer timestep, got {t!r}")
    if not 1 <= t < REFERENCE_TIMESTEPS:
        raise ConfigError(
            f"{name} must be in [1, {REFERENCE_TIMESTEPS - 1}] "
            f"(on the papers' {REFERENCE_TIMESTEPS}-step scale), got {t}"
        )


def scale_timestep(t: int, num_train_timesteps: int) -> int:
    """Map a timestep quoted on the 1000-step scale to the target's schedule (same fraction of it)."""
    if num_train_timesteps < 2:
        raise ConfigError(f"the target's schedule needs >= 2 timesteps, got {num_train_timesteps}")
    scaled = int(round(t * num_train_timesteps / REFERENCE_TIMESTEPS))
    return min(max(scaled, 1), num_train_timesteps - 1)


def query_images(queries: Sequence[Query]) -> np.ndarray:
    if not queries:
        raise ValueError("no queries to score")
    images = np.stack([np.asarray(q.image, dtype=np.float32) for q in queries])
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"query images must be (H, W, 3), got {images.shape[1:]}")
    return images


def squared_error(prediction: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Per-image mean over latent elements of (prediction - noise)^2: ||.||^2 up to a constant."""
    diff = np.asarray(prediction, dtype=np.float64) - np.asarray(noise, dtype=np.float64)
    return (diff**2).reshape(len(diff), -1).mean(axis=1)


@dataclass(frozen=True)
class RobustScaler:
    """(a - median) / IQR, fitted on the shadow's scores (CLiD's S(.))."""

    center: float
    scale: float

    @classmethod
    def fit(cls, values: np.ndarray) -> RobustScaler:
        values = np.asarray(values, dtype=np.float64)
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        iqr = q3 - q1
        return cls(center=float(median), scale=float(iqr) if iqr > 0 else 1.0)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return (np.asarray(values, dtype=np.float64) - self.center) / self.scale
