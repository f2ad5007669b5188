"""Ranks and Pareto stars that survive another seed.

The headline ranks every defense of a dataset (and utility feature network) by its
worst-case attack AUC: the (scenario, attack family/attack model) cell with the highest
mean AUC over seeds. Two neighbours share a rank unless their difference is significant;
a defense keeps its Pareto star unless another one beats it significantly. The tests are
those of `benchmark.pipeline.statistics`: a paired bootstrap over seeds and queries for AUC, a paired
t-test over seeds for utility.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import benchmark.pipeline.statistics as stats
from benchmark.pipeline.statistics import Difference, Estimate
from leaderboard.tables import Cell, Entry, cells, worst_cell

HEADLINE_FPR = 0.01
ALPHA = 0.05
TEST = (
    f"paired bootstrap over seeds and queries, {stats.RESAMPLES:,} resamples, {stats.CONFIDENCE:.0%}; "
    "unpaired where two cells do not share seeds and queries"
)
UTILITY_TEST = f"paired t-test over seeds, {stats.CONFIDENCE:.0%}"


# ---------------------------------------------------------------- comparing two cells


def runs(cell: Cell) -> list[stats.Run]:
    """The cell's (scores, labels), one per seed, in seed order."""
    return [(np.asarray(e.scores, dtype=np.float64), np.asarray(e.labels, dtype=int)) for e in cell.entries]


def _aligned(a: Cell, b: Cell) -> tuple[list[stats.Run], list[stats.Run]] | None:
    """Both cells' runs on their shared seeds, b's queries put in a's order; None if they share none.

    Pairing is only valid on the same queries: the reference suite evaluates every defense on
    the same splits per seed, and the query ids say so record by record.
    """
    b_by_seed = {e.seed: e for e in b.entries}
    left: list[stats.Run] = []
    right: list[stats.Run] = []
    for ea in a.entries:
        eb = b_by_seed.get(ea.seed)
        if eb is None:
            continue
        if not ea.query_ids or len(set(ea.query_ids)) != len(ea.query_ids) or set(ea.query_ids) != set(eb.query_ids):
            return None
        where = {q: i for i, q in enumerate(eb.query_ids)}
        order = np.array([where[q] for q in ea.query_ids])
        labels_b = np.asarray(eb.labels, dtype=int)[order]
        if not np.array_equal(labels_b, np.asarray(ea.labels, dtype=int)):
            return None
        left.append((np.asarray(ea.scores, dtype=np.float64), np.asarray(ea.labels, dtype=int)))
        right.append((np.asarray(eb.scores, dtype=np.float64)[order], labels_b))
    return (left, right) if left else None


def auc_difference(a: Cell, b: Cell) -> Difference:
    """AUC of `a` minus that of `b`: paired over their shared seeds and queries where they have them.

    Cells that share no seed, or score other queries, are compared unpaired over all their seeds.

    Raises:
        ValueError: a cell without per-query scores.
    """
    paired = _aligned(a, b)
    if paired is not None:
        return stats.paired_auc_difference(*paired)
    return stats.unpaired_auc_difference(runs(a), runs(b))


# ---------------------------------------------------------------- significant Pareto front


@dataclass(frozen=True)
class Candidate:
    """A defense on the privacy-utility plane: its worst cell and its target's utility per seed."""

    name: str
    auc: float
    cell: Cell | None
    # seed -> (FID, CLIP score); either may be None (not measured).
    utility: dict[int, tuple[float | None, float | None]]


def _axis(candidate: Candidate, index: int) -> dict[int, float]:
    """One utility figure per seed where it was measured (index 0: FID, 1: CLIP score)."""
    return {seed: value for seed, figures in candidate.utility.items() if (value := figures[index]) is not None}


def _utility_verdict(a: Candidate, b: Candidate, index: int, lower_is_better: bool) -> tuple[bool, bool]:
    """(b no worse than a, b significantly better than a) on one utility axis.

    No worse: by the means over seeds. Significantly better: the paired t-test over the
    seeds both measured (at least two), in b's favour.
    """
    on_a, on_b = _axis(a, index), _axis(b, index)
    if not on_a or not on_b:
        return True, False  # an axis the two cannot be compared on
    sign = 1.0 if lower_is_better else -1.0
    no_worse = sign * (np.mean(list(on_b.values())) - np.mean(list(on_a.values()))) <= 0
    shared = sorted(set(on_a) & set(on_b))
    if len(shared) < 2:
        return bool(no_worse), False
    difference = stats.paired_seed_difference([on_b[s] for s in shared], [on_a[s] for s in shared])
    return bool(no_worse), difference.significant and sign * difference.value < 0


def dominates_significantly(b: Candidate, a: Candidate, *, use_clip: bool) -> bool:
    """`b` is at least as good as `a` on every axis (means) and significantly better on one.

    Axes: worst-case AUC (lower), FID (lower), CLIP score (higher, when every candidate has
    one). AUC is tested by `auc_difference` on the two worst cells; FID and CLIP score by
    a paired t-test over shared seeds, so with one seed only AUC can be significant.
    """
    if b.auc > a.auc:
        return False
    verdicts = [_utility_verdict(a, b, 0, lower_is_better=True)]
    if use_clip:
        verdicts.append(_utility_verdict(a, b, 1, lower_is_better=False))
    if not all(no_worse for no_worse, _ in verdicts):
        return False
    if any(better for _, better in verdicts):
        return True
    if a.cell is None or b.cell is None or not (a.cell.has_scores and b.cell.has_scores):
        return False
    difference = auc_difference(b.cell, a.cell)
    return difference.significant and difference.value < 0


