"""Privacy metrics from per-query attack scores (members are the positive class)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score, roc_curve

LOW_FPRS = (0.01, 0.001)


@dataclass(frozen=True)
class TprAtFpr:
    """TPR at the last ROC point whose FPR does not exceed `target_fpr`."""

    target_fpr: float
    tpr: float
    realised_fpr: float
    threshold: float
    n_nonmembers: int
    # With N non-members the smallest non-zero FPR is 1/N: below that the figure
    # says nothing about the target FPR.
    supported: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class PrivacyMetrics:
    auc: float
    balanced_accuracy: float | None
    tpr_at_fpr: tuple[TprAtFpr, ...]
    n_members: int
    n_nonmembers: int

    def tpr(self, target_fpr: float) -> TprAtFpr:
        for entry in self.tpr_at_fpr:
            if math.isclose(entry.target_fpr, target_fpr):
                return entry
        raise KeyError(f"TPR at FPR {target_fpr} was not computed")

    def to_dict(self) -> dict[str, object]:
        return {
            "auc": self.auc,
            "balanced_accuracy": self.balanced_accuracy,
            "tpr_at_fpr": [t.to_dict() for t in self.tpr_at_fpr],
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
        }


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, target_fpr: float) -> TprAtFpr:
    labels = np.asarray(labels).astype(bool)
    # Keep every point: with tied scores the dropped ones can hide the admissible TPR.
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    n_non = int((~labels).sum())
    # roc_curve's FPRs are non-decreasing: the last admissible point has the highest TPR.
    index = int(np.flatnonzero(fpr <= target_fpr + 1e-12)[-1])
    threshold = float(thresholds[index])
    if not np.isfinite(threshold):
        # roc_curve's "flag nobody" point is +inf; the next float above the top score
        # means the same and stays valid JSON.
        threshold = float(np.nextafter(np.max(scores), np.inf))
    return TprAtFpr(
        target_fpr=target_fpr,
        tpr=float(tpr[index]),
        realised_fpr=float(fpr[index]),
        threshold=threshold,
        n_nonmembers=n_non,
        supported=n_non * target_fpr >= 1.0,
    )


def privacy_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    predictions: np.ndarray | None = None,
    *,
    fprs: tuple[float, ...] = LOW_FPRS,
) -> PrivacyMetrics:
    """AUC, TPR at low FPR and (given hard decisions) balanced accuracy.

    Args:
        labels: 1 for members, 0 for non-members.
        scores: higher means "more likely a member".
        predictions: the attack's own hard decisions (threshold fitted on the shadow);
            balanced accuracy is the paper's ASR.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.shape[0]} labels but {scores.shape[0]} scores")
    if labels.all() or not labels.any():
        raise ValueError("privacy metrics need both members and non-members")
    if not np.isfinite(scores).all():
        raise ValueError("attack scores contain NaN or infinity")
    balanced = None
    if predictions is not None:
        balanced = float(balanced_accuracy_score(labels, np.asarray(predictions).astype(bool)))
    return PrivacyMetrics(
        auc=float(roc_auc_score(labels, scores)),
        balanced_accuracy=balanced,
        tpr_at_fpr=tuple(tpr_at_fpr(labels, scores, f) for f in fprs),
        n_members=int(labels.sum()),
        n_nonmembers=int((~labels).sum()),
    )
