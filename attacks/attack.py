"""Algorithm 1 of the paper: query with a caption, generate, embed, compare, fit, decide."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attacks.attack_models import ATTACK_MODELS, AttackModel
from attacks.distances import DISTANCES
from attacks.encoders import ENCODERS, ImageEncoder
from attacks.scenarios import Scenario
from benchmark.target import BlackBoxTarget

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class AttackConfig:
    scenario: Scenario = Scenario.III
    attack_model: str = "threshold"
    encoder: str = "pixels"
    distance: str = "cosine"
    generations_per_query: int = 3
    query_batch: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.generations_per_query < 1:
            raise ValueError(f"generations per query must be >= 1, got {self.generations_per_query}")
        ATTACK_MODELS.get(self.attack_model)
        ENCODERS.get(self.encoder)
        DISTANCES.get(self.distance)

    def to_dict(self) -> dict[str, object]:
        return {
            "scenario": self.scenario.value,
            "attack_model": self.attack_model,
            "encoder": self.encoder,
            "distance": self.distance,
            "generations_per_query": self.generations_per_query,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class Query:
    """What the attacker holds for one candidate: never its membership."""

    query_id: str
    image: np.ndarray
    caption: str


@dataclass
class ScoredQueries:
    query_ids: list[str]
    scores: np.ndarray  # (n_queries, generations_per_query)
    queries_spent: int
    images_generated: int


def score_queries(
    target: BlackBoxTarget,
    queries: Sequence[Query],
    config: AttackConfig,
    *,
    encoder: ImageEncoder | None = None,
    progress: ProgressFn | None = None,
) -> ScoredQueries:
    """Similarity of each query image to `m` generations from its caption.

    The query image never reaches the model: only its caption does.
    """
    encoder = encoder or ENCODERS.get(config.encoder)()
    similarity = DISTANCES.get(config.distance)
    before_q, before_i = target.query_count, target.images_generated
    rows = []
    for start in range(0, len(queries), config.query_batch):
        chunk = queries[start : start + config.query_batch]
        # One seed per batch position keeps scores independent of batching order.
        generated = target.generate(
            [q.caption for q in chunk], num_images=config.generations_per_query, seed=config.seed + start
        )
        n, m = generated.shape[:2]
        gen_emb = encoder.embed(generated.reshape(n * m, *generated.shape[2:]))
        query_emb = encoder.embed(np.stack([q.image for q in chunk]))
        gen_emb = gen_emb.reshape(n, m, *gen_emb.shape[1:])
        with torch.no_grad():
            rows.append(similarity(query_emb.unsqueeze(1), gen_emb).numpy())
        if progress is not None:
            progress(len(chunk))
    return ScoredQueries(
        query_ids=[q.query_id for q in queries],
        scores=np.concatenate(rows).astype(np.float64),
        queries_spent=target.query_count - before_q,
        images_generated=target.images_generated - before_i,
    )


def fit_attack_model(config: AttackConfig, shadow_scores: np.ndarray, shadow_labels: np.ndarray) -> AttackModel:
    """Fit on the attacker's shadow model; the target's labels are never seen here."""
    return ATTACK_MODELS.get(config.attack_model)().fit(shadow_scores, shadow_labels)
