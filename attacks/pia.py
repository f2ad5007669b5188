"""PIA / PIAN: proximal initialization attack (Kong et al., ICLR 2024), a gray-box attack.

Instead of a random eps, PIA noises x0 with the model's own prediction at t = 0 (its
"proximal initialisation"), then asks the model to recover it at t (paper Eq. 9-10, the
reference code's `PIA` attacker in kong13661/PIA `DDPM/components.py`)::

    eps_0 = eps_theta(x_0, 0, c)
    x_t   = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_0
    score = || eps_theta(x_t, t, c) - eps_0 ||_p^p          (p = 4; small = member)

Through the gray-box interface: `predict_noise(x0, c, timesteps=0)` gives eps_0 (the
interface noises x0 to t = 0 first, by sqrt(1 - abar_0), about 0.01 on Stable Diffusion's
schedule: negligible next to the reference's clean x0), then
`predict_noise(x0, c, timesteps=t, noise=eps_0)`. PIAN (the paper's normalised variant)
first rescales eps_0 <- eps_0 / mean|eps_0| * sqrt(2 / pi) so it has the mean absolute value
of a standard normal.

The feature is -mean |eps_theta(x_t, t, c) - eps_0|^p (a mean over latent elements rather
than the reference's sum), one column, higher = member. A query without a caption uses the
null caption (the paper's "no text" setting).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from attacks.attack import AttackConfig, ProgressFn, Query, ScoredQueries
from attacks.encoders import ImageEncoder
from attacks.families import Access, AttackFamily, AttackFamilyError, QueryCost, register_attack_family
from attacks.gray_box import NoisePredictor, check_paper_timestep, query_images, scale_timestep
from attacks.scenarios import QueryAccess
from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.target import BlackBoxTarget, GrayBoxTarget, SamplingConfig

FEATURE_NAMES = ("neg_lp_error",)


@dataclass(frozen=True)
class PIAParams:
    """PIA's hyperparameters; defaults are the paper's Stable Diffusion setting (t = 500, p = 4)."""

    timestep: int = field(
        default=500, metadata={"help": "attack timestep on the 1000-step scale", "min": 1, "max": 999}
    )
    lp: float = field(default=4.0, metadata={"help": "exponent p of the error norm", "min": 1})
    normalized: bool = field(default=False, metadata={"help": "PIAN: rescale eps_0 to a standard normal's mean |.|"})

    def __post_init__(self) -> None:
        check_paper_timestep("PIA timestep", self.timestep)
        if not self.lp >= 1.0:
            raise ConfigError(f"PIA lp must be >= 1, got {self.lp}")

    @property
    def feature_names(self) -> tuple[str, ...]:
        return FEATURE_NAMES

    def cost_per_query(self) -> QueryCost:
        """Two denoiser calls: eps_0 at t = 0, then the prediction at t."""
        return QueryCost(images_generated=0, unet_calls=2)


def normalize_noise(eps: np.ndarray) -> np.ndarray:
    """PIAN: eps / mean|eps| * sqrt(2 / pi), per image."""
    eps = np.asarray(eps, dtype=np.float64)
    scale = np.abs(eps).reshape(len(eps), -1).mean(axis=1)
    scale = np.where(scale > 0, scale, 1.0).reshape(-1, *([1] * (eps.ndim - 1)))
    return (eps / scale * np.sqrt(2.0 / np.pi)).astype(np.float32)


def score_pia(
    target: NoisePredictor,
    queries: Sequence[Query],
    params: PIAParams = PIAParams(),
    *,
    query_batch: int = 64,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> ScoredQueries:
    """PIA's score per query as an (N, 1) feature matrix, higher = member."""
    if query_batch < 1:
        raise ConfigError(f"query_batch must be >= 1, got {query_batch}")
    images = query_images(queries)
    captions: list[str | None] = [q.caption for q in queries]
    t = scale_timestep(params.timestep, target.num_train_timesteps)
    started = time.perf_counter()
    model_seconds = 0.0
    calls = 0
    rows = []
    for start in range(0, len(queries), query_batch):
        chunk = images[start : start + query_batch]
        chunk_captions = captions[start : start + query_batch]
        n = len(chunk)
        tick = time.perf_counter()
        first = target.predict_noise(chunk, chunk_captions, timesteps=[0] * n, seed=seed + start)
        eps0 = np.asarray(first.prediction, dtype=np.float32)
        if params.normalized:
            eps0 = normalize_noise(eps0)
        back = target.predict_noise(chunk, chunk_captions, timesteps=[t] * n, noise=eps0, seed=seed + start)
        model_seconds += time.perf_counter() - tick
        calls += 2 * n
        diff = np.abs(np.asarray(back.prediction, dtype=np.float64) - eps0.astype(np.float64))
        rows.append(-(diff**params.lp).reshape(n, -1).mean(axis=1))
        if progress is not None:
            progress(n)
    return ScoredQueries(
        query_ids=[q.query_id for q in queries],
        captions=["" if c is None else c for c in captions],
        scores=np.concatenate(rows)[:, None].astype(np.float64),
        queries_spent=len(queries),
        images_generated=0,
        seconds_in_model=model_seconds,
        seconds_total=time.perf_counter() - started,
        unet_calls=calls,
    )


@register_attack_family("pia")
class PIA(AttackFamily):
    """PIA / PIAN (Kong et al., ICLR'24): one feature, -||eps_theta(x_t, t, c) - eps_0||_p^p."""

    version = "1"
    Params = PIAParams

    def access(self, query_access: QueryAccess) -> Access:
        if query_access is QueryAccess.IMAGE_TO_IMAGE:
            raise AttackFamilyError(
                f"attack {self.name!r} needs gray-box access, not --query-access img2img; "
                "drop --query-access or pick --attack pang-wang or rediffuse"
            )
        return Access.GRAY_BOX

    def cost_per_query(self, config: AttackConfig, sampling: SamplingConfig) -> QueryCost:
        return self.params.cost_per_query()

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
            raise TypeError(f"attack {self.name!r} needs a gray-box target, got {target!r}")
        return score_pia(
            target, queries, self.params, query_batch=config.query_batch, seed=config.seed, progress=progress
        )

    def hyperparameters(self, config: AttackConfig) -> dict[str, object]:
        return {
            **super().hyperparameters(config),
            "variant": "PIAN" if self.params.normalized else "PIA",
            "reduction": "mean over latent elements",
            "noise_seed": config.seed,
        }
