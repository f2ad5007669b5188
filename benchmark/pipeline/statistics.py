"""Figures over seeds with intervals that count both seeds and queries, and paired comparisons.

A defense's attack AUC varies with the seed (the splits, the fine-tuning, the shadow) and,
within a seed, with the finite set of queries. One seed's bootstrap interval shows only the
second; a ranking that should survive another seed needs both. So every interval here is a
two-level (hierarchical) percentile bootstrap: resample the seeds with replacement, then,
within each chosen seed, its members and its non-members separately with replacement.

Defenses are evaluated on the same splits per seed, so two of them can be compared paired:
the same resample draws are applied to both, and the noise they share cancels in the
difference. That is what lets the board call a difference of 0.02 AUC real or not.

Conventions (as in `benchmark.pipeline.privacy_metrics`): labels 1 = member, higher score =
more likely a member; AUC counts ties as one half; TPR at FPR f is the TPR of the last ROC
point whose FPR does not exceed f.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as scipy_stats

Run = tuple[np.ndarray, np.ndarray]
"""(scores, labels) of one seed's queries; labels 1 = member; a higher score = more likely a member."""

CONFIDENCE = 0.95
RESAMPLES = 2000
ALPHA = 1 - CONFIDENCE

# The words the board prints in its captions, so the caption and the computation cannot drift apart.
HIERARCHICAL = "hierarchical bootstrap over seeds and queries (members and non-members resampled separately)"
QUERY_LEVEL = "bootstrap over queries only (one seed; members and non-members resampled separately)"
PAIRED = "paired " + HIERARCHICAL
PAIRED_QUERY_LEVEL = "paired " + QUERY_LEVEL
UNPAIRED = "unpaired " + HIERARCHICAL
UNPAIRED_QUERY_LEVEL = "unpaired " + QUERY_LEVEL
SEED_T = "mean over seeds, Student t interval"
SEED_SINGLE = "one seed, no interval"
PAIRED_T = "paired t-test over seeds"


@dataclass(frozen=True)
class Estimate:
    """A figure (mean over seeds) with its 95% interval and the counts behind it."""

    value: float
    low: float
    high: float
    n_seeds: int
    n_queries: int
    method: str
    # Standard error of `value` (NaN where the method gives none): what a test against a margin uses.
    se: float = math.nan


@dataclass(frozen=True)
class Difference:
    """`a - b` (means over seeds) with its 95% interval and a two-sided p-value.

    `se` and `dof` are the standard error and the degrees of freedom of its reference
    distribution (infinite: normal), so that the same difference can also be tested
    one-sided against a margin (`margin_p_value`).
    """

    value: float
    low: float
    high: float
    p_value: float
    n_seeds: int
    method: str
    se: float = math.nan
    dof: float = math.inf

    @property
    def significant(self) -> bool:
        """The 95% interval excludes 0 (alpha 0.05)."""
        return bool(self.low > 0 or self.high < 0)


# ---------------------------------------------------------------- validation and resampling


def _checked(runs: Sequence[Run]) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(runs) == 0:
        raise ValueError("need at least one run (one seed's scores and labels)")
    out = []
    for index, (scores, labels) in enumerate(runs):
        scores = np.asarray(scores, dtype=np.float64)
        labels = np.asarray(labels)
        if scores.ndim != 1 or scores.shape != labels.shape:
            raise ValueError(f"run {index}: {scores.shape} scores but {labels.shape} labels (one of each per query)")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"run {index}: labels must be 0 (non-member) or 1 (member)")
        labels = labels.astype(bool)
        if labels.all() or not labels.any():
            raise ValueError(f"run {index}: needs both members and non-members")
        if not np.isfinite(scores).all():
            raise ValueError(f"run {index}: scores contain NaN or infinity")
        out.append((scores, labels))
    return out


def _checked_pair(a: Sequence[Run], b: Sequence[Run]) -> tuple[list[Run], list[Run]]:
    a_runs, b_runs = _checked(a), _checked(b)
    if len(a_runs) != len(b_runs):
        raise ValueError(f"paired comparison needs the same seeds: {len(a_runs)} runs against {len(b_runs)}")
    for index, ((sa, la), (sb, lb)) in enumerate(zip(a_runs, b_runs, strict=True)):
        if sa.shape != sb.shape or not np.array_equal(la, lb):
            raise ValueError(
                f"run {index}: the two sides must score the same queries in the same order "
                f"({sa.shape[0]} and {sb.shape[0]} queries, labels {'equal' if np.array_equal(la, lb) else 'differ'})"
            )
    return a_runs, b_runs


