"""Privacy metrics from per-query attack scores (members are the positive class).

Every figure comes with a seeded, stratified percentile-bootstrap interval: with a
hundred queries an AUC of 0.6 and one of 0.5 are often indistinguishable, and the
leaderboard must show that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score, roc_curve

LOW_FPRS = (0.01, 0.001)
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
Interval = tuple[float, float]


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
    ci: Interval | None = None

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["ci"] = None if self.ci is None else list(self.ci)
        return data


@dataclass(frozen=True)
class BootstrapSpec:
    """How the intervals were computed (recorded with them)."""

    n_resamples: int = BOOTSTRAP_RESAMPLES
    seed: int = BOOTSTRAP_SEED
    confidence: float = CONFIDENCE
    method: str = "percentile bootstrap, members and non-members resampled separately"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class PrivacyMetrics:
    auc: float
    balanced_accuracy: float | None
    tpr_at_fpr: tuple[TprAtFpr, ...]
    n_members: int
    n_nonmembers: int
    auc_ci: Interval | None = None
    balanced_accuracy_ci: Interval | None = None
    bootstrap: BootstrapSpec | None = None

    # Direction of each figure from the model owner's point of view: a weaker attack is better.
    HIGHER_IS_BETTER: ClassVar[dict[str, bool]] = {"auc": False, "balanced_accuracy": False, "tpr": False}

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
            "auc_ci": None if self.auc_ci is None else list(self.auc_ci),
            "balanced_accuracy_ci": None if self.balanced_accuracy_ci is None else list(self.balanced_accuracy_ci),
            "bootstrap": None if self.bootstrap is None else self.bootstrap.to_dict(),
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
    bootstrap: BootstrapSpec | None = BootstrapSpec(),
) -> PrivacyMetrics:
    """AUC, TPR at low FPR and (given hard decisions) balanced accuracy, with bootstrap intervals.

    Args:
        labels: 1 for members, 0 for non-members.
        scores: higher means "more likely a member".
        predictions: the attack's own hard decisions (threshold fitted on the shadow);
            balanced accuracy is the paper's ASR.
        bootstrap: how to compute the intervals; None (or 0 resamples) skips them.
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
        predictions = np.asarray(predictions).astype(bool)
        if predictions.shape != labels.shape:
            raise ValueError(f"{labels.shape[0]} labels but {predictions.shape[0]} predictions")
        balanced = float(balanced_accuracy_score(labels, predictions))
    tprs = tuple(tpr_at_fpr(labels, scores, f) for f in fprs)
    auc_ci = balanced_ci = None
    if bootstrap is not None and bootstrap.n_resamples > 0:
        intervals = bootstrap_intervals(labels, scores, predictions, fprs=fprs, spec=bootstrap)
        auc_ci, balanced_ci = intervals["auc"], intervals.get("balanced_accuracy")
        tprs = tuple(replace(t, ci=intervals[f"tpr@{t.target_fpr}"]) for t in tprs)
    else:
        bootstrap = None
    return PrivacyMetrics(
        auc=float(roc_auc_score(labels, scores)),
        balanced_accuracy=balanced,
        tpr_at_fpr=tprs,
        n_members=int(labels.sum()),
        n_nonmembers=int((~labels).sum()),
        auc_ci=auc_ci,
        balanced_accuracy_ci=balanced_ci,
        bootstrap=bootstrap,
    )


def bootstrap_intervals(
    labels: np.ndarray,
    scores: np.ndarray,
    predictions: np.ndarray | None = None,
    *,
    fprs: tuple[float, ...] = LOW_FPRS,
    spec: BootstrapSpec = BootstrapSpec(),
) -> dict[str, Interval]:
    """Percentile intervals, resampling members and non-members separately (both always present).

    Vectorised over resamples: AUC from rank sums (ties count one half, as
    roc_auc_score does); TPR at FPR <= f as the fraction of members scoring strictly
    above the (k+1)-th highest non-member, k = floor(f * N), which is exactly the
    last admissible ROC point that `tpr_at_fpr` picks.

    Returns:
        {"auc": (low, high), "tpr@<fpr>": ..., "balanced_accuracy": ... (given predictions)}
    """
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(spec.seed)
    pos, neg = scores[labels], scores[~labels]
    n1, n0, b = len(pos), len(neg), spec.n_resamples
    pos_idx = rng.integers(0, n1, size=(b, n1))
    neg_idx = rng.integers(0, n0, size=(b, n0))
    p, n = pos[pos_idx], neg[neg_idx]
    ranks = rankdata(np.concatenate([p, n], axis=1), axis=1)
    aucs = (ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    alpha = (1 - spec.confidence) / 2

    def interval(values: np.ndarray) -> Interval:
        low, high = np.quantile(values, [alpha, 1 - alpha])
        return float(low), float(high)

    out = {"auc": interval(aucs)}
    neg_sorted = -np.sort(-n, axis=1)  # descending per resample
    for fpr in fprs:
        allowed = int(np.floor(fpr * n0 + 1e-9))
        if allowed >= n0:
            tpr = np.ones(b)
        else:
            tpr = (p > neg_sorted[:, allowed, None]).mean(axis=1)
        out[f"tpr@{fpr}"] = interval(tpr)
    if predictions is not None:
        predictions = np.asarray(predictions).astype(bool)
        tpr_hard = predictions[labels][pos_idx].mean(axis=1)
        tnr_hard = 1 - predictions[~labels][neg_idx].mean(axis=1)
        out["balanced_accuracy"] = interval((tpr_hard + tnr_hard) / 2)
    return out
