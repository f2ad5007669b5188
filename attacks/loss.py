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

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from attacks.attack import AttackConfig, ProgressFn, Query, ScoredQueries
from attacks.encoders import ImageEncoder
from attacks.families import Access, AttackFamily, AttackFamilyError, QueryCost, register_attack_family
from attacks.scenarios import QueryAccess
from benchmark.pipeline.target import BlackBoxTarget, GrayBoxTarget, SamplingConfig


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


@register_attack_family("loss")
class LossAttack(AttackFamily):
    """-||eps_theta(z_t, t, c) - eps||^2 at fixed timesteps, one feature per (t, eps) pair."""

    version = "1"
    Params = LossParams

    def access(self, query_access: QueryAccess) -> Access:
        if query_access is QueryAccess.IMAGE_TO_IMAGE:
            raise AttackFamilyError(
                f"attack {self.name!r} needs gray-box access, not --query-access img2img; "
                "drop --query-access or pick --attack pang-wang"
            )
        return Access.GRAY_BOX

    def cost_per_query(self, config: AttackConfig, sampling: SamplingConfig) -> QueryCost:
        return QueryCost(images_generated=0, unet_calls=self.params.pairs)

    def score(
        self,
        target: BlackBoxTarget | GrayBoxTarget,
        queries: Sequence[Query],
        config: AttackConfig,
        *,
        encoder: ImageEncoder | None = None,
        progress: ProgressFn | None = None,
    ) -> ScoredQueries:
        if not isinstance(target, GrayBoxTarget):
            raise TypeError(f"attack {self.name!r} needs a gray-box target, got {type(target)}")
        missing = [q.query_id for q in queries if q.caption is None]
        if missing:
            raise ValueError(f"{len(missing)} queries have no caption (e.g. {missing[0]!r}); run caption_queries first")
        steps = self.params.model_timesteps(target.num_train_timesteps)
        k = len(steps)
        before_u, before_s = target.unet_calls, target.seconds_generating
        started = time.perf_counter()
        rows = []
        for start in range(0, len(queries), config.query_batch):
            chunk = queries[start : start + config.query_batch]
            images = np.repeat(np.stack([q.image for q in chunk]), k, axis=0)
            captions = [q.caption for q in chunk for _ in range(k)]
            # One seed per batch start, as the black-box attack: reproducible for a fixed batch size.
            answer = target.predict_noise(
                images, captions, timesteps=np.tile(steps, len(chunk)), seed=config.seed + start
            )
            error = (
                ((answer.prediction.astype(np.float64) - answer.noise) ** 2).reshape(len(chunk) * k, -1).mean(axis=1)
            )
            rows.append(-error.reshape(len(chunk), k))
            if progress is not None:
                progress(len(chunk))
        return ScoredQueries(
            query_ids=[q.query_id for q in queries],
            captions=[str(q.caption) for q in queries],
            scores=np.concatenate(rows) if rows else np.zeros((0, k)),
            # One query = one candidate (image, caption), as for the black box; `unet_calls` is the cost.
            queries_spent=len(queries),
            images_generated=0,
            seconds_in_model=target.seconds_generating - before_s,
            seconds_total=time.perf_counter() - started,
            unet_calls=target.unet_calls - before_u,
        )

    def hyperparameters(self, config: AttackConfig) -> dict[str, object]:
        return {
            "timesteps": list(self.params.timesteps),
            "schedule_steps": self.params.schedule_steps,
            "draws_per_timestep": self.params.draws_per_timestep,
            "pairs": self.params.pairs,
            "reduction": "mean over latent elements",
            "noise_seed": config.seed,
        }