@dataclass(frozen=True)
class _Draw:
    """One seed's share of the resamples: the (resample, slot) cells it fills and the query weights there.

    A resample of n queries with replacement is a multinomial count per query; as weights,
    every resample's AUC is one matrix product instead of a sort per resample.
    """

    cells: tuple[np.ndarray, np.ndarray]
    members: np.ndarray  # (k, n_members) how often each member is drawn
    nonmembers: np.ndarray  # (k, n_nonmembers)


@functools.lru_cache(maxsize=4)
def _draws(labels: tuple[bytes, ...], resamples: int, seed: int) -> tuple[_Draw, ...]:
    """Two-level resample weights: seeds with replacement, then each chosen seed's queries, stratified.

    Only the labels (as bytes, so that the weights are cached per design) are read: two sides
    with the same labels and seed get the same weights, which is what pairs them.
    A seed chosen twice in one resample gets two independent query resamples, as the
    two-level bootstrap requires.
    """
    rng = np.random.default_rng(seed)
    n_seeds = len(labels)
    # One seed: nothing to resample at the seed level, only its queries.
    chosen = rng.integers(0, n_seeds, size=(resamples, n_seeds)) if n_seeds > 1 else np.zeros((resamples, 1), int)
    draws = []
    for index, packed in enumerate(labels):
        members = np.frombuffer(packed, dtype=bool)
        cells = np.nonzero(chosen == index)
        k, n1 = cells[0].size, int(members.sum())
        n0 = members.size - n1
        draws.append(_Draw(cells, _counts(rng, n1, k), _counts(rng, n0, k)))
    return tuple(draws)


