"""Utility of a (defended) model: FID, KID and CLIP score, offline and comparable.

FID and KID are torchmetrics' implementations fed a reference network's image
embeddings (`benchmark.pipeline.reference_networks`); CLIP score is torchmetrics'
`CLIPScore` (100 x cosine, clipped at 0).

Protocol: `generations` images per utility-eval caption (disjoint from members),
each generation with its own seed, the same captions and seeds for every defense
and for the base model; the real images are those of the same utility split. The
record names the feature network and the sha256 of its weights file: figures
from different feature networks are never comparable.

Each figure carries a 95% percentile-bootstrap interval over captions (a caption
resamples its real image and all its generations together), and the target's
difference to the base model is a paired bootstrap on the same resampled
captions, so the noise of the evaluation sample cancels where it is shared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
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
    _weights_file,
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
    # Images per caption, each from its own generation seed: one seed's draw moved the
    # base model's CLIP score by 12 points between evaluation samples of 100 captions.
    generations: int = 1
    # Caption resamples behind the intervals and the paired differences (0: none).
    bootstrap: int = 0


FIGURES = ("fid", "kid_mean", "clip_score")


@dataclass(frozen=True)
class UtilitySamples:
    """The per-image measurements behind one model's figures: what intervals and pairings resample."""

    real_features: np.ndarray  # (N, D), one real image per caption
    fake_features: np.ndarray  # (G * N, D): generation g of caption i at row g * N + i
    clip: np.ndarray  # (G * N,): 100 x cosine(image, its caption), rows as fake_features

    def resampled(self, captions: np.ndarray) -> dict[str, float]:
        """FID, KID and CLIP score of the captions `captions` (indices, repeats allowed)."""
        from torchmetrics.image.fid import _compute_fid
        from torchmetrics.image.kid import poly_mmd

        n = len(self.real_features)
        rows = (np.arange(len(self.fake_features) // n)[:, None] * n + captions[None, :]).ravel()
        real = torch.from_numpy(self.real_features[captions]).double()
        fake = torch.from_numpy(self.fake_features[rows]).double()
        fid = _compute_fid(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T))
        # KID over the whole resample (no subsets): the same unbiased MMD the subsets average.
        kid = poly_mmd(real, fake)
        return {"fid": float(fid), "kid_mean": float(kid), "clip_score": max(float(self.clip[rows].mean()), 0.0)}


@dataclass(frozen=True)
class UtilityResult:
    fid: float
    kid_mean: float
    kid_std: float
    clip_score: float
    details: dict[str, Any]
    # Not recorded; kept (in the cache, for the base model) to pair later comparisons.
    samples: UtilitySamples | None = field(default=None, compare=False, repr=False)

    def with_base_model(self, base: UtilityResult, *, resamples: int = 0, seed: int = 0) -> UtilityResult:
        """This result with the base model's figures (same protocol and networks) attached as a control.

        With `resamples` and both models' samples, also the paired difference target - base
        of each figure, on the same bootstrap resamples of the shared captions.
        """
        if base.details["feature_network"] != self.details["feature_network"]:
            raise ValueError("the base model's utility was measured with another feature network")
        control = {k: base.details[k] for k in ("fid", "kid_mean", "kid_std", "clip_score")}
        details = {**self.details, "base_model": control}
        if resamples and self.samples is not None and base.samples is not None:
            details["vs_base_model"] = paired_differences(self.samples, base.samples, resamples=resamples, seed=seed)
        return replace(self, details=details)

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

    device = bundle.model.device
    # On the model's device: torchmetrics moves the model to wherever the images are.
    metric = CLIPScore(model_name_or_path=lambda: (ClipAdapter(bundle.model), bundle.processor)).to(device)
    # uint8, as torchmetrics expects: the processor rescales by 1/255 (and resizes through PIL).
    uint8 = (images * 255.0).round().clamp(0, 255).to(torch.uint8)
    metric.update([image.to(device) for image in uint8], list(captions))
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


class _Precomputed(nn.Module):
    """Hands features already computed to torchmetrics' FID and KID, so each image is embedded once."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _percentile_interval(values: np.ndarray) -> list[float]:
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return [float(low), float(high)]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # Each resample is a few small matrix products: on a busy machine, more threads spin
    # against each other and were 30-100x slower than one (measured on 2 cores).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _caption_resamples(n: int, resamples: int, seed: int) -> np.ndarray:
    # Seeded apart from the generation seeds, so the same protocol gives the same resamples.
    return np.random.default_rng([seed, 0xB007]).integers(0, n, size=(resamples, n))


def bootstrap_intervals(samples: UtilitySamples, *, resamples: int, seed: int) -> dict[str, list[float]]:
    """95% percentile-bootstrap interval of each figure, resampling captions."""
    with _one_thread():
        draws = [samples.resampled(idx) for idx in _caption_resamples(len(samples.real_features), resamples, seed)]
    return {k: _percentile_interval(np.array([d[k] for d in draws])) for k in FIGURES}


def paired_differences(
    target: UtilitySamples, base: UtilitySamples, *, resamples: int, seed: int
) -> dict[str, dict[str, float]]:
    """target - base of each figure: value, 95% paired-bootstrap interval and two-sided p-value.

    Both models were measured on the same captions, real images and generation seeds;
    each resample draws one set of captions for both, so what they share cancels.

    Raises:
        ValueError: the two were not measured on the same real images.
    """
    if target.real_features.shape != base.real_features.shape or not np.allclose(
        target.real_features, base.real_features, atol=1e-5
    ):
        raise ValueError("paired utility differences need the same real images (utility-eval split) for both models")
    n = len(target.real_features)
    everything = np.arange(n)
    diffs = []
    with _one_thread():
        point_t, point_b = target.resampled(everything), base.resampled(everything)
        for idx in _caption_resamples(n, resamples, seed):
            t, b = target.resampled(idx), base.resampled(idx)
            diffs.append([t[k] - b[k] for k in FIGURES])
    table = np.array(diffs)
    out = {}
    for j, k in enumerate(FIGURES):
        column = table[:, j]
        p = 2 * min(np.mean(column <= 0), np.mean(column >= 0))
        low, high = _percentile_interval(column)
        out[k] = {
            # The difference of the whole-sample figures (KID here without subsets).
            "difference": point_t[k] - point_b[k],
            "low": low,
            "high": high,
            "p_value": float(min(1.0, max(p, 1 / (resamples + 1)))),
        }
    return out


def measure(
    *,
    bundle: ClipBundle,
    real: torch.Tensor,
    fake: torch.Tensor,
    captions: Sequence[str],
    settings: UtilitySettings,
) -> UtilityResult:
    """FID, KID and CLIP score of generated images `fake` against `real` (one per caption); NCHW in [0, 1].

    `fake` holds G generations per caption, generation g of caption i at row g * N + i.

    Raises:
        ConfigError: `fake` is not a whole number of generations of the captions.
    """
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    if len(real) != len(captions) or len(fake) % len(captions):
        raise ConfigError(
            f"utility needs one real image per caption and whole generations: got {len(real)} real images, "
            f"{len(captions)} captions and {len(fake)} generated images"
        )
    generations = len(fake) // len(captions)
    if settings.fid_weights is not None:
        feature: nn.Module = InceptionFeatures(Path(settings.fid_weights))
        feature_name = "inception-v3-compat (torch-fidelity)"
        feature_hash = sha256_file(Path(settings.fid_weights).expanduser())
    else:
        feature = ClipImageFeatures(bundle)
        feature_name = f"{bundle.name} image embeddings"
        feature_hash = bundle.weights_sha256
    with torch.no_grad():
        # The feature network computes where it was placed; the features come back to the CPU.
        real_features = feature(real).cpu().double()
        fake_features = feature(fake).cpu().double()
    fid, kid_mean, kid_std = fid_kid(
        real_features,
        fake_features,
        _Precomputed(feature.num_features),
        kid_subset_size=settings.kid_subset_size,
        kid_subsets=settings.kid_subsets,
        seed=settings.seed,
    )
    # On the CLIP model's device: torchmetrics moves the model to wherever the images are.
    uint8 = [image.to(bundle.model.device) for image in (fake * 255.0).round().clamp(0, 255).to(torch.uint8)]
    with torch.no_grad():
        per_image, _ = _clip_score_update(
            uint8, list(captions) * generations, ClipAdapter(bundle.model), bundle.processor
        )
    per_image = per_image.cpu()
    # torchmetrics' CLIPScore: the mean of 100 x cosine, clipped at 0.
    score = max(float(per_image.mean()), 0.0)
    samples = UtilitySamples(
        real_features=real_features.numpy(), fake_features=fake_features.numpy(), clip=per_image.double().numpy()
    )
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
        "generations_per_caption": generations,
        "note": "FID is biased upwards at small N; compare only figures with the same feature network and counts",
    }
    if settings.bootstrap:
        details["intervals"] = bootstrap_intervals(samples, resamples=settings.bootstrap, seed=settings.seed)
        details["bootstrap"] = {
            "resamples": settings.bootstrap,
            "unit": "caption (its real image and all its generations)",
            "interval": "95% percentile; KID's without subsets",
        }
    return UtilityResult(
        fid=fid, kid_mean=kid_mean, kid_std=kid_std, clip_score=score, details=details, samples=samples
    )


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
    """The utility stage of a run: `settings.generations` images per utility-eval caption, then the metrics.

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
    generated = torch.cat(
        [
            generate(
                model,
                list(captions),
                seed=seed,
                num_inference_steps=sampling.num_inference_steps,
                guidance_scale=sampling.guidance_scale,
                batch_size=sampling.batch_size,
            )
            for seed in generation_seeds(settings)
        ]
    )
    if progress is not None:
        progress(info="generated")
    fake = generated.float().clamp(-1, 1).add(1).div(2)
    real_t = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in real])).permute(0, 3, 1, 2)
    result = measure(bundle=bundle, real=real_t, fake=fake, captions=captions, settings=settings)
    result.details["generation"] = {
        "seed": settings.seed,
        "seeds": generation_seeds(settings),
        "num_inference_steps": sampling.num_inference_steps,
        "guidance_scale": sampling.guidance_scale,
        "captions": "utility-eval split (disjoint from members)",
    }
    if progress is not None:
        progress(info="measured")
    return result


