"""The loss attack (Matsumoto et al. SPW'23; Carlini et al. USENIX'23), gray-box.

Per query: encode the image, add noise eps at a fixed timestep t, and read the
model's noise prediction; the feature is the negated denoising error
-mean((eps_theta(z_t, t, c) - eps)^2), one per (t, eps) pair. Members were trained
to denoise exactly these images, so their error is lower. With several pairs
("M.C." in CLiD's tables) the attack models average them (threshold) or fit on
the vector (distribution, classifier), just as they do Pang & Wang's
per-generation similarities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from attacks import families
from attacks.attack import Query
from attacks.families import GrayBoxFamily, QueryCost, ScoredQueries, register_attack_family
from benchmark.pipeline.target import GrayBoxTarget


@dataclass(frozen=True)
class LossParams:
    """Defaults as CLiD evaluates the loss baselines on Stable Diffusion: t in {440, 450, 460}
    of a 1,000-step schedule, one noise draw each (3 (t, eps) pairs, "M.C.")."""

    timesteps: tuple[int, ...] = field(
        default=(440, 450, 460),
        metadata={"help": "timesteps on a `schedule_steps` schedule, scaled to the model's own"},
    )
    schedule_steps: int = field(
        default=1000, metadata={"help": "the schedule length `timesteps` refer to (SD: 1000)", "min": 1}
    )
    draws_per_timestep: int = field(default=1, metadata={"help": "noise draws per timestep", "min": 1, "max": 64})

    def __post_init__(self) -> None:
        if not self.timesteps:
            raise ValueError("timesteps: give at least one timestep")
        bad = [t for t in self.timesteps if not 0 <= t < self.schedule_steps]
        if bad:
            raise ValueError(f"timesteps must be in [0, {self.schedule_steps}) (schedule_steps), got {bad}")

    def model_timesteps(self, num_train_timesteps: int) -> list[int]:
        """The timesteps scaled to a model trained on `num_train_timesteps`, one per (t, eps) pair."""
        scaled = [
            min(num_train_timesteps - 1, round(t * num_train_timesteps / self.schedule_steps)) for t in self.timesteps
        ]
        return [t for t in scaled for _ in range(self.draws_per_timestep)]

    @property
    def pairs(self) -> int:
        return len(self.timesteps) * self.draws_per_timestep

    def derived(self) -> dict[str, object]:
        """Settings the record holds beside these fields."""
        return {"pairs": self.pairs}

    def cost_per_query(self) -> QueryCost:
        """One denoiser call per (t, eps) pair."""
        return QueryCost(images_generated=0, unet_calls=self.pairs)


@families.batched_scorer(LossParams, query_batch=64)
def score_loss(
    target: GrayBoxTarget, queries: Sequence[Query], params: LossParams, run: families.ScoringRun
) -> ScoredQueries:
    """The negated denoising error per query and (t, eps) pair: (N, pairs), higher = member."""
    families.require_captions(queries)
    steps = params.model_timesteps(target.num_train_timesteps)
    k = len(steps)
    for start in range(0, len(queries), run.query_batch):
        chunk = queries[start : start + run.query_batch]
        images = np.repeat(np.stack([q.image for q in chunk]), k, axis=0)
        captions = [q.caption for q in chunk for _ in range(k)]
        # One seed per batch start, as the black-box attack: reproducible for a fixed batch size.
        with run.in_model(len(chunk) * k):
            answer = target.predict_noise(images, captions, timesteps=np.tile(steps, len(chunk)), seed=run.seed + start)
        error = ((answer.prediction.astype(np.float64) - answer.noise) ** 2).reshape(len(chunk) * k, -1).mean(axis=1)
        run.add(-error.reshape(len(chunk), k))
    return run.result(queries, k)


@register_attack_family("loss")
class LossAttack(GrayBoxFamily):
    """-||eps_theta(z_t, t, c) - eps||^2 at fixed timesteps, one feature per (t, eps) pair."""

    version, Params, scorer = "1", LossParams, staticmethod(score_loss)