def _counts(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """k resamples of n items with replacement, as (k, n) counts (one bincount; multinomial is slower)."""
    drawn = rng.integers(0, n, size=(k, n)) + n * np.arange(k)[:, None]
    return np.bincount(drawn.ravel(), minlength=k * n).reshape(k, n).astype(np.float64)


FigureName = tuple[str, float]
"""("auc", 0.0) or ("tpr", target FPR): hashable, so resampled figures can be cached."""
Figure = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""Per-resample figure from member scores (n1,), non-member scores (n0,) and their weights (k, n1), (k, n0)."""


def _auc_rows(members: np.ndarray, nonmembers: np.ndarray, w: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Mann-Whitney with weights: each member/non-member pair counts 1 if the member scores
    # higher and one half on a tie (as roc_auc_score), times how often both were drawn.
    wins = (members[:, None] > nonmembers[None, :]) + 0.5 * (members[:, None] == nonmembers[None, :])
    return ((w @ wins) * v).sum(axis=1) / (members.size * nonmembers.size)


def _tpr_rows(fpr: float) -> Figure:
    def figure(members: np.ndarray, nonmembers: np.ndarray, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        # At most k = floor(f * N) non-members may be flagged: the members strictly above the
        # (k+1)-th highest drawn non-member, exactly the last admissible ROC point of `tpr_at_fpr`.
        n0 = nonmembers.size
        allowed = int(np.floor(fpr * n0 + 1e-9))
        if allowed >= n0:
            return np.ones(w.shape[0])
        order = np.argsort(-nonmembers, kind="stable")
        position = np.argmax(np.cumsum(v[:, order], axis=1) > allowed, axis=1)
        cutoff = nonmembers[order][position]
        return (w * (members[None, :] > cutoff[:, None])).sum(axis=1) / members.size

    return figure


def _figure(name: FigureName) -> Figure:
    return _auc_rows if name[0] == "auc" else _tpr_rows(name[1])


@functools.lru_cache(maxsize=1024)
def _resampled_means(name: FigureName, runs: tuple[tuple[bytes, bytes], ...], resamples: int, seed: int) -> np.ndarray:
    """One side's figure on every resample (mean over the resample's seeds), cached per content.

    The board compares every pair of defenses; with the weights shared per design, each side
    is resampled once and a paired difference is one subtraction.
    """
    draws = _draws(tuple(labels for _, labels in runs), resamples, seed)
    figure = _figure(name)
    out = np.empty((resamples, len(runs)))
    for (packed_scores, packed_labels), draw in zip(runs, draws, strict=True):
        if draw.members.shape[0]:
            scores, labels = np.frombuffer(packed_scores), np.frombuffer(packed_labels, dtype=bool)
            out[draw.cells] = figure(scores[labels], scores[~labels], draw.members, draw.nonmembers)
    means = out.mean(axis=1)
    means.flags.writeable = False  # shared by the cache
    return means


def _packed(runs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((scores.tobytes(), labels.tobytes()) for scores, labels in runs)


def _interval(values: np.ndarray) -> tuple[float, float]:
    low, high = np.quantile(values, [ALPHA / 2, 1 - ALPHA / 2])
    return float(low), float(high)


def _point(scores: np.ndarray, labels: np.ndarray, figure: Figure) -> float:
    # The data itself is the resample that draws every query once; tests hold this to
    # roc_auc_score and to the record's own `tpr_at_fpr`, without sklearn's per-call checks.
    members, nonmembers = scores[labels], scores[~labels]
    return float(figure(members, nonmembers, np.ones((1, members.size)), np.ones((1, nonmembers.size)))[0])


def _estimate(runs: Sequence[Run], name: FigureName, resamples: int, seed: int) -> Estimate:
    checked = _checked(runs)
    _check_resamples(resamples)
    means = _resampled_means(name, _packed(checked), resamples, seed)
    low, high = _interval(means)
    figure = _figure(name)
    return Estimate(
        value=float(np.mean([_point(scores, labels, figure) for scores, labels in checked])),
        low=low,
        high=high,
        n_seeds=len(checked),
        n_queries=int(sum(labels.size for _, labels in checked)),
        method=HIERARCHICAL if len(checked) > 1 else QUERY_LEVEL,
        se=_bootstrap_se(means, len(checked)),
    )


def _difference(a: Sequence[Run], b: Sequence[Run], name: FigureName, resamples: int, seed: int) -> Difference:
    a_runs, b_runs = _checked_pair(a, b)
    _check_resamples(resamples)
    # The same seed and labels give both sides the same resample weights: paired.
    diffs = _resampled_means(name, _packed(a_runs), resamples, seed) - _resampled_means(
        name, _packed(b_runs), resamples, seed
    )
    figure = _figure(name)
    per_seed = np.array([_point(*ra, figure) - _point(*rb, figure) for ra, rb in zip(a_runs, b_runs, strict=True)])
    n_seeds = len(a_runs)
    method = PAIRED if n_seeds > 1 else PAIRED_QUERY_LEVEL
    difference = _bootstrap_difference(float(per_seed.mean()), diffs, resamples, n_seeds, method)
    if n_seeds < 2:
        return difference
    # Over seeds: the spread of the per-seed differences, on n - 1 degrees of freedom.
    return _over_seeds(difference, float(np.var(per_seed, ddof=1)) / n_seeds, float(n_seeds - 1))


def _unpaired(a: Sequence[Run], b: Sequence[Run], name: FigureName, resamples: int, seed: int) -> Difference:
    a_runs, b_runs = _checked(a), _checked(b)
    _check_resamples(resamples)
    # Independent resamples for the two sides: another stream for b, even where the labels agree.
    other = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
    diffs = _resampled_means(name, _packed(a_runs), resamples, seed) - _resampled_means(
        name, _packed(b_runs), resamples, other
    )
    figure = _figure(name)
    xa = np.array([_point(*r, figure) for r in a_runs])
    xb = np.array([_point(*r, figure) for r in b_runs])
    value = float(xa.mean() - xb.mean())
    n_seeds = min(len(a_runs), len(b_runs))
    method = UNPAIRED if n_seeds > 1 else UNPAIRED_QUERY_LEVEL
    difference = _bootstrap_difference(value, diffs, resamples, n_seeds, method)
    if n_seeds < 2:
        return difference
    # Over seeds: Welch's variance and Welch-Satterthwaite degrees of freedom.
    va, vb = float(np.var(xa, ddof=1)) / xa.size, float(np.var(xb, ddof=1)) / xb.size
    if va + vb == 0:
        return _over_seeds(difference, 0.0, math.inf)
    dof = (va + vb) ** 2 / (va**2 / (xa.size - 1) + vb**2 / (xb.size - 1))
    return _over_seeds(difference, va + vb, float(dof))


def _over_seeds(difference: Difference, seed_variance: float, dof: float) -> Difference:
    """The difference tested over seeds: Student t, its standard error never below the bootstrap's.

    With few seeds the bootstrap alone is too sure of itself: resampling 3 seeds cannot show
    how far a fourth would land, and a same-code rerun then looks significant. So where the
    spread of the per-seed figures is the larger variance, the test uses it on its n - 1
    degrees of freedom. Where the bootstrap's (which counts every seed's queries) is larger,
    it is the standard error, and the degrees of freedom grow as the seeds' share shrinks
    (Satterthwaite's approximation with the query part taken as known): seeds that happen to
    agree do not make the test surer than the queries allow.
    """
    boot = difference.se**2 if math.isfinite(difference.se) else 0.0
    variance = max(seed_variance, boot)
    if seed_variance <= 0:
        dof = math.inf
    elif boot > seed_variance:
        dof = dof * (boot / seed_variance) ** 2
    return replace(difference, se=math.sqrt(variance), dof=dof)


def _bootstrap_difference(value: float, diffs: np.ndarray, resamples: int, n_seeds: int, method: str) -> Difference:
    low, high = _interval(diffs)
    # Two-sided bootstrap p: twice the smaller tail, never 0 with finitely many resamples.
    tail = min(np.mean(diffs <= 0), np.mean(diffs >= 0))
    p_value = float(min(1.0, max(2 * tail, 1 / (resamples + 1))))
    se = _bootstrap_se(diffs, n_seeds)
    return Difference(value=value, low=low, high=high, p_value=p_value, n_seeds=n_seeds, method=method, se=se)


def _bootstrap_se(resampled: np.ndarray, n_seeds: int) -> float:
    """The resamples' standard deviation, with the seed level's small-sample bias removed.

    Resampling n seeds with replacement gives the mean a variance of (n - 1) / n times the
    unbiased s^2 / n: with 3 seeds a third too small. Scaling the whole variance by
    n / (n - 1) restores the seed part (and slightly overstates the query part: conservative).
    """
    if resampled.size < 2:
        return math.nan
    variance = float(np.var(resampled, ddof=1))
    if n_seeds > 1:
        variance *= n_seeds / (n_seeds - 1)
    return math.sqrt(variance)


def _check_resamples(resamples: int) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, not {resamples}")


# ---------------------------------------------------------------- public API


def auc_estimate(runs: Sequence[Run], *, resamples: int = RESAMPLES, seed: int = 0) -> Estimate:
    """Attack AUC, mean over seeds, with a hierarchical 95% bootstrap interval.

    Args:
        runs: one (scores, labels) per seed.
        resamples: bootstrap resamples.
        seed: the resampling generator's seed (a fixed seed gives the same interval).

    Raises:
        ValueError: no runs, or a run without both members and non-members, or malformed arrays.
    """
    return _estimate(runs, ("auc", 0.0), resamples, seed)


def tpr_at_fpr_estimate(runs: Sequence[Run], fpr: float, *, resamples: int = RESAMPLES, seed: int = 0) -> Estimate:
    """TPR at the last ROC point with FPR <= `fpr`, mean over seeds, with a hierarchical 95% interval.

    Raises:
        ValueError: as `auc_estimate`, or `fpr` outside [0, 1].
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must lie in [0, 1], not {fpr}")
    return _estimate(runs, ("tpr", float(fpr)), resamples, seed)


def paired_auc_difference(
    a: Sequence[Run], b: Sequence[Run], *, resamples: int = RESAMPLES, seed: int = 0
) -> Difference:
    """AUC of `a` minus AUC of `b`, paired by seed and query, with a 95% interval and p-value.

    `a[i]` and `b[i]` must come from the same seed and score the same queries in the same
    order; the same resample indices are applied to both.

    Raises:
        ValueError: different numbers of seeds, or a seed whose two runs differ in length or labels.
    """
    return _difference(a, b, ("auc", 0.0), resamples, seed)


def paired_tpr_difference(
    a: Sequence[Run], b: Sequence[Run], fpr: float, *, resamples: int = RESAMPLES, seed: int = 0
) -> Difference:
    """TPR at FPR <= `fpr` of `a` minus that of `b`, paired as `paired_auc_difference`.

    Raises:
        ValueError: as `paired_auc_difference`, or `fpr` outside [0, 1].
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must lie in [0, 1], not {fpr}")
    return _difference(a, b, ("tpr", float(fpr)), resamples, seed)


def unpaired_auc_difference(
    a: Sequence[Run], b: Sequence[Run], *, resamples: int = RESAMPLES, seed: int = 0
) -> Difference:
    """AUC of `a` minus AUC of `b` when the two cannot be paired (other queries or other seeds).

    Each side is resampled on its own (hierarchically); the interval is wider than a paired
    one would be, since the noise the sides share no longer cancels.

    Raises:
        ValueError: as `auc_estimate`, for either side.
    """
    return _unpaired(a, b, ("auc", 0.0), resamples, seed)


def seed_mean(values: Sequence[float]) -> Estimate:
    """Mean over seeds of a per-seed figure (e.g. FID) with a Student t 95% interval.

    With one seed there is no spread to estimate: the bounds are NaN and `method` says
    so. `n_queries` is 0: the figure is not a count over queries.

    Raises:
        ValueError: no values, or a value that is not finite.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0 or not np.isfinite(data).all():
        raise ValueError("seed_mean needs at least one finite value per seed")
    mean = float(data.mean())
    if data.size == 1:
        return Estimate(mean, math.nan, math.nan, 1, 0, SEED_SINGLE)
    low, high = _t_interval(data)
    return Estimate(mean, low, high, int(data.size), 0, SEED_T, se=float(scipy_stats.sem(data)))


def paired_seed_difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """`a - b` of a per-seed figure (e.g. FID), paired by seed: paired t-test and its t interval.

    With one seed the bounds and the p-value are NaN (never significant).

    Raises:
        ValueError: different numbers of seeds, none, or a value that is not finite.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"paired over seeds needs one value per seed on each side ({x.size} and {y.size})")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired_seed_difference needs finite values")
    diff = x - y
    value = float(diff.mean())
    if x.size == 1:
        return Difference(value, math.nan, math.nan, math.nan, 1, SEED_SINGLE)
    low, high = _t_interval(diff)
    if low == high:
        # Every seed moved by the same amount: t is undefined; the shift is exact, or there is none.
        p_value = 1.0 if value == 0 else 0.0
    else:
        p_value = float(scipy_stats.ttest_rel(x, y).pvalue)
    se = float(scipy_stats.sem(diff))
    return Difference(value, low, high, p_value, int(x.size), PAIRED_T, se=se, dof=float(x.size - 1))


def _t_interval(data: np.ndarray) -> tuple[float, float]:
    mean, sem = float(data.mean()), float(scipy_stats.sem(data))
    if sem == 0:
        # scipy needs a positive scale; identical values pin the mean exactly.
        return mean, mean
    low, high = scipy_stats.t.interval(CONFIDENCE, data.size - 1, loc=mean, scale=sem)
    return float(low), float(high)


# ---------------------------------------------------------------- unpaired and single-seed comparisons

WELCH_T = "Welch t-test over seeds (unpaired)"
FROM_INTERVALS = "normal approximation from each side's 95% interval (one seed each; seed spread not counted)"


def unpaired_tpr_difference(
    a: Sequence[Run], b: Sequence[Run], fpr: float, *, resamples: int = RESAMPLES, seed: int = 0
) -> Difference:
    """TPR at FPR <= `fpr` of `a` minus that of `b`, resampled independently as `unpaired_auc_difference`.

    Raises:
        ValueError: as `auc_estimate`, for either side, or `fpr` outside [0, 1].
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must lie in [0, 1], not {fpr}")
    return _unpaired(a, b, ("tpr", float(fpr)), resamples, seed)


def welch_seed_difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """`mean(a) - mean(b)` of a per-seed figure whose seeds do not pair: Welch's t-test and interval.

    Raises:
        ValueError: fewer than two values on a side, or a value that is not finite.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1 or x.size < 2 or y.size < 2:
        raise ValueError(f"Welch's test needs two or more seeds on each side ({x.size} and {y.size})")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("welch_seed_difference needs finite values")
    value = float(x.mean() - y.mean())
    n_seeds = int(min(x.size, y.size))
    vx, vy = float(x.var(ddof=1)) / x.size, float(y.var(ddof=1)) / y.size
    if vx + vy == 0:
        # No spread on either side: the difference is exact (as in `paired_seed_difference`).
        return Difference(value, value, value, 1.0 if value == 0 else 0.0, n_seeds, WELCH_T, se=0.0)
    # Welch-Satterthwaite degrees of freedom, the same that scipy's test uses for its p-value.
    dof = (vx + vy) ** 2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1))
    half = float(scipy_stats.t.ppf(1 - ALPHA / 2, dof)) * math.sqrt(vx + vy)
    p_value = float(scipy_stats.ttest_ind(x, y, equal_var=False).pvalue)
    return Difference(value, value - half, value + half, p_value, n_seeds, WELCH_T, se=math.sqrt(vx + vy), dof=dof)


def interval_difference(
    a: float, a_interval: tuple[float, float], b: float, b_interval: tuple[float, float]
) -> Difference:
    """`a - b` of two single figures, each with its own 95% interval, taken as independent and normal.

    Each standard error is the interval's width over 2 x 1.96; the difference's is their
    root sum of squares. For one seed per side, where only the within-seed intervals
    (e.g. a record's bootstrap over captions) say how uncertain each figure is.

    Raises:
        ValueError: a figure or bound that is not finite, or an interval whose low end exceeds its high end.
    """
    numbers = (a, b, *a_interval, *b_interval)
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError("interval_difference needs finite figures and bounds")
    if a_interval[0] > a_interval[1] or b_interval[0] > b_interval[1]:
        raise ValueError(f"an interval's low end exceeds its high end: {a_interval}, {b_interval}")
    z = float(scipy_stats.norm.ppf(1 - ALPHA / 2))
    se = math.hypot((a_interval[1] - a_interval[0]) / (2 * z), (b_interval[1] - b_interval[0]) / (2 * z))
    value = float(a - b)
    if se == 0:
        return Difference(value, value, value, 1.0 if value == 0 else 0.0, 1, FROM_INTERVALS, se=0.0)
    p_value = float(2 * scipy_stats.norm.sf(abs(value) / se))
    return Difference(value, value - z * se, value + z * se, p_value, 1, FROM_INTERVALS, se=se)


# ---------------------------------------------------------------- tests against a margin, and many tests at once

HOLM = "holm"
BENJAMINI_HOCHBERG = "bh"
NO_CORRECTION = "none"
CORRECTIONS = (HOLM, BENJAMINI_HOCHBERG, NO_CORRECTION)
CORRECTION_NAMES = {
    HOLM: "Holm (family-wise error)",
    BENJAMINI_HOCHBERG: "Benjamini-Hochberg (false discovery rate)",
    NO_CORRECTION: "no correction",
}


def margin_p_value(diff: Difference, margin: float, *, higher: bool) -> float:
    """One-sided p-value that the true difference lies beyond `margin` (above it if `higher`, else below -margin).

    The null hypothesis is the equivalence side: a difference of at most `margin` (in the
    direction tested) is no change. The statistic is (value -/+ margin) / se against the
    difference's reference distribution (Student t with `dof`, normal when infinite). A
    difference without a standard error (one seed of a utility figure) gives NaN.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, not {margin}")
    excess = diff.value - margin if higher else -margin - diff.value
    if not math.isfinite(diff.se):
        return math.nan
    if diff.se == 0:
        return 0.0 if excess > 0 else 1.0
    statistic = excess / diff.se
    tail = scipy_stats.norm.sf(statistic) if math.isinf(diff.dof) else scipy_stats.t.sf(statistic, diff.dof)
    return float(tail)


def adjusted_p_values(p_values: Sequence[float], method: str) -> np.ndarray:
    """p-values adjusted for testing them all at once: `holm`, `bh` (Benjamini-Hochberg) or `none`.

    Holm's step-down adjustment controls the family-wise error (the chance of any false
    regression); Benjamini-Hochberg controls the expected share of false ones among those
    flagged. A value is significant at level alpha where its adjusted p-value is below alpha.

    Raises:
        ValueError: an unknown method, or a p-value outside [0, 1].
    """
    p = np.asarray(p_values, dtype=np.float64)
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; choose one of {', '.join(CORRECTIONS)}")
    if p.size and (np.isnan(p).any() or (p < 0).any() or (p > 1).any()):
        raise ValueError("p-values must lie in [0, 1]")
    if method == NO_CORRECTION or p.size == 0:
        return p.copy()
    if method == BENJAMINI_HOCHBERG:
        return np.asarray(scipy_stats.false_discovery_control(p, method="bh"), dtype=np.float64)
    # Holm: the i-th smallest (0-based) times (m - i), made monotone; scipy has no Holm.
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, np.maximum.accumulate(p[order] * (p.size - np.arange(p.size))))
    out = np.empty_like(p)
    out[order] = scaled
    return out
