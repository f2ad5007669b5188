"""Algorithm 1 of the paper: query with a caption, generate, embed, compare, fit, decide."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from attacks.attack_models import ATTACK_MODELS, AttackModel, check_family
from attacks.captioners import Captioner
from attacks.distances import DISTANCES
from attacks.encoders import ENCODERS, ImageEncoder
from attacks.families import (
    ATTACK_FAMILIES,
    DEFAULT_FAMILY,
    Access,
    AttackFamily,
    QueryCost,
    ScoredQueries,
    ScoringRun,
    register_attack_family,
    require_captions,
)
from attacks.scenarios import QueryAccess, Scenario
from benchmark.pipeline.target import BlackBoxTarget, SamplingConfig

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class AttackConfig:
    scenario: Scenario = Scenario.III
    attack_model: str = "threshold"
    encoder: str = "pixels"
    distance: str = "cosine"
    generations_per_query: int = 3
    query_access: QueryAccess = QueryAccess.TEXT
    # Only for image-to-image access: how far the query image is noised (0 < s <= 1).
    strength: float = 0.5
    # Queries per call to the target: the model sees query_batch x generations images at once.
    query_batch: int = 128
    seed: int = 0
    # The attack family (`attacks.families`) and its hyperparameter overrides (KEY=VALUE pairs).
    attack: str = DEFAULT_FAMILY
    attack_args: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.generations_per_query < 1:
            raise ValueError(f"generations per query must be >= 1, got {self.generations_per_query}")
        if self.query_batch < 1:
            raise ValueError(f"query batch must be >= 1, got {self.query_batch}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"img2img strength must be in (0, 1], got {self.strength}")
        ATTACK_MODELS.get(self.attack_model)
        ENCODERS.get(self.encoder)
        DISTANCES.get(self.distance)
        ATTACK_FAMILIES.get(self.attack)
        check_family(self.attack_model, self.attack)

    def family(self) -> AttackFamily:
        """The attack family with this configuration's hyperparameters."""
        return ATTACK_FAMILIES.get(self.attack).from_args(self.attack_args)

    def to_dict(self) -> dict[str, object]:
        return {
            "scenario": self.scenario.value,
            "attack_model": self.attack_model,
            "encoder": self.encoder,
            "distance": self.distance,
            "generations_per_query": self.generations_per_query,
            "query_access": self.query_access.value,
            "strength": self.strength if self.query_access is QueryAccess.IMAGE_TO_IMAGE else None,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class Query:
    """What the attacker holds for one candidate: never its membership.

    `caption` is None where the scenario gives the attacker the image alone
    (II, IV); `caption_queries` fills it from a captioner.
    """

    query_id: str
    image: np.ndarray
    caption: str | None


def caption_queries(queries: Sequence[Query], captioner: Captioner) -> list[Query]:
    """Replace every caption with the captioner's (the attacker holds images only)."""
    captions = captioner.caption(np.stack([q.image for q in queries]))
    return [replace(q, caption=c) for q, c in zip(queries, captions, strict=True)]


def score_queries(
    target: BlackBoxTarget,
    queries: Sequence[Query],
    config: AttackConfig,
    *,
    encoder: ImageEncoder | None = None,
    progress: ProgressFn | None = None,
) -> ScoredQueries:
    """Similarity of each query image to `m` generations from its caption.

    With text-only access (the paper's attack) the query image never reaches the
    model: only its caption does. With image-to-image access the query image is
    noised to `config.strength` and denoised with its caption.
    """
    require_captions(queries)
    encoder = encoder or ENCODERS.get(config.encoder)()
    similarity = DISTANCES.get(config.distance)
    run = ScoringRun(progress, target=target)
    m = config.generations_per_query
    for start in range(0, len(queries), config.query_batch):
        chunk = queries[start : start + config.query_batch]
        captions = [str(q.caption) for q in chunk]
        query_images = np.stack([q.image for q in chunk])
        # One seed per batch start keeps scores reproducible for a fixed batch size.
        if config.query_access is QueryAccess.IMAGE_TO_IMAGE:
            generated = target.img2img(
                query_images, captions, strength=config.strength, num_images=m, seed=config.seed + start
            )
        else:
            generated = target.generate(captions, num_images=m, seed=config.seed + start)
        n = generated.shape[0]
        gen_emb = encoder.embed(generated.reshape(n * m, *generated.shape[2:]))
        query_emb = encoder.embed(query_images)
        gen_emb = gen_emb.reshape(n, m, *gen_emb.shape[1:])
        with torch.no_grad():
            run.add(similarity(query_emb.unsqueeze(1), gen_emb).numpy())
    return run.result(queries, m)


@dataclass(frozen=True)
class PangWangParams:
    """Pang & Wang's attack has no settings of its own beyond the run's: --encoder, --distance,
    --generations and (img2img) --strength; `PangWang.hyperparameters` records those."""


@register_attack_family("pang-wang")
class PangWang(AttackFamily):
    """Pang & Wang (NDSS'25): similarity of the query image to generations from its caption."""

    version = "1"
    Params = PangWangParams

    def access(self, query_access: QueryAccess) -> Access:
        return Access.BLACK_BOX_IMG2IMG if query_access is QueryAccess.IMAGE_TO_IMAGE else Access.BLACK_BOX

    def cost_per_query(self, config: AttackConfig, sampling: SamplingConfig) -> QueryCost:
        m = config.generations_per_query
        steps = sampling.num_inference_steps
        if config.query_access is QueryAccess.IMAGE_TO_IMAGE:
            # As `img2img` runs it: the last `strength` fraction of the schedule, at least one step.
            steps = min(steps, max(1, int(round(steps * config.strength))))
        per_step = 2 if sampling.guidance_scale != 1.0 else 1
        return QueryCost(images_generated=m, unet_calls=m * steps * per_step)

    # Scores through the run's configuration and encoder rather than `scorer` with params.
    score_checked = staticmethod(score_queries)

    def hyperparameters(self, config: AttackConfig) -> dict[str, object]:
        return {
            "encoder": config.encoder,
            "distance": config.distance,
            "generations_per_query": config.generations_per_query,
            "strength": config.strength if config.query_access is QueryAccess.IMAGE_TO_IMAGE else None,
        }


def fit_attack_model(config: AttackConfig, shadow_scores: np.ndarray, shadow_labels: np.ndarray) -> AttackModel:
    """Fit on the attacker's shadow model; the target's labels are never seen here."""
    return ATTACK_MODELS.get(config.attack_model)().fit(shadow_scores, shadow_labels)


# --- the model-free baseline --------------------------------------------------------------

BASELINE_FEATURES = ("embedding_norm", "embedding_std", "pixel_mean", "pixel_std")


def image_features(images: np.ndarray, encoder: ImageEncoder) -> np.ndarray:
    """Statistics of the query images alone (no model query): (N, len(BASELINE_FEATURES)).

    The model-free baseline feeds these to the same attack models. If members and
    non-members were drawn from different distributions, these would separate them
    without any model (CopyMark's warning); on a sound split it sits at AUC 0.5.
    """
    images = np.asarray(images, dtype=np.float32)
    with torch.no_grad():
        emb = encoder.embed(images).double()
    return np.stack(
        [
            emb.norm(dim=-1).mean(dim=-1).numpy(),
            emb.std(dim=(1, 2)).numpy(),
            images.mean(axis=(1, 2, 3)),
            images.std(axis=(1, 2, 3)),
        ],
        axis=1,
    ).astype(np.float64)


class ModelFreeBaseline:
    """The same attack model fed only `image_features` of the query images: no model query at all.

    Features are standardised on the shadow's queries (so a mean over columns, as
    threshold and distribution take, weighs them alike), then the attack model is
    fitted on the shadow and applied once to the target, like the real attack.
    """

    # Recorded with each result; bump when the features or their standardisation change.
    version = "1"

    def __init__(self, attack_model: str) -> None:
        self.attack_model_name = attack_model
        self.model = ATTACK_MODELS.get(attack_model)()
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def standardise(self, features: np.ndarray) -> np.ndarray:
        if self.mean is None or self.std is None:
            raise RuntimeError("fit the baseline on shadow features first")
        return (np.asarray(features, dtype=np.float64) - self.mean) / self.std

    def fit(self, shadow_features: np.ndarray, shadow_labels: np.ndarray) -> ModelFreeBaseline:
        features = np.asarray(shadow_features, dtype=np.float64)
        self.mean, self.std = features.mean(axis=0), features.std(axis=0) + 1e-12
        self.model.fit(self.standardise(features), shadow_labels)
        return self

    def membership_score(self, features: np.ndarray) -> np.ndarray:
        return self.model.membership_score(self.standardise(features))

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.model.predict(self.standardise(features))

    def describe(self) -> dict[str, object]:
        return {
            "name": "model_free",
            "attack_model": self.attack_model_name,
            "features": list(BASELINE_FEATURES),
            "standardised_on": "shadow queries",
        }
