"""Utility of a (defended) model: FID, KID and CLIP score, offline and comparable.

FID and KID are torchmetrics' implementations fed a reference network's image
embeddings (`benchmark.pipeline.reference_networks`); CLIP score is torchmetrics'
`CLIPScore` (100 x cosine, clipped at 0).

Protocol: one image per utility-eval caption (disjoint from members), a fixed
seed for every defense; the real images are those of the same utility split. The
record names the feature network and the sha256 of its weights file: figures
from different feature networks are never comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.models.diffusion import generate
from benchmark.pipeline.records import UtilityRecord
from benchmark.pipeline.reference_networks import (
    ClipAdapter,
    ClipBundle,
    ClipImageFeatures,
    InceptionFeatures,
    ReferenceClipTraining,
    check_clip_folder,
    check_fid_weights,
    load_clip_folder,
    reference_clip,
    sha256_file,
)


@dataclass(frozen=True)
class UtilitySettings:
    """What the utility stage measures and with which networks."""

    kid_subset_size: int = 50
    kid_subsets: int = 100
    seed: int = 0
    clip_model: Path | None = None
    fid_weights: Path | None = None


@dataclass(frozen=True)
class UtilityResult:
    fid: float
    kid_mean: float
    kid_std: float
    clip_score: float
    details: dict[str, Any]

    def with_base_model(self, base: UtilityResult) -> UtilityResult:
        """This result with the base model's figures (same protocol and networks) attached as a control."""
        if base.details["feature_network"] != self.details["feature_network"]:
            raise ValueError("the base model's utility was measured with another feature network")
        control = {k: base.details[k] for k in ("fid", "kid_mean", "kid_std", "clip_score")}
        return replace(self, details={**self.details, "base_model": control})

    def record(self) -> UtilityRecord:
        """The record's utility section: these figures, the networks and counts behind them, the base model's."""
        return UtilityRecord.from_measurement(self.details)


def fid_kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    feature: nn.Module,
    *,
    kid_subset_size: int,
    kid_subsets: int,
    seed: int,
) -> tuple[float, float, float]:
    """(FID, KID mean, KID std) of two (N, 3, H, W) image sets in [0, 1], via torchmetrics.

    `feature` maps such images to (N, D) features and says D in `num_features`:
    the reference network (`ClipImageFeatures`) or the standard one (`InceptionFeatures`).

    Raises:
        ConfigError: fewer samples than the KID subset size.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(real), len(fake))
    if n < kid_subset_size:
        raise ConfigError(
            f"KID needs at least kid_subset_size={kid_subset_size} images per side, got {len(real)} real and "
            f"{len(fake)} generated; raise --utility (samples) or lower --kid-subset-size"
        )
    if n < 2:
        raise ConfigError("FID needs at least 2 images per side; raise --utility")
    fid = FrechetInceptionDistance(feature=feature, normalize=True)
    kid = KernelInceptionDistance(feature=feature, subsets=kid_subsets, subset_size=kid_subset_size, normalize=True)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    fid_value = float(fid.compute())
    # KID draws its subsets from torch's global generator: seed it without disturbing the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return fid_value, float(kid_mean), float(kid_std)


def clip_score(bundle: ClipBundle, images: torch.Tensor, captions: Sequence[str]) -> float:
    """torchmetrics' CLIPScore: max(100 x mean cosine(image, caption), 0); images (N, 3, H, W) in [0, 1]."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: (ClipAdapter(bundle.model), bundle.processor))
    # uint8, as torchmetrics expects: the processor rescales by 1/255 (and resizes through PIL).
    metric.update(list((images * 255.0).round().clamp(0, 255).to(torch.uint8)), list(captions))
    return float(metric.compute())


def check_settings(settings: UtilitySettings, *, samples: int) -> None:
    """Validate before any training: sample counts, KID subset, the standard-network paths."""
    if samples < 2:
        raise ConfigError(f"utility metrics need at least 2 utility-eval samples, got {samples}; raise --utility")
    if settings.kid_subset_size < 1 or settings.kid_subsets < 1:
        raise ConfigError("kid_subset_size and kid_subsets must be >= 1")
    if samples < settings.kid_subset_size:
        raise ConfigError(
            f"KID subset size {settings.kid_subset_size} is larger than the {samples} utility-eval samples; "
            "raise --utility or lower --kid-subset-size"
        )
    if settings.fid_weights is not None:
        check_fid_weights(settings.fid_weights)
    if settings.clip_model is not None:
        check_clip_folder(settings.clip_model)