def significant_front(candidates: Sequence[Candidate], *, use_clip: bool) -> list[bool]:
    """Whether each candidate keeps its Pareto star: no other candidate dominates it significantly."""
    return [
        not any(dominates_significantly(b, a, use_clip=use_clip) for j, b in enumerate(candidates) if j != i)
        for i, a in enumerate(candidates)
    ]


# ---------------------------------------------------------------- the headline


@dataclass(frozen=True)
class HeadlineRow:
    """One defense in the headline: its rank, its worst cell and the figures behind both."""

    rank: int
    defense: str
    cell: str
    auc: Estimate
    tpr: Estimate
    tpr_supported: bool
    n_nonmembers: int
    # The test against the defense ranked just above (None for the first).
    versus_above: Difference | None
    fid: Estimate | None
    kid: Estimate | None
    clip: Estimate | None
    pareto: bool


@dataclass(frozen=True)
class Headline:
    """Every defense of one dataset and utility feature network, ranked."""

    dataset: str
    utility_key: tuple[str, str]
    rows: tuple[HeadlineRow, ...]


def utility_by_seed(entries: list[Entry]) -> dict[int, tuple[float | None, float | None, float | None]]:
    """(FID, KID, CLIP score) of the target per seed: one target per seed, whatever the scenario or attack."""
    out: dict[int, tuple[float | None, float | None, float | None]] = {}
    for e in sorted(entries, key=lambda e: (e.seed, e.scenario, e.attack, e.path)):
        if e.fid is not None and e.seed not in out:
            out[e.seed] = (e.fid, e.kid, e.clip)
    return out


def _seed_estimate(values: list[float | None]) -> Estimate | None:
    present = [v for v in values if v is not None]
    return stats.seed_mean(present) if present else None


def headline(dataset: str, utility_key: tuple[str, str], by_defense: dict[str, list[Entry]]) -> Headline | None:
    """Rank the defenses of one dataset and feature network by worst-case AUC; None if none has scores.

    Order: ascending worst-case AUC (mean over seeds; ties by name). Rank: 1 + the number of
    defenses above it whose worst cell's AUC is significantly lower (`auc_difference`), and
    never less than the rank of the defense listed above it, so
    defenses the test cannot tell apart share a rank, and a rank never chains across a
    significant gap the way neighbour-to-neighbour ties do. `versus_above` is the test
    against the defense just above, shown for reading the table.
    """
    ranked: list[tuple[str, Cell, dict[int, tuple[float | None, float | None, float | None]]]] = []
    for defense, entries in sorted(by_defense.items()):
        scored = [c for c in cells(entries) if c.has_scores]
        if scored:
            ranked.append((defense, worst_cell(scored), utility_by_seed(entries)))
    if not ranked:
        return None
    ranked.sort(key=lambda item: (item[1].mean_auc, item[0]))
    candidates = [
        Candidate(name, cell.mean_auc, cell, {s: (u[0], u[2]) for s, u in utility.items()})
        for name, cell, utility in ranked
    ]
    # As in the per-scenario tables: only defenses with a measured utility are on the plane.
    measured = [c for c in candidates if c.utility]
    use_clip = all(any(u[1] is not None for u in c.utility.values()) for c in measured)
    on_front = dict(zip((c.name for c in measured), significant_front(measured, use_clip=use_clip), strict=True))
    front = [on_front.get(c.name, False) for c in candidates]
    rows: list[HeadlineRow] = []
    for position, ((defense, cell, utility), star) in enumerate(zip(ranked, front, strict=True)):
        tests = [auc_difference(cell, above) for _, above, _ in ranked[:position]]
        versus = tests[-1] if tests else None
        # Listed by mean AUC, so a rank never goes up the table (a noisier defense below can
        # have fewer significant betters than the one above it).
        rank = max(rows[-1].rank if rows else 1, 1 + sum(t.significant and t.value > 0 for t in tests))
        cell_runs = runs(cell)
        n_nonmembers = min(int((labels == 0).sum()) for _, labels in cell_runs)
        values = list(utility.values())
        rows.append(
            HeadlineRow(
                rank=rank,
                defense=defense,
                cell=cell.name,
                auc=stats.auc_estimate(cell_runs),
                tpr=stats.tpr_at_fpr_estimate(cell_runs, HEADLINE_FPR),
                tpr_supported=n_nonmembers * HEADLINE_FPR >= 1.0,
                n_nonmembers=n_nonmembers,
                versus_above=versus,
                fid=_seed_estimate([u[0] for u in values]),
                kid=_seed_estimate([u[1] for u in values]),
                clip=_seed_estimate([u[2] for u in values]),
                pareto=star,
            )
        )
    return Headline(dataset, utility_key, tuple(rows))


def interval(estimate: Estimate | None) -> tuple[float, float] | None:
    """The estimate's interval, None where it has none (one seed of a utility figure)."""
    if estimate is None or math.isnan(estimate.low):
        return None
    return estimate.low, estimate.high
