"""REDIFFUSE (Li et al., "Towards Black-Box Membership Inference Attack for Diffusion Models",
arXiv 2405.20771), a black-box attack through an image-to-image (variation) API.

Algorithm 1 of the paper: for i = 1..n, x_hat_i = V(x, t) (noise x to step t, denoise back
to 0); average x_hat = mean_i x_hat_i; member if D(x, x_hat) is small. Averaging cancels the
random part of each variation, and the model's noise prediction is closer to unbiased on
its training images, so a member's average lands nearer x. On Stable Diffusion D is SSIM on
the decoded images in grey scale (the reference code, lijingwei0502/diffusion_mia
`Stable_Diffusion/attack.py`); the DDIM/DiT experiments use L2 (or a ResNet-18 on x - x_hat).

Features, both higher = member: SSIM(gray(x), gray(x_hat)) (torchmetrics, Gaussian window
sigma 1.5, data range 1), and -mean (x - x_hat)^2 over pixels and channels.

Mapping to the harness's img2img `strength`. The reference SD code noises the latent to
t = 50 of T = 1000 and takes one DDIM step of stride k = 50 back to 0. The harness's img2img
follows diffusers: with N DDIM steps (`SamplingConfig.num_inference_steps`, default 20, so
stride T/N = 50 and "leading" timesteps 950, ..., 50, 0) it runs s = max(1, round(N *
strength)) steps, the first at timestep (s - 1) * T / N. strength = t / T = 0.05 would give
s = 1, i.e. noise at timestep 0: almost no noise at all. The default strength 0.1 gives s = 2:
noise at t = 50, one DDIM step 50 -> 0 of stride 50 (the reference's t and k), then the final
near-identity step at 0. `strength_for_timestep` computes this for other (t, N).
`num_variations` n = 10 is the paper's (its SD script defaults to 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from attacks import families
from attacks.attack import AttackConfig, Query
from attacks.families import Access, AttackFamily, AttackFamilyError, QueryCost, ScoredQueries, register_attack_family
from attacks.gray_box import REFERENCE_TIMESTEPS, query_images
from attacks.scenarios import QueryAccess
from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.target import BlackBoxTarget, SamplingConfig

FEATURE_NAMES = ("ssim", "neg_l2")
# ITU-R 601 luma, as PIL's convert("L") that the reference code uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def strength_for_timestep(t: int, *, num_inference_steps: int, num_train_timesteps: int = REFERENCE_TIMESTEPS) -> float:
    """The img2img strength whose first (noising) step is timestep t, for diffusers-style DDIM."""
    if num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if not 0 <= t < num_train_timesteps:
        raise ConfigError(f"timestep must be in [0, {num_train_timesteps - 1}], got {t}")
    steps = int(round(t * num_inference_steps / num_train_timesteps)) + 1
    return min(1.0, steps / num_inference_steps)


@dataclass(frozen=True)
class ReDiffuseParams:
    """REDIFFUSE's hyperparameters (see the module docstring for the strength mapping)."""

    strength: float = field(
        default=0.1, metadata={"help": "img2img strength (0.1: t = 50 with 20 DDIM steps)", "above": 0, "max": 1}
    )
    num_variations: int = field(default=10, metadata={"help": "variations n averaged per query", "min": 1})
    ssim_sigma: float = field(default=1.5, metadata={"help": "SSIM Gaussian window sigma (pixels)", "above": 0})

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"REDIFFUSE strength must be in (0, 1], got {self.strength}")
        if self.num_variations < 1:
            raise ConfigError(f"REDIFFUSE num_variations (n) must be >= 1, got {self.num_variations}")
        if not self.ssim_sigma > 0:
            raise ConfigError(f"REDIFFUSE ssim_sigma must be > 0, got {self.ssim_sigma}")

    @property
    def feature_names(self) -> tuple[str, ...]:
        return FEATURE_NAMES

    def cost_per_query(self, *, num_inference_steps: int = 20, guidance_scale: float = 1.0) -> QueryCost:
        """n generated images, each max(1, round(N * strength)) DDIM steps (x2 with guidance)."""
        steps = min(num_inference_steps, max(1, int(round(num_inference_steps * self.strength))))
        per_step = 2 if guidance_scale != 1.0 else 1
        return QueryCost(images_generated=self.num_variations, unet_calls=self.num_variations * steps * per_step)