def measure(
    *,
    bundle: ClipBundle,
    real: torch.Tensor,
    fake: torch.Tensor,
    captions: Sequence[str],
    settings: UtilitySettings,
) -> UtilityResult:
    """FID, KID and CLIP score of generated images `fake` (for `captions`) against `real`; NCHW in [0, 1]."""
    if settings.fid_weights is not None:
        feature: nn.Module = InceptionFeatures(Path(settings.fid_weights))
        feature_name = "inception-v3-compat (torch-fidelity)"
        feature_hash = sha256_file(Path(settings.fid_weights).expanduser())
    else:
        feature = ClipImageFeatures(bundle)
        feature_name = f"{bundle.name} image embeddings"
        feature_hash = bundle.weights_sha256
    fid, kid_mean, kid_std = fid_kid(
        real,
        fake,
        feature,
        kid_subset_size=settings.kid_subset_size,
        kid_subsets=settings.kid_subsets,
        seed=settings.seed,
    )
    score = clip_score(bundle, fake, captions)
    details = {
        "feature_network": {
            "name": feature_name,
            "weights_sha256": feature_hash,
            "dim": feature.num_features,
        },
        "clip_model": {"name": bundle.name, "weights_sha256": bundle.weights_sha256, **bundle.details},
        "n_real": len(real),
        "n_generated": len(fake),
        "kid_subset_size": settings.kid_subset_size,
        "kid_subsets": settings.kid_subsets,
        "seed": settings.seed,
        "fid": fid,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "clip_score": score,
        "note": "FID is biased upwards at small N; compare only figures with the same feature network and counts",
    }
    return UtilityResult(fid=fid, kid_mean=kid_mean, kid_std=kid_std, clip_score=score, details=details)


def measure_utility(
    *,
    model: Any,  # benchmark.pipeline.models.diffusion.DiffusionModel
    real: Sequence[np.ndarray],
    captions: Sequence[str],
    public: Any | None,
    cache_dir: Path,
    training: ReferenceClipTraining,
    settings: UtilitySettings,
    sampling: Any,  # benchmark.pipeline.target.SamplingConfig
    progress: Callable[..., None] | None = None,
) -> UtilityResult:
    """The utility stage of a run: one image per utility-eval caption with a fixed seed, then the metrics.

    Raises:
        ConfigError: no public split for the reference model, or bad settings.
    """
    check_settings(settings, samples=len(captions))
    if settings.clip_model is not None:
        bundle = load_clip_folder(settings.clip_model)
    else:
        if public is None:
            raise ConfigError("the reference CLIP model is trained on the public split, but this run has none")
        steps = training.steps
        if progress is not None:
            progress(0, total=steps + 2)
        bundle = reference_clip(
            public=public,
            cache_dir=cache_dir,
            training=training,
            on_step=(lambda step, total, loss: progress(info=f"reference CLIP loss {loss:.3f}")) if progress else None,
        )
    generated = generate(
        model,
        list(captions),
        seed=settings.seed,
        num_inference_steps=sampling.num_inference_steps,
        guidance_scale=sampling.guidance_scale,
        batch_size=sampling.batch_size,
    )
    if progress is not None:
        progress(info="generated")
    fake = generated.float().clamp(-1, 1).add(1).div(2)
    real_t = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in real])).permute(0, 3, 1, 2)
    result = measure(bundle=bundle, real=real_t, fake=fake, captions=captions, settings=settings)
    result.details["generation"] = {
        "seed": settings.seed,
        "num_inference_steps": sampling.num_inference_steps,
        "guidance_scale": sampling.guidance_scale,
        "captions": "utility-eval split (disjoint from members)",
    }
    if progress is not None:
        progress(info="measured")
    return result
