"""Privacy metrics: AUC, TPR at low FPR (with its support), balanced accuracy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from benchmark.pipeline.privacy_metrics import privacy_metrics, tpr_at_fpr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + 0.5 * labels
    result = privacy_metrics(labels, scores)
    assert result.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result.n_members == int(labels.sum())
    assert result.n_nonmembers == int((1 - labels).sum())
    assert result.balanced_accuracy is None


def _known_roc() -> tuple[np.ndarray, np.ndarray]:
    """100 non-members scored 0..99; 20 members placed around the top non-members.

    Members: 5 above everything (100..104), 5 at 99.5 (above every non-member),
    5 at 98.5 (only the non-member at 99 beats them), 5 at 10.5.
    At FPR <= 1% (one non-member allowed): threshold 98.5, TPR 15/20.
    At FPR <= 0.1% (no non-member allowed): threshold 99.5, TPR 10/20.
    """
    nonmembers = np.arange(100, dtype=float)
    members = np.r_[np.arange(100, 105), [99.5] * 5, [98.5] * 5, [10.5] * 5].astype(float)
    scores = np.r_[members, nonmembers]
    labels = np.r_[np.ones(20), np.zeros(100)].astype(int)
    return labels, scores


def test_known_roc_gives_known_tpr_at_low_fpr() -> None:
    labels, scores = _known_roc()
    result = privacy_metrics(labels, scores)
    at1 = result.tpr(0.01)
    assert at1.tpr == pytest.approx(0.75)
    assert at1.realised_fpr == pytest.approx(0.01)
    assert at1.threshold == pytest.approx(98.5)
    assert at1.n_nonmembers == 100
    assert at1.supported is True
    at01 = result.tpr(0.001)
    assert at01.tpr == pytest.approx(0.5)
    assert at01.realised_fpr == 0.0
    assert at01.threshold == pytest.approx(99.5)
    assert at01.supported is False
    # The threshold means what it says: flagging scores >= threshold gives those rates.
    for entry in (at1, at01):
        flagged = scores >= entry.threshold
        assert flagged[labels == 1].mean() == pytest.approx(entry.tpr)
        assert flagged[labels == 0].mean() == pytest.approx(entry.realised_fpr)
        assert entry.realised_fpr <= entry.target_fpr


def test_tpr_lookup_for_uncomputed_fpr_raises() -> None:
    labels, scores = _known_roc()
    with pytest.raises(KeyError):
        privacy_metrics(labels, scores).tpr(0.05)


@pytest.mark.parametrize(("n_nonmembers", "supported"), [(50, False), (99, False), (100, True), (1000, True)])
def test_supported_needs_one_over_fpr_nonmembers(n_nonmembers: int, supported: bool) -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(20), np.zeros(n_nonmembers)].astype(int)
    scores = rng.normal(size=len(labels))
    entry = tpr_at_fpr(labels, scores, 0.01)
    assert entry.supported is supported
    assert entry.n_nonmembers == n_nonmembers


def test_threshold_finite_when_no_member_can_be_flagged() -> None:
    # The top score is a non-member: at FPR <= 0.1% nothing can be flagged.
    labels = np.r_[np.ones(10), np.zeros(100)].astype(int)
    scores = np.r_[np.linspace(0, 50, 10), np.arange(100, dtype=float) + 0.25]
    result = privacy_metrics(labels, scores)
    for entry in result.tpr_at_fpr:
        assert entry.tpr == 0.0
        assert math.isfinite(entry.threshold)
    # At 0.1% only roc_curve's "flag nobody" point (+inf) qualifies.
    entry = result.tpr(0.001)
    assert entry.realised_fpr == 0.0
    assert entry.threshold > scores.max()
    assert not (scores >= entry.threshold).any()
    json.dumps(result.to_dict(), allow_nan=False)  # JSON-safe, no Infinity


@pytest.mark.parametrize("labels", [np.ones(10), np.zeros(10)])
def test_one_class_labels_raise(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="both members and non-members"):
        privacy_metrics(labels, np.arange(10.0))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise(bad: float) -> None:
    scores = np.arange(10.0)
    scores[3] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        privacy_metrics(np.r_[np.ones(5), np.zeros(5)], scores)


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="labels but"):
        privacy_metrics(np.r_[np.ones(5), np.zeros(5)], np.arange(9.0))


@pytest.mark.parametrize("seed", [0, 1])
def test_balanced_accuracy_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(30), np.zeros(170)].astype(int)  # imbalanced on purpose
    scores = rng.normal(size=200) + labels
    predictions = scores > 0.3
    result = privacy_metrics(labels, scores, predictions)
    expected = balanced_accuracy_score(labels, predictions)
    assert result.balanced_accuracy == pytest.approx(expected)
    # Not plain accuracy: that would be dominated by the 170 non-members.
    assert result.balanced_accuracy != pytest.approx(float((predictions == labels).mean()))


def test_to_dict_is_json_and_complete() -> None:
    labels, scores = _known_roc()
    data = privacy_metrics(labels, scores, scores > 50).to_dict()
    assert set(data) == {
        "auc",
        "balanced_accuracy",
        "tpr_at_fpr",
        "n_members",
        "n_nonmembers",
        "auc_ci",
        "balanced_accuracy_ci",
        "bootstrap",
    }
    assert [t["target_fpr"] for t in data["tpr_at_fpr"]] == [0.01, 0.001]
    json.loads(json.dumps(data, allow_nan=False))


def test_tied_scores_keep_every_roc_point() -> None:
    # Each score value 0..99 is shared by one member and one non-member: the ROC is
    # the diagonal, so TPR at FPR <= 5% is 5%.
    scores = np.r_[np.arange(100.0), np.arange(100.0)]
    labels = np.r_[np.ones(100), np.zeros(100)].astype(int)
    entry = tpr_at_fpr(labels, scores, 0.05)
    assert entry.tpr == pytest.approx(0.05)
    assert entry.realised_fpr == pytest.approx(0.05)


# --- bootstrap intervals ------------------------------------------------------------------

from benchmark.pipeline.privacy_metrics import BootstrapSpec, bootstrap_intervals  # noqa: E402


def _noisy(n_members: int, n_nonmembers: int, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_members), np.zeros(n_nonmembers)].astype(int)
    scores = rng.normal(size=len(labels)) + labels
    return labels, np.round(scores, 1) if ties else scores


@pytest.mark.parametrize("ties", [False, True])
def test_bootstrap_matches_a_naive_loop_over_the_same_resamples(ties: bool) -> None:
    """Golden test: the vectorised intervals equal sklearn + tpr_at_fpr run resample by resample."""
    labels, scores = _noisy(30, 150, 0, ties=ties)
    predictions = scores > 0.5
    spec = BootstrapSpec(n_resamples=200, seed=3)
    fast = bootstrap_intervals(labels, scores, predictions, fprs=(0.01, 0.05), spec=spec)
    rng = np.random.default_rng(spec.seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    pos_idx = rng.integers(0, len(pos), size=(200, len(pos)))
    neg_idx = rng.integers(0, len(neg), size=(200, len(neg)))
    naive: dict[str, list[float]] = {"auc": [], "tpr@0.01": [], "tpr@0.05": [], "balanced_accuracy": []}
    for b in range(200):
        idx = np.r_[pos[pos_idx[b]], neg[neg_idx[b]]]
        y, s = labels[idx], scores[idx]
        naive["auc"].append(roc_auc_score(y, s))
        naive["tpr@0.01"].append(tpr_at_fpr(y, s, 0.01).tpr)
        naive["tpr@0.05"].append(tpr_at_fpr(y, s, 0.05).tpr)
        naive["balanced_accuracy"].append(balanced_accuracy_score(y, predictions[idx]))
    for key, values in naive.items():
        expected = np.quantile(values, [0.025, 0.975])
        np.testing.assert_allclose(fast[key], expected, atol=1e-12, err_msg=key)


def test_privacy_metrics_record_intervals() -> None:
    labels, scores = _noisy(100, 100, 1)
    result = privacy_metrics(labels, scores, scores > 0.5)
    assert result.bootstrap == BootstrapSpec()
    for value, (low, high) in (
        (result.auc, result.auc_ci),
        (result.balanced_accuracy, result.balanced_accuracy_ci),
        *((t.tpr, t.ci) for t in result.tpr_at_fpr),
    ):
        assert 0.0 <= low <= high <= 1.0
        assert low <= value <= high
    data = result.to_dict()
    assert data["auc_ci"] == list(result.auc_ci) and data["bootstrap"]["n_resamples"] == 1000
    json.loads(json.dumps(data, allow_nan=False))
    # Seeded: the same call gives the same intervals, another seed other ones.
    assert privacy_metrics(labels, scores).auc_ci == result.auc_ci
    assert privacy_metrics(labels, scores, bootstrap=BootstrapSpec(seed=1)).auc_ci != result.auc_ci


def test_intervals_shrink_with_more_queries_and_can_be_skipped() -> None:
    small = privacy_metrics(*_noisy(20, 20, 2))
    large = privacy_metrics(*_noisy(500, 500, 2))
    assert (large.auc_ci[1] - large.auc_ci[0]) < (small.auc_ci[1] - small.auc_ci[0]) / 2
    bare = privacy_metrics(*_noisy(20, 20, 2), bootstrap=None)
    assert bare.auc_ci is None and bare.bootstrap is None and bare.tpr_at_fpr[0].ci is None


def test_roc_plot_is_a_png() -> None:
    from benchmark.pipeline.plots import roc_plot_png

    labels, scores = _noisy(50, 50, 3)
    png = roc_plot_png({"target": (labels, scores), "control": (labels, scores[::-1])}, title="t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
