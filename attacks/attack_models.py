"""Attack models: fitted on shadow-model scores only, then applied once to the target."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
from sklearn.metrics import roc_curve

from benchmark.registry import Registry


class AttackModel(ABC):
    """Turns per-query score vectors (n_queries, n_generations) into membership scores."""

    name: str = "?"

    @abstractmethod
    def fit(self, scores: np.ndarray, labels: np.ndarray) -> AttackModel:
        """Fit on the attacker's own shadow model, whose membership the attacker knows."""

    @abstractmethod
    def membership_score(self, scores: np.ndarray) -> np.ndarray:
        """Continuous score, higher = more likely member (for ROC metrics)."""

    @abstractmethod
    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Hard member / non-member decisions (for the paper's ASR)."""

    @abstractmethod
    def describe(self) -> dict[str, object]: ...


ATTACK_MODELS: Registry[Callable[[], AttackModel]] = Registry("attack model")


def register_attack_model(name: str) -> Callable[[type[AttackModel]], type[AttackModel]]:
    def decorator(cls: type[AttackModel]) -> type[AttackModel]:
        cls.name = name
        ATTACK_MODELS.add(name, cls)
        return cls

    return decorator


def _check(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.ndim != 2 or not np.isfinite(scores).all():
        raise ValueError("scores must be a finite (n_queries, n_generations) array")
    return scores


@register_attack_model("threshold")
class ThresholdAttack(AttackModel):
    """Mean similarity over generations; threshold chosen on the shadow by Youden's J."""

    def __init__(self) -> None:
        self.threshold: float | None = None

    def fit(self, scores: np.ndarray, labels: np.ndarray) -> ThresholdAttack:
        reduced = _check(scores).mean(axis=1)
        labels = np.asarray(labels).astype(bool)
        if labels.all() or not labels.any():
            raise ValueError("the shadow needs both members and non-members to fit a threshold")
        fpr, tpr, thresholds = roc_curve(labels, reduced)
        best = int(np.argmax(tpr - fpr))
        # roc_curve's first threshold is +inf; a finite one keeps the record valid JSON.
        self.threshold = (
            float(thresholds[best]) if np.isfinite(thresholds[best]) else float(np.nextafter(reduced.max(), np.inf))
        )
        return self

    def membership_score(self, scores: np.ndarray) -> np.ndarray:
        return _check(scores).mean(axis=1)

    def predict(self, scores: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise RuntimeError("fit the attack model on shadow scores first")
        return self.membership_score(scores) >= self.threshold

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "reduction": "mean", "selection": "youden_j_on_shadow", "threshold": self.threshold}