def ssim_gray(images: np.ndarray, references: np.ndarray, *, sigma: float = 1.5) -> np.ndarray:
    """SSIM per pair of (N, H, W, 3) images in [0, 1], on their luma."""
    a = torch.from_numpy(np.ascontiguousarray(np.asarray(images, dtype=np.float32) @ _LUMA))[:, None]
    b = torch.from_numpy(np.ascontiguousarray(np.asarray(references, dtype=np.float32) @ _LUMA))[:, None]
    # torchmetrics pads by int(3.5 sigma + 0.5) with reflection, which needs a smaller pad than the image.
    if int(3.5 * sigma + 0.5) >= min(a.shape[-2:]):
        raise ValueError(f"images of {tuple(a.shape[-2:])} pixels are too small for an SSIM window of sigma {sigma}")
    with torch.no_grad():
        values = structural_similarity_index_measure(a, b, sigma=sigma, data_range=1.0, reduction="none")
    return np.asarray(values, dtype=np.float64).reshape(len(a))


@families.batched_scorer(ReDiffuseParams, query_batch=32, black_box=True)
def score_rediffuse(
    target: BlackBoxTarget, queries: Sequence[Query], params: ReDiffuseParams, run: families.ScoringRun
) -> ScoredQueries:
    """REDIFFUSE features (SSIM, -L2) of each query image against its averaged variations.

    Raises:
        ValueError: a query has no caption (caption it first).
        PermissionError: the target offers no image-to-image access.
    """
    families.require_captions(queries)
    images = query_images(queries)
    captions = [str(q.caption) for q in queries]
    for start in range(0, len(queries), run.query_batch):
        chunk = images[start : start + run.query_batch]
        variations = target.img2img(
            chunk,
            captions[start : start + run.query_batch],
            strength=params.strength,
            num_images=params.num_variations,
            seed=run.seed + start,
        )
        average = np.asarray(variations, dtype=np.float32).mean(axis=1)
        l2 = ((average.astype(np.float64) - chunk) ** 2).reshape(len(chunk), -1).mean(axis=1)
        run.add(np.column_stack([ssim_gray(average, chunk, sigma=params.ssim_sigma), -l2]))
    return run.result(queries, len(FEATURE_NAMES), captions)


@register_attack_family("rediffuse")
class ReDiffuse(AttackFamily):
    """REDIFFUSE (Li et al. 2024): SSIM and -L2 of the query image to its averaged img2img variations.

    Uses its own `strength` hyperparameter, not the run's --strength (Pang & Wang's).
    """

    version = "1"
    Params = ReDiffuseParams
    target_needs = "a black-box target with img2img"
    scorer = staticmethod(score_rediffuse)

    def access(self, query_access: QueryAccess) -> Access:
        if query_access is not QueryAccess.IMAGE_TO_IMAGE:
            raise AttackFamilyError(f"attack {self.name!r} needs image-to-image access: add --query-access img2img")
        return Access.BLACK_BOX_IMG2IMG

    def cost_per_query(self, config: AttackConfig, sampling: SamplingConfig) -> QueryCost:
        return self.params.cost_per_query(
            num_inference_steps=sampling.num_inference_steps, guidance_scale=sampling.guidance_scale
        )

    def derived_hyperparameters(self, config: AttackConfig) -> dict[str, object]:
        return {"features": list(FEATURE_NAMES), "ssim_on": "luma, data range 1", "seed": config.seed}
