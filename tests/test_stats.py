"""Intervals over seeds and queries, and paired comparisons, on synthetic scores with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

from benchmark.pipeline.privacy_metrics import tpr_at_fpr
from benchmark.pipeline.statistics import (
    FROM_INTERVALS,
    QUERY_LEVEL,
    WELCH_T,
    Run,
    _auc_rows,
    _tpr_rows,
    auc_estimate,
    interval_difference,
    paired_auc_difference,
    paired_seed_difference,
    paired_tpr_difference,
    seed_mean,
    tpr_at_fpr_estimate,
    unpaired_auc_difference,
    unpaired_tpr_difference,
    welch_seed_difference,
)

MEMBERS, NONMEMBERS = 32, 128


def gaussian_run(rng: np.random.Generator, shift: float) -> Run:
    """Non-members N(0, 1), members N(shift, 1): the AUC is Phi(shift / sqrt 2)."""
    labels = np.r_[np.ones(MEMBERS, int), np.zeros(NONMEMBERS, int)]
    return rng.normal(size=labels.size) + shift * labels, labels


def known_run() -> Run:
    """Non-members 0..99; members 99.5, 98.5, 50.5, 10.5: AUC (1 + .99 + .51 + .11) / 4, TPR@1%FPR 2/4."""
    scores = np.r_[[99.5, 98.5, 50.5, 10.5], np.arange(100.0)]
    return scores, np.r_[np.ones(4, int), np.zeros(100, int)]


def test_a_known_roc_gives_the_known_auc_and_tpr():
    auc = auc_estimate([known_run()], resamples=200)
    tpr = tpr_at_fpr_estimate([known_run()], 0.01, resamples=200)
    assert auc.value == pytest.approx(0.6525) and tpr.value == pytest.approx(0.5)
    assert auc.low <= auc.value <= auc.high and tpr.low <= tpr.value <= tpr.high
    assert (auc.n_seeds, auc.n_queries) == (1, 104)
    # Above every non-member only 99.5 remains; the whole ROC admits everything.
    assert tpr_at_fpr_estimate([known_run()], 0.0, resamples=50).value == pytest.approx(0.25)
    assert tpr_at_fpr_estimate([known_run()], 1.0, resamples=50).value == 1.0


def test_the_resampled_figures_agree_with_sklearn_and_the_records_tpr_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = np.r_[np.ones(10, int), np.zeros(57, int)]
        scores = rng.integers(0, 6, size=labels.size).astype(float)  # many ties
        members, nonmembers = scores[labels == 1], scores[labels == 0]
        # Resample weights: first every query once (the data itself), then a resample against its expansion.
        weights = np.ones((1, members.size)), np.ones((1, nonmembers.size))
        assert _auc_rows(members, nonmembers, *weights)[0] == pytest.approx(roc_auc_score(labels, scores))
        drawn_members, drawn_nonmembers = rng.integers(0, members.size, 10), rng.integers(0, nonmembers.size, 57)
        counts = np.bincount(drawn_members, minlength=10)[None], np.bincount(drawn_nonmembers, minlength=57)[None]
        drawn = np.r_[members[drawn_members], nonmembers[drawn_nonmembers]]
        assert _auc_rows(members, nonmembers, *counts)[0] == pytest.approx(roc_auc_score(labels, drawn))
        for fpr in (0.0, 0.01, 0.05, 0.3, 1.0):
            expected = tpr_at_fpr(labels, scores, fpr).tpr
            assert _tpr_rows(fpr)(members, nonmembers, *weights)[0] == pytest.approx(expected)
            resampled = tpr_at_fpr(labels, drawn, fpr).tpr
            assert _tpr_rows(fpr)(members, nonmembers, *counts)[0] == pytest.approx(resampled)


def test_the_value_is_the_mean_over_seeds_of_the_per_seed_figure():
    rng = np.random.default_rng(0)
    runs = [gaussian_run(rng, 1.0) for _ in range(3)]
    estimate = auc_estimate(runs, resamples=300)
    assert estimate.value == pytest.approx(np.mean([roc_auc_score(y, s) for s, y in runs]))
    assert (estimate.n_seeds, estimate.n_queries) == (3, 3 * (MEMBERS + NONMEMBERS))
    assert "seeds and queries" in estimate.method and estimate.low < estimate.value < estimate.high


def test_one_seed_is_query_level_only_and_says_so():
    rng = np.random.default_rng(0)
    run = gaussian_run(rng, 1.0)
    estimate = auc_estimate([run], resamples=300)
    assert estimate.method == QUERY_LEVEL and estimate.n_seeds == 1
    difference = paired_auc_difference([run], [run], resamples=300)
    assert "queries only" in difference.method and difference.n_seeds == 1


def test_intervals_cover_the_true_auc_in_a_simulation():
    shift = 1.0
    truth = float(scipy_stats.norm.cdf(shift / math.sqrt(2)))
    rng = np.random.default_rng(2024)
    covered = 0
    for draw in range(40):
        runs = [gaussian_run(rng, shift) for _ in range(3)]
        estimate = auc_estimate(runs, resamples=400, seed=draw)
        covered += estimate.low <= truth <= estimate.high
    assert covered >= 34, f"{covered}/40 intervals cover the true AUC {truth:.3f}"


def test_identical_scores_differ_by_nothing():
    rng = np.random.default_rng(1)
    runs = [gaussian_run(rng, 0.8) for _ in range(3)]
    for difference in (
        paired_auc_difference(runs, runs, resamples=500),
        paired_tpr_difference(runs, runs, 0.01, resamples=500),
    ):
        assert difference.value == 0 and difference.low == 0 and difference.high == 0
        assert difference.p_value == 1.0 and not difference.significant


def test_the_same_distribution_is_not_significant():
    rng = np.random.default_rng(5)
    a = [gaussian_run(rng, 0.5) for _ in range(3)]
    b = [(rng.normal(size=labels.size) + 0.5 * labels, labels) for _, labels in a]
    difference = paired_auc_difference(a, b, resamples=1000)
    assert not difference.significant and difference.p_value > 0.05
    assert difference.low < 0 < difference.high


def test_clearly_separated_defenses_differ_significantly_with_the_right_sign():
    rng = np.random.default_rng(7)
    leaky = [gaussian_run(rng, 2.0) for _ in range(3)]
    private = [(rng.normal(size=labels.size), labels) for _, labels in leaky]
    difference = paired_auc_difference(leaky, private, resamples=1000)
    assert difference.significant and difference.value > 0.3 and difference.low > 0
    assert difference.p_value == pytest.approx(1 / 1001)
    reverse = paired_auc_difference(private, leaky, resamples=1000)
    assert reverse.significant and reverse.high < 0 and reverse.value == pytest.approx(-difference.value)
    tpr = paired_tpr_difference(leaky, private, 0.05, resamples=1000)
    assert tpr.significant and tpr.value > 0


def test_pairing_sees_a_small_consistent_shift_that_separate_intervals_cannot():
    rng = np.random.default_rng(11)
    base = [gaussian_run(rng, 1.0) for _ in range(3)]
    # The same queries, every member scoring a little lower: a real but small improvement.
    shifted = [(scores - 0.15 * labels, labels) for scores, labels in base]
    a, b = auc_estimate(base, resamples=1000), auc_estimate(shifted, resamples=1000)
    assert b.high > a.low  # the separate intervals overlap
    difference = paired_auc_difference(base, shifted, resamples=1000)
    assert difference.significant and difference.low > 0


def test_unpaired_comparison_for_runs_on_other_queries():
    rng = np.random.default_rng(13)
    leaky = [gaussian_run(rng, 2.0) for _ in range(3)]
    private = [gaussian_run(rng, 0.0) for _ in range(2)]
    difference = unpaired_auc_difference(leaky, private, resamples=1000)
    assert difference.significant and difference.value > 0.3 and difference.method.startswith("unpaired")
    # The same runs, resampled independently: a difference of 0 and an interval around it.
    same = unpaired_auc_difference(leaky, leaky, resamples=1000)
    assert same.value == 0 and same.low < 0 < same.high and not same.significant


def test_mismatched_runs_raise():
    rng = np.random.default_rng(0)
    a = [gaussian_run(rng, 1.0) for _ in range(2)]
    flipped = [(scores, labels[::-1]) for scores, labels in a]
    with pytest.raises(ValueError, match="same queries"):
        paired_auc_difference(a, flipped)
    with pytest.raises(ValueError, match="same queries"):
        paired_tpr_difference(a, [(s[:-1], y[:-1]) for s, y in a], 0.01)
    with pytest.raises(ValueError, match="same seeds"):
        paired_auc_difference(a, a[:1])
    with pytest.raises(ValueError, match="members and non-members"):
        auc_estimate([(np.ones(4), np.ones(4, int))])
    with pytest.raises(ValueError, match="labels"):
        auc_estimate([(np.ones(4), np.ones(3, int))])
    with pytest.raises(ValueError):
        auc_estimate([])
    with pytest.raises(ValueError, match="resamples"):
        auc_estimate(a, resamples=0)


def test_a_fixed_seed_gives_the_same_interval():
    rng = np.random.default_rng(0)
    runs = [gaussian_run(rng, 1.0) for _ in range(3)]
    other = [(rng.normal(size=labels.size), labels) for _, labels in runs]
    assert auc_estimate(runs, resamples=300, seed=4) == auc_estimate(runs, resamples=300, seed=4)
    assert auc_estimate(runs, resamples=300, seed=4) != auc_estimate(runs, resamples=300, seed=5)
    first = paired_auc_difference(runs, other, resamples=300, seed=4)
    assert first == paired_auc_difference(runs, other, resamples=300, seed=4)


def test_seed_mean_is_the_t_interval():
    values = [10.0, 12.0, 11.5]
    estimate = seed_mean(values)
    low, high = scipy_stats.t.interval(0.95, 2, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert (estimate.value, estimate.n_seeds, estimate.n_queries) == (pytest.approx(11.1666667), 3, 0)
    assert (estimate.low, estimate.high) == (pytest.approx(low), pytest.approx(high))
    single = seed_mean([4.0])
    assert single.value == 4.0 and math.isnan(single.low) and "one seed" in single.method
    assert (seed_mean([2.0, 2.0]).low, seed_mean([2.0, 2.0]).high) == (2.0, 2.0)


def test_paired_seed_difference_is_the_paired_t_test():
    a, b = [10.0, 12.0, 11.5, 13.0], [9.0, 11.2, 10.9, 12.1]
    difference = paired_seed_difference(a, b)
    assert difference.value == pytest.approx(np.mean(np.subtract(a, b)))
    assert difference.p_value == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
    assert difference.significant and difference.low > 0
    assert not paired_seed_difference(a, a).significant
    assert not paired_seed_difference([1.0], [0.0]).significant
    with pytest.raises(ValueError):
        paired_seed_difference(a, b[:2])


def test_unpaired_tpr_difference_is_the_difference_of_the_figures_and_sees_a_clear_gap() -> None:
    rng = np.random.default_rng(7)
    leaky = [gaussian_run(rng, 3.0) for _ in range(3)]
    private = [gaussian_run(rng, 0.0) for _ in range(3)]
    difference = unpaired_tpr_difference(leaky, private, 0.01, resamples=500)
    expected = np.mean([tpr_at_fpr(*run[::-1], 0.01).tpr for run in leaky]) - np.mean(
        [tpr_at_fpr(*run[::-1], 0.01).tpr for run in private]
    )
    assert difference.value == pytest.approx(expected)
    assert difference.significant and difference.low > 0 and difference.method.startswith("unpaired")
    assert not unpaired_tpr_difference(private, private, 0.01, resamples=500).significant
    with pytest.raises(ValueError, match="fpr"):
        unpaired_tpr_difference(leaky, private, 1.5)


def test_welch_matches_scipy_and_its_interval_matches_its_p_value() -> None:
    a, b = [10.0, 12.0, 11.0, 13.0], [20.0, 26.0, 23.0]
    difference = welch_seed_difference(a, b)
    assert difference.value == pytest.approx(np.mean(a) - np.mean(b))
    assert difference.p_value == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert difference.method == WELCH_T and difference.significant and difference.high < 0
    # At the interval's edge the test sits exactly at alpha: shift b by the distance to the bound.
    edge = welch_seed_difference(a, [v + difference.high for v in b])
    assert edge.p_value == pytest.approx(0.05, rel=1e-6)
    assert welch_seed_difference([1.0, 1.0], [1.0, 1.0]).p_value == 1.0
    with pytest.raises(ValueError, match="two or more seeds"):
        welch_seed_difference([1.0], [1.0, 2.0])


def test_interval_difference_adds_the_two_uncertainties() -> None:
    # Two intervals of half-width 1.96 are standard errors of 1: the difference's is sqrt 2.
    difference = interval_difference(5.0, (3.04, 6.96), 1.0, (-0.96, 2.96))
    assert difference.value == 4.0 and difference.method == FROM_INTERVALS
    assert difference.high - difference.value == pytest.approx(1.96 * math.sqrt(2))
    assert difference.p_value == pytest.approx(2 * scipy_stats.norm.sf(4 / (math.sqrt(2) * 1.96 / 1.959964)), rel=1e-4)
    assert not interval_difference(1.0, (0.0, 2.0), 1.5, (0.5, 2.5)).significant
    with pytest.raises(ValueError, match="low end"):
        interval_difference(1.0, (2.0, 0.0), 1.0, (0.0, 2.0))


# -- tests against a margin and many tests at once (the regression gate's rule) --------------


def test_holm_matches_its_definition_and_bh_matches_a_hand_computation() -> None:
    from benchmark.pipeline.statistics import adjusted_p_values

    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04, made monotone.
    assert adjusted_p_values(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Benjamini-Hochberg: p_(i) m / i from the top, made monotone: 0.04, 0.04, 0.04, 0.02.
    assert adjusted_p_values(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert adjusted_p_values(p, "none") == pytest.approx(p)
    assert adjusted_p_values([], "holm").size == 0
    with pytest.raises(ValueError, match="unknown correction"):
        adjusted_p_values(p, "bonferoni")


def test_margin_p_value_is_one_sided_beyond_the_margin() -> None:
    from benchmark.pipeline.statistics import Difference, margin_p_value

    normal = Difference(0.05, 0.03, 0.07, 0.0, 3, "test", se=0.01)
    assert margin_p_value(normal, 0.02, higher=True) == pytest.approx(scipy_stats.norm.sf(3.0))
    assert margin_p_value(normal, 0.02, higher=False) == pytest.approx(scipy_stats.norm.sf(-7.0))
    # Within the margin: never significant, however small the standard error.
    tiny = Difference(0.015, 0.0149, 0.0151, 0.0, 3, "test", se=1e-6)
    assert margin_p_value(tiny, 0.02, higher=True) > 0.99
    t = Difference(0.05, 0.0, 0.1, 0.0, 3, "test", se=0.01, dof=2.0)
    assert margin_p_value(t, 0.0, higher=True) == pytest.approx(scipy_stats.t.sf(5.0, 2))
    exact = Difference(0.05, 0.05, 0.05, 0.0, 3, "test", se=0.0)
    assert margin_p_value(exact, 0.02, higher=True) == 0.0 and margin_p_value(exact, 0.06, higher=True) == 1.0
    assert math.isnan(margin_p_value(Difference(0.1, 0, 0, 0, 1, "one seed"), 0.0, higher=True))


def test_a_difference_over_seeds_counts_their_spread() -> None:
    """Per-seed differences that disagree (+0.25, -0.05, +0.10 in AUC) on many queries: the query
    bootstrap alone resolves each seed, but over three seeds the mean difference is not significant."""
    from benchmark.pipeline.statistics import margin_p_value

    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(400, int), np.zeros(400, int)]
    base = [rng.normal(size=labels.size) + 1.0 * labels for _ in range(3)]
    # Members shifted by an amount per seed, the same queries: a paired design.
    moved = [scores + shift * labels for scores, shift in zip(base, (0.9, -0.2, 0.4), strict=True)]
    a = [(s, labels) for s in moved]
    b = [(s, labels) for s in base]
    over_seeds = paired_auc_difference(a, b, resamples=400)
    one_seed = paired_auc_difference(a[:1], b[:1], resamples=400)
    assert one_seed.value > 0.1 and margin_p_value(one_seed, 0.02, higher=True) < 1e-6
    # The seeds' spread dominates: close to Student t on n - 1 = 2 degrees of freedom (Satterthwaite).
    assert 2.0 <= over_seeds.dof < 3.0
    per_seed = [roc_auc_score(labels, x) - roc_auc_score(labels, y) for x, y in zip(moved, base, strict=True)]
    assert over_seeds.se >= np.std(per_seed, ddof=1) / math.sqrt(3)
    assert margin_p_value(over_seeds, 0.02, higher=True) > 0.05
