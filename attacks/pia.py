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

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from attacks.attack import Query
from attacks.families import GrayBoxFamily, QueryCost, ScoredQueries, ScoringRun, batched_scorer, register_attack_family
from attacks.gray_box import NoisePredictor, check_paper_timestep, query_images, scale_timestep
from benchmark.kernel.errors import ConfigError

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

    def derived(self) -> dict[str, object]:
        """Settings the record holds beside these fields."""
        return {"variant": "PIAN" if self.normalized else "PIA"}

    def cost_per_query(self) -> QueryCost:
        """Two denoiser calls: eps_0 at t = 0, then the prediction at t."""
        return QueryCost(images_generated=0, unet_calls=2)


def normalize_noise(eps: np.ndarray) -> np.ndarray:
    """PIAN: eps / mean|eps| * sqrt(2 / pi), per image."""
    eps = np.asarray(eps, dtype=np.float64)
    scale = np.abs(eps).reshape(len(eps), -1).mean(axis=1)
    scale = np.where(scale > 0, scale, 1.0).reshape(-1, *([1] * (eps.ndim - 1)))
    return (eps / scale * np.sqrt(2.0 / np.pi)).astype(np.float32)


@batched_scorer(PIAParams, query_batch=64)
def score_pia(target: NoisePredictor, queries: Sequence[Query], params: PIAParams, run: ScoringRun) -> ScoredQueries:
    """PIA's score per query as an (N, 1) feature matrix, higher = member."""
    images = query_images(queries)
    captions: list[str | None] = [q.caption for q in queries]
    t = scale_timestep(params.timestep, target.num_train_timesteps)
    for start in range(0, len(queries), run.query_batch):
        chunk = images[start : start + run.query_batch]
        chunk_captions = captions[start : start + run.query_batch]
        n = len(chunk)
        with run.in_model(2 * n):
            first = target.predict_noise(chunk, chunk_captions, timesteps=[0] * n, seed=run.seed + start)
            eps0 = np.asarray(first.prediction, dtype=np.float32)
            if params.normalized:
                eps0 = normalize_noise(eps0)
            back = target.predict_noise(chunk, chunk_captions, timesteps=[t] * n, noise=eps0, seed=run.seed + start)
        diff = np.abs(np.asarray(back.prediction, dtype=np.float64) - eps0.astype(np.float64))
        run.add(-(diff**params.lp).reshape(n, -1).mean(axis=1)[:, None])
    return run.result(queries, 1, ["" if c is None else c for c in captions])


@register_attack_family("pia")
class PIA(GrayBoxFamily):
    """PIA / PIAN (Kong et al., ICLR'24): one feature, -||eps_theta(x_t, t, c) - eps_0||_p^p."""

    version, Params, scorer = "1", PIAParams, staticmethod(score_pia)
