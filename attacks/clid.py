"""CLiD: conditional likelihood discrepancy (Zhai et al., NeurIPS 2024), a gray-box attack.

Fine-tuned text-to-image models overfit p(x | c) more than p(x): a member's denoising error
rises more than a non-member's when its caption is weakened. Following the paper
(Eqs. 13-18, App. D), for shared (t_i, eps_i), i = 1..M, with t in {440, 450, 460}:

* Eq. 13-15 (the discrepancy, a Monte-Carlo estimate of the KL gap between the conditional
  and the weakened-condition likelihood)::

    D_j = mean_i [ ||eps_theta(x_{t_i}, t_i, c*_j) - eps_i||^2 - ||eps_theta(x_{t_i}, t_i, c) - eps_i||^2 ]

* Eq. 16 (the likelihood term, reusing the same queries)::

    L = -mean_i ||eps_theta(x_{t_i}, t_i, c) - eps_i||^2

* Eq. 17 (CLiD_th): alpha * S(mean_j D_j) + (1 - alpha) * S(L) > tau, with S a robust scaler
  (a - median) / IQR; `CLiDThreshold` fits S, alpha and tau on the shadow. It is the attack
  model `clid_th` (`--attack clid --attack-model clid_th`), for this family's features only.
* Eq. 18 (CLiD_vec): a classifier on (D_1..D_J, L); the harness's `classifier` attack model
  on `score_clid`'s feature matrix plays that role.

Reduced conditions c*_j. The paper's main choice, *importance clipping*, replaces words by
`<pad>` in order of their gradient importance; gray-box access gives no gradients, so this
module implements the paper's gradient-free alternative of clipping the sentence: c*_j keeps
the leading words of the caption and drops the last round(f_j * n_words) words, for
f_j in {0.3, 0.5, 0.7} (words are deleted, not replaced by `<pad>`: the tokenizer pads the
shorter prompt anyway). The last reduced condition is the null caption (None). A caption of
one word is unchanged by the 30% clip, so that D_j is exactly 0 for it.

Squared norms are means over latent elements (the papers' sums divided by a constant), so
scores do not depend on the latent size. Every column of the features is oriented so that
higher means more member-like.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from attacks import families
from attacks.attack import Query
from attacks.attack_models import AttackModel, register_attack_model
from attacks.families import GrayBoxFamily, QueryCost, ScoredQueries, register_attack_family
from attacks.gray_box import (
    NoisePredictor,
    RobustScaler,
    check_paper_timestep,
    query_images,
    scale_timestep,
    squared_error,
)
from benchmark.kernel.errors import ConfigError


@dataclass(frozen=True)
class CLiDParams:
    """CLiD's hyperparameters; defaults are the paper's (App. D: M = N = 3, t in {440, 450, 460})."""

    timesteps: tuple[int, ...] = field(
        default=(440, 450, 460), metadata={"help": "timesteps on the 1000-step scale (rescaled to the target's)"}
    )
    samples_per_timestep: int = field(default=1, metadata={"help": "noise draws per timestep", "min": 1, "max": 64})
    clip_fractions: tuple[float, ...] = field(
        default=(0.3, 0.5, 0.7), metadata={"help": "fractions of trailing caption words dropped, one c*_j each"}
    )
    include_null_caption: bool = field(default=True, metadata={"help": "add the null caption as the last c*_j"})

    def __post_init__(self) -> None:
        if not self.timesteps:
            raise ConfigError("CLiD timesteps: give at least one timestep")
        for t in self.timesteps:
            check_paper_timestep("CLiD timestep", t)
        if self.samples_per_timestep < 1:
            raise ConfigError(f"CLiD samples_per_timestep must be >= 1, got {self.samples_per_timestep}")
        for f in self.clip_fractions:
            if not 0.0 < f < 1.0:
                raise ConfigError(f"CLiD clip fractions must be in (0, 1) (1 is the null caption), got {f}")
        if len(set(self.clip_fractions)) != len(self.clip_fractions):
            raise ConfigError(f"CLiD clip fractions must be distinct, got {self.clip_fractions}")
        if not self.clip_fractions and not self.include_null_caption:
            raise ConfigError("CLiD needs at least one reduced condition (a clip fraction or the null caption)")

    @property
    def num_conditions(self) -> int:
        """Reduced conditions c*_j (J)."""
        return len(self.clip_fractions) + int(self.include_null_caption)

    @property
    def pairs(self) -> int:
        """(t_i, eps_i) pairs (M in the paper)."""
        return len(self.timesteps) * self.samples_per_timestep

    @property
    def feature_names(self) -> tuple[str, ...]:
        names = [f"D_clip{round(f * 100)}" for f in self.clip_fractions]
        if self.include_null_caption:
            names.append("D_null")
        return (*names, "L")

    def derived(self) -> dict[str, object]:
        """Settings the record holds beside these fields."""
        return {
            "reduced_conditions": "trailing-word clipping + null caption (gradient-free; no importance clipping)",
            "features": list(self.feature_names),
        }

    def cost_per_query(self) -> QueryCost:
        """M x (1 + J) denoiser calls (3 x 5 = 15 with the defaults, as in the paper)."""
        return QueryCost(images_generated=0, unet_calls=self.pairs * (1 + self.num_conditions))


def clip_caption(caption: str, fraction: float) -> str:
    """Drop the last round(fraction * n_words) words (half rounds up)."""
    words = caption.split()
    drop = math.floor(fraction * len(words) + 0.5)
    return " ".join(words[: len(words) - drop])


def reduced_conditions(caption: str, params: CLiDParams) -> list[str | None]:
    conditions: list[str | None] = [clip_caption(caption, f) for f in params.clip_fractions]
    if params.include_null_caption:
        conditions.append(None)
    return conditions


@families.batched_scorer(CLiDParams, query_batch=64)
def score_clid(
    target: NoisePredictor, queries: Sequence[Query], params: CLiDParams, run: families.ScoringRun
) -> ScoredQueries:
    """CLiD features (D_1..D_J, L) per query, higher = member in every column.

    Raises:
        ValueError: a query has no caption (CLiD needs one; caption it first).
    """
    families.require_captions(queries, "CLiD")
    images = query_images(queries)
    captions = [str(q.caption) for q in queries]
    steps = [scale_timestep(t, target.num_train_timesteps) for t in params.timesteps]
    pairs = [t for t in steps for _ in range(params.samples_per_timestep)]
    j = params.num_conditions
    for start in range(0, len(queries), run.query_batch):
        chunk = images[start : start + run.query_batch]
        chunk_captions = captions[start : start + run.query_batch]
        n = len(chunk)
        reduced = [reduced_conditions(c, params) for c in chunk_captions]
        flat_captions = [reduced[i][c] for c in range(j) for i in range(n)]
        cond_error = np.zeros(n)
        reduced_error = np.zeros((n, j))
        for index, t in enumerate(pairs):
            with run.in_model(n * (1 + j)):
                # One (t_i, eps_i) per pair, shared by the full caption and every reduced one.
                full = target.predict_noise(
                    chunk, chunk_captions, timesteps=[t] * n, seed=run.seed + start * len(pairs) + index
                )
                noise = np.asarray(full.noise, dtype=np.float32)
                repeated = np.concatenate([noise] * j)
                # All J reduced conditions in one call: the image rows repeated per condition.
                weakened = target.predict_noise(
                    np.concatenate([chunk] * j), flat_captions, timesteps=[t] * (n * j), noise=repeated
                )
            cond_error += squared_error(full.prediction, noise)
            reduced_error += squared_error(weakened.prediction, repeated).reshape(j, n).T
        cond_error /= len(pairs)
        reduced_error /= len(pairs)
        run.add(np.column_stack([reduced_error - cond_error[:, None], -cond_error]))
    return run.result(queries, j + 1, captions)


@register_attack_family("clid")
class CLiD(GrayBoxFamily):
    """CLiD (Zhai et al., NeurIPS'24): features (D_1..D_J, L); see the module docstring."""

    version, Params, scorer = "1", CLiDParams, staticmethod(score_clid)


@register_attack_model("clid_th")
class CLiDThreshold(AttackModel):
    """CLiD_th (Eq. 17): alpha * S(mean_j D_j) + (1 - alpha) * S(L), fitted on the shadow only.

    S is a robust scaler (median / IQR) per term, fitted on all shadow queries. alpha is the
    value on a grid of `alpha_steps` + 1 points in [0, 1] with the best shadow AUC (ties go
    to the alpha nearest 0.5); tau maximises Youden's J on the shadow. Input: `score_clid`'s
    features (D_1..D_J, L), L last.
    """

    version = "1"
    # Column j < J is D_j and the last is L: another family's score vector has no such meaning.
    families = frozenset({"clid"})
    min_features = 2

    def __init__(self, *, alpha: float | None = None, alpha_steps: int = 20) -> None:
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"CLiD alpha must be in [0, 1], got {alpha}")
        if alpha_steps < 1:
            raise ConfigError(f"CLiD alpha_steps must be >= 1, got {alpha_steps}")
        self.fixed_alpha = alpha
        self.alpha_steps = alpha_steps
        self.alpha: float | None = None
        self.threshold: float | None = None
        self.scale_d: RobustScaler | None = None
        self.scale_l: RobustScaler | None = None

    @staticmethod
    def terms(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] < 2 or not np.isfinite(features).all():
            raise ValueError("CLiD features must be a finite (n_queries, J + 1) array with L last, J >= 1")
        return features[:, :-1].mean(axis=1), features[:, -1]

    def combine(self, d: np.ndarray, loss: np.ndarray, alpha: float) -> np.ndarray:
        assert self.scale_d is not None and self.scale_l is not None
        return alpha * self.scale_d(d) + (1.0 - alpha) * self.scale_l(loss)

    def fit(self, features: np.ndarray, labels: np.ndarray) -> CLiDThreshold:
        d, loss = self.terms(features)
        labels = np.asarray(labels).astype(bool)
        if labels.shape != d.shape:
            raise ValueError(f"{len(d)} feature rows but labels of shape {labels.shape}")
        if labels.all() or not labels.any():
            raise ValueError("the shadow needs both members and non-members to fit CLiD_th")
        self.scale_d, self.scale_l = RobustScaler.fit(d), RobustScaler.fit(loss)
        if self.fixed_alpha is not None:
            self.alpha = self.fixed_alpha
        else:
            grid = np.linspace(0.0, 1.0, self.alpha_steps + 1)
            aucs = [roc_auc_score(labels, self.combine(d, loss, a)) for a in grid]
            best = max(aucs)
            candidates = [a for a, auc in zip(grid, aucs, strict=True) if auc >= best - 1e-12]
            self.alpha = float(min(candidates, key=lambda a: abs(a - 0.5)))
        combined = self.combine(d, loss, self.alpha)
        fpr, tpr, thresholds = roc_curve(labels, combined)
        best_index = int(np.argmax(tpr - fpr))
        self.threshold = float(min(thresholds[best_index], combined.max()))
        return self

    def membership_score(self, features: np.ndarray) -> np.ndarray:
        if self.alpha is None:
            raise RuntimeError("fit CLiD_th on shadow features first")
        d, loss = self.terms(features)
        return self.combine(d, loss, self.alpha)

    def predict(self, features: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise RuntimeError("fit CLiD_th on shadow features first")
        return self.membership_score(features) >= self.threshold

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "alpha": self.alpha,
            "alpha_fitted": self.fixed_alpha is None,
            "threshold": self.threshold,
            "scaler_mean_d": None if self.scale_d is None else asdict(self.scale_d),
            "scaler_l": None if self.scale_l is None else asdict(self.scale_l),
        }