# Part of the keys of utility results kept on disk: raise it when a change here changes a figure.
PROTOCOL_VERSION = 1


def protocol_identity(
    settings: UtilitySettings, *, training: ReferenceClipTraining, public: dict[str, object] | None
) -> dict[str, object]:
    """What `measure_utility` measures with, named before anything is generated (a cache key's part).

    The reference CLIP is named by what trains it (`public`: the public split's fingerprint); a
    user's CLIP folder or FID weights by the sha256 of the weights, since a path may hold other
    weights tomorrow.
    """
    from importlib.metadata import version

    clip: dict[str, object] = (
        {"reference": {"public": public, "training": training.to_dict()}}
        if settings.clip_model is None
        else {"weights_sha256": sha256_file(_weights_file(check_clip_folder(settings.clip_model)))}
    )
    return {
        "version": PROTOCOL_VERSION,
        **{k: v for k, v in asdict(settings).items() if k not in ("clip_model", "fid_weights")},
        "generation_seeds": generation_seeds(settings),
        "clip_model": clip,
        "fid_weights": None if settings.fid_weights is None else sha256_file(Path(settings.fid_weights).expanduser()),
        "packages": {name: version(name) for name in ("torch", "torchmetrics", "transformers")},
    }


def generation_seeds(settings: UtilitySettings) -> list[int]:
    """One sampling seed per generation; the first is the run's, as in the one-generation protocol."""
    return [settings.seed + 1_000_003 * g for g in range(settings.generations)]
