"""A privacy regression gate: did NEW records leak more, or lose utility, against OLD ones?

Both sides are result records (a file or a folder of them). Records are matched by
cell: the whole run configuration but the seed and where results and caches live
(`benchmark.app.suite.cell_key`), so a committed baseline meets the new runs of the
same configuration. Within a cell every figure is compared with the test the data
allows (`benchmark.pipeline.statistics`):

- attack AUC and TPR at 1% FPR (higher = more leakage): a paired hierarchical bootstrap
  when both sides have the same seeds and each seed scores the same queries in the same
  order; otherwise the unpaired one.
- FID (higher = worse) and CLIP score (lower = worse): a paired t-test over seeds when
  both sides have the same two or more seeds; Welch's t-test when they have two or more
  each that do not pair; with one record per side, the normal approximation from each
  record's own bootstrap interval over captions (`UtilityRecord.intervals`). Anything
  less is reported, not tested.

A gate that compares hundreds of cells must not fire on noise, so three things guard it:

- **seeds**: where both sides have two or more seeds, the test's standard error counts the
  seed-to-seed spread (for the bootstrap, with the small-sample bias of resampling few
  seeds removed), not only the queries;
- **a margin**: the null hypothesis is "NEW differs from OLD by at most the margin in the
  worse direction" (`--margin`, 0.02 AUC and TPR by default), tested one-sided, so a
  difference below the margin is never a regression however many queries resolve it;
- **many tests**: the p-values of all cells and metrics are adjusted together (Holm by
  default, controlling the chance of any false regression; `--correction bh` controls the
  false discovery rate instead). A target's utility is shared by all the cells that attack
  it: it counts as one test, not one per cell.

The same comparison backs `assert_privacy_within`, the pytest assertion a defense
author uses to pin their defense's privacy in their own test suite.
"""

from __future__ import annotations

import difflib
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from benchmark.app.config import upgrade_config_dict
from benchmark.app.suite import cell_key
from benchmark.kernel.errors import ConfigError
from benchmark.pipeline import statistics as stats
from benchmark.pipeline.records import RecordError, ResultRecord, read_record, record_files
from benchmark.pipeline.statistics import Difference, Estimate

PRIVACY_FPR = 0.01
ALPHA = 0.05
RESAMPLES = stats.RESAMPLES
# A difference in attack AUC (or TPR) this small is no regression, however well resolved.
MARGIN = 0.02
UTILITY_MARGIN = 0.0
CORRECTION = stats.HOLM

REGRESSION = "regression"
IMPROVEMENT = "improvement"
NO_CHANGE = "no significant change"
NOT_TESTED = "not tested"

# Settings that never make two records different cells: the seed is what repeats within a cell.
_NOT_COMPARED = ("seed", "results_dir", "cache_dir")


@dataclass(frozen=True)
class Figure:
    """One side's figure in a cell: the mean over its seeds, with its 95% interval where there is one."""

    value: float
    low: float | None
    high: float | None
    n_seeds: int

    @classmethod
    def of(cls, estimate: Estimate, interval: tuple[float, float] | None = None) -> Figure:
        low, high = (estimate.low, estimate.high) if interval is None else interval
        return cls(estimate.value, _finite(low), _finite(high), estimate.n_seeds)


@dataclass(frozen=True)
class MetricChange:
    """NEW minus OLD for one metric of one cell, its test and what it means."""

    metric: str
    kind: str  # "privacy" or "utility"
    worse_when_higher: bool
    old: Figure | None
    new: Figure | None
    change: float | None
    low: float | None
    high: float | None
    # One-sided, against the margin, in the direction of the change; then adjusted for all the tests.
    p_value: float | None
    method: str
    verdict: str
    p_adjusted: float | None = None
    margin: float = 0.0


@dataclass(frozen=True)
class CellComparison:
    """One cell found on both sides: how its records paired, and each metric's change."""

    cell: str
    key: str
    n_new: int
    n_old: int
    pairing: str
    metrics: tuple[MetricChange, ...]


@dataclass(frozen=True)
class ComparisonReport:
    """Everything `compare` found; `to_dict`/`from_dict` are the `--json` file."""

    new: str
    old: str
    alpha: float
    resamples: int
    privacy_only: bool
    ignored: tuple[str, ...]
    cells: tuple[CellComparison, ...]
    only_new: tuple[str, ...]
    only_old: tuple[str, ...]
    skipped: tuple[str, ...]
    margin: float = MARGIN
    utility_margin: float = UTILITY_MARGIN
    correction: str = CORRECTION
    # Distinct tests the correction counted (a target's utility once, however many cells attack it).
    n_tests: int = 0

    def regressions(self) -> list[tuple[CellComparison, MetricChange]]:
        """The significant regressions that fail the gate (utility ones only without `privacy_only`)."""
        return [
            (cell, m)
            for cell in self.cells
            for m in cell.metrics
            if m.verdict == REGRESSION and (m.kind == "privacy" or not self.privacy_only)
        ]

    @property
    def failed(self) -> bool:
        return bool(self.regressions())

    def to_dict(self) -> dict[str, Any]:
        return {
            "new": self.new,
            "old": self.old,
            "alpha": self.alpha,
            "resamples": self.resamples,
            "privacy_only": self.privacy_only,
            "margin": self.margin,
            "utility_margin": self.utility_margin,
            "correction": self.correction,
            "n_tests": self.n_tests,
            "ignored": list(self.ignored),
            "failed": self.failed,
            "cells": [
                {
                    "cell": c.cell,
                    "key": c.key,
                    "n_new": c.n_new,
                    "n_old": c.n_old,
                    "pairing": c.pairing,
                    "metrics": [
                        {
                            **{k: v for k, v in vars(m).items() if k not in ("old", "new")},
                            "old": None if m.old is None else vars(m.old),
                            "new": None if m.new is None else vars(m.new),
                        }
                        for m in c.metrics
                    ],
                }
                for c in self.cells
            ],
            "only_new": list(self.only_new),
            "only_old": list(self.only_old),
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComparisonReport:
        def metric(m: Mapping[str, Any]) -> MetricChange:
            sides = {k: None if m[k] is None else Figure(**m[k]) for k in ("old", "new")}
            return MetricChange(**{**{k: v for k, v in m.items() if k not in ("old", "new")}, **sides})

        return cls(
            new=data["new"],
            old=data["old"],
            alpha=data["alpha"],
            resamples=data["resamples"],
            privacy_only=data["privacy_only"],
            margin=data["margin"],
            utility_margin=data["utility_margin"],
            correction=data["correction"],
            n_tests=data["n_tests"],
            ignored=tuple(data["ignored"]),
            cells=tuple(
                CellComparison(
                    **{k: v for k, v in c.items() if k != "metrics"},
                    metrics=tuple(metric(m) for m in c["metrics"]),
                )
                for c in data["cells"]
            ),
            only_new=tuple(data["only_new"]),
            only_old=tuple(data["only_old"]),
            skipped=tuple(data["skipped"]),
        )


# ---------------------------------------------------------------- reading and matching


def load_records(path: Path, *, name: str) -> tuple[tuple[ResultRecord, ...], tuple[str, ...]]:
    """The records at `path` (a record file, or a folder searched recursively) and the files left out.

    A named file must be a valid record; in a folder, files that are not are left out and
    listed (a suite's summary JSON may sit beside its records).

    Raises:
        ConfigError: `path` does not exist, or holds no readable record (naming `name`, the argument).
        RecordError: a named file is not a valid record.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{name} {path} does not exist; pass a result record file or a folder of them")
    if not path.is_dir():
        return (read_record(path),), ()
    files = record_files(path)
    records, skipped = [], []
    for file in files:
        try:
            records.append(read_record(file))
        except RecordError as exc:
            skipped.append(str(exc))
    if not records:
        found = f"{len(files)} *.json / *.json.xz file(s), none a valid record" if files else "no *.json or *.json.xz"
        first = f" (first: {skipped[0]})" if skipped else ""
        raise ConfigError(
            f"{name} {path}: no result records ({found}{first}); pass the results folder of "
            "`python -m benchmark run` or `suite`, or one record file"
        )
    return tuple(records), tuple(skipped)


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _settings(record: ResultRecord, ignore: Sequence[str]) -> dict[str, Any]:
    """The record's configuration under today's names, less the ignored settings (dotted for nested ones)."""
    config = json.loads(json.dumps(upgrade_config_dict(record.config), default=str))
    for name in ignore:
        *parents, leaf = name.split(".")
        inner = config
        for part in parents:
            inner = inner.get(part) if isinstance(inner, dict) else None
        if isinstance(inner, dict):
            inner.pop(leaf, None)
    return config


def _key(record: ResultRecord, ignore: Sequence[str]) -> str:
    return cell_key({**_settings(record, ignore), "seed": None})


def _label(record: ResultRecord) -> str:
    defense = record.components["defense"].label
    return f"{record.dataset} / {record.scenario} / {defense} / {record.attack.family} {record.attack.attack_model}"


def seed_of(record: ResultRecord) -> int:
    """The run seed (the one that repeats a cell)."""
    return int(record.seeds.get("seed", record.config.get("seed", record.attack.seed)))


def _cells(records: Iterable[ResultRecord], ignore: Sequence[str]) -> dict[str, list[ResultRecord]]:
    cells: dict[str, list[ResultRecord]] = defaultdict(list)
    for record in records:
        cells[_key(record, ignore)].append(record)
    # Sorted so that the same inputs give the same runs in the same order, whatever the file order.
    return {k: sorted(v, key=lambda r: (seed_of(r), r.run_id)) for k, v in cells.items()}


def _check_ignored(ignore: Sequence[str], records: Iterable[ResultRecord]) -> None:
    known = {name for r in records for name in _flat(upgrade_config_dict(r.config))}
    for name in ignore:
        if name not in known and not any(k.startswith(f"{name}.") for k in known):
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"--ignore {name!r}: no record has that setting{hint} (nested ones are dotted, e.g. finetune.epochs)"
            )


def _closest_difference(
    new: Mapping[str, Sequence[ResultRecord]], old: Mapping[str, Sequence[ResultRecord]], ignore: Sequence[str]
) -> list[str]:
    """The settings in which the most alike NEW and OLD cells differ (what to --ignore to match them)."""
    flat_new = [_flat(_settings(records[0], ignore)) for records in new.values()]
    flat_old = [_flat(_settings(records[0], ignore)) for records in old.values()]
    best: list[str] | None = None
    for fa in flat_new:
        for fb in flat_old:
            differ = sorted(k for k in fa.keys() | fb.keys() if k not in _NOT_COMPARED and fa.get(k) != fb.get(k))
            if best is None or len(differ) < len(best):
                best = differ
    return best or []


# ---------------------------------------------------------------- the tests per cell


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _runs(records: Sequence[ResultRecord]) -> list[stats.Run]:
    return [
        (np.asarray(r.attack.membership_scores, dtype=np.float64), np.asarray(r.attack.labels, dtype=int))
        for r in records
    ]


def _pairing(new: Sequence[ResultRecord], old: Sequence[ResultRecord]) -> str | None:
    """None when the sides pair seed by seed on the same queries; otherwise why they do not."""
    seeds_new, seeds_old = [seed_of(r) for r in new], [seed_of(r) for r in old]
    if len(set(seeds_new)) < len(seeds_new) or len(set(seeds_old)) < len(seeds_old):
        return "a seed repeats on one side"
    if seeds_new != seeds_old:
        return f"other seeds (new {_seeds(seeds_new)}, old {_seeds(seeds_old)})"
    for a, b in zip(new, old, strict=True):
        if a.attack.query_ids != b.attack.query_ids or a.attack.labels != b.attack.labels:
            return f"seed {seed_of(a)} scores other queries"
    return None


def _seeds(seeds: Iterable[int]) -> str:
    return ",".join(str(s) for s in seeds)


@dataclass(frozen=True)
class _Test:
    """One metric of one cell before the correction: its change and both one-sided p-values."""

    change: MetricChange
    # One-sided p that the change lies beyond the margin in the worse / the better direction (None: untested).
    p_worse: float | None
    p_better: float | None
    # Equal for tests of the same evidence (a target's utility seen from each cell that attacks it).
    identity: tuple[Any, ...]


def _test(
    metric: str,
    kind: str,
    worse_when_higher: bool,
    old: Figure,
    new: Figure,
    diff: Difference,
    margin: float,
    identity: tuple[Any, ...],
) -> _Test:
    method = diff.method
    if kind == "privacy" and diff.n_seeds > 1:
        method += f"; tested over seeds (t, {'inf' if math.isinf(diff.dof) else f'{diff.dof:.3g}'} df)"
    change = MetricChange(
        metric=metric,
        kind=kind,
        worse_when_higher=worse_when_higher,
        old=old,
        new=new,
        change=diff.value,
        low=_finite(diff.low),
        high=_finite(diff.high),
        p_value=None,
        method=method,
        verdict=NOT_TESTED,
        margin=margin,
    )
    up = _finite(stats.margin_p_value(diff, margin, higher=True))
    down = _finite(stats.margin_p_value(diff, margin, higher=False))
    if up is None or down is None:
        return _Test(replace(change, method=f"{method}; not tested: no standard error"), None, None, identity)
    worse, better = (up, down) if worse_when_higher else (down, up)
    return _Test(change, worse, better, identity)


def _decide(tests: Sequence[_Test], alpha: float, correction: str) -> tuple[list[MetricChange], int]:
    """Every test's verdict after adjusting all p-values together, and the number of distinct tests.

    Regressions and improvements are each one family (the gate only reads the first). Tests
    of the same evidence share one slot, so repeating a target's utility in every cell that
    attacks it does not make the correction stricter.
    """
    slots: dict[tuple[Any, ...], int] = {}
    worse: list[float] = []
    better: list[float] = []
    for t in tests:
        if t.p_worse is not None and t.p_better is not None and t.identity not in slots:
            slots[t.identity] = len(worse)
            worse.append(t.p_worse)
            better.append(t.p_better)
    adj_worse = stats.adjusted_p_values(worse, correction)
    adj_better = stats.adjusted_p_values(better, correction)
    out = []
    for t in tests:
        if t.p_worse is None or t.p_better is None:
            out.append(t.change)
            continue
        slot = slots[t.identity]
        change = t.change.change or 0.0
        got_worse = change != 0 and (change > 0) == t.change.worse_when_higher
        raw, adjusted = (t.p_worse, adj_worse[slot]) if got_worse else (t.p_better, adj_better[slot])
        verdict = NO_CHANGE
        if adjusted < alpha and change != 0:
            verdict = REGRESSION if got_worse else IMPROVEMENT
        out.append(replace(t.change, p_value=float(raw), p_adjusted=float(adjusted), verdict=verdict))
    return out, len(slots)


def _privacy(
    new: Sequence[ResultRecord],
    old: Sequence[ResultRecord],
    paired: bool,
    margin: float,
    resamples: int,
    identity: tuple[Any, ...],
) -> list[_Test]:
    a, b = _runs(new), _runs(old)
    auc = (stats.paired_auc_difference if paired else stats.unpaired_auc_difference)(a, b, resamples=resamples)
    tpr = (stats.paired_tpr_difference if paired else stats.unpaired_tpr_difference)(
        a, b, PRIVACY_FPR, resamples=resamples
    )
    tpr_name = f"TPR@{PRIVACY_FPR:.0%}FPR"
    return [
        _test(
            "attack AUC",
            "privacy",
            True,
            Figure.of(stats.auc_estimate(b, resamples=resamples)),
            Figure.of(stats.auc_estimate(a, resamples=resamples)),
            auc,
            margin,
            (*identity, "auc"),
        ),
        _test(
            tpr_name,
            "privacy",
            True,
            Figure.of(stats.tpr_at_fpr_estimate(b, PRIVACY_FPR, resamples=resamples)),
            Figure.of(stats.tpr_at_fpr_estimate(a, PRIVACY_FPR, resamples=resamples)),
            tpr,
            margin,
            (*identity, tpr_name),
        ),
    ]


# (record field, shown name, worse when higher)
UTILITY_METRICS = (("fid", "FID", True), ("clip_score", "CLIP score", False))


def _utility_side(records: Sequence[ResultRecord], field: str) -> list[tuple[int, float, tuple[float, float] | None]]:
    return [
        (seed_of(r), float(getattr(r.utility.target, field)), r.utility.intervals.get(field))
        for r in records
        if r.utility is not None
    ]


def _untested(name: str, worse_up: bool, old: Figure | None, new: Figure | None, why: str, margin: float) -> _Test:
    change = None if old is None or new is None else new.value - old.value
    metric = MetricChange(name, "utility", worse_up, old, new, change, None, None, None, why, NOT_TESTED, margin=margin)
    return _Test(metric, None, None, ())


def _utility(
    new: Sequence[ResultRecord],
    old: Sequence[ResultRecord],
    field: str,
    name: str,
    worse_up: bool,
    margin: float,
) -> _Test:
    a, b = _utility_side(new, field), _utility_side(old, field)
    if not a or not b:
        missing = " and ".join(side for side, values in (("NEW", a), ("OLD", b)) if not values)
        return _untested(name, worse_up, None, None, f"no utility figures in {missing}", margin)
    single = len(a) == 1 and len(b) == 1
    # With one record per side, its own interval over captions is the only uncertainty there is to show.
    fig_new = Figure.of(stats.seed_mean([v for _, v, _ in a]), a[0][2] if single else None)
    fig_old = Figure.of(stats.seed_mean([v for _, v, _ in b]), b[0][2] if single else None)
    seeds_a, seeds_b = [s for s, _, _ in a], [s for s, _, _ in b]
    if len(a) >= 2 and len(b) >= 2:
        if seeds_a == seeds_b and len(set(seeds_a)) == len(seeds_a):
            diff = stats.paired_seed_difference([v for _, v, _ in a], [v for _, v, _ in b])
        else:
            diff = stats.welch_seed_difference([v for _, v, _ in a], [v for _, v, _ in b])
    elif single and a[0][2] is not None and b[0][2] is not None:
        diff = stats.interval_difference(a[0][1], a[0][2], b[0][1], b[0][2])
    else:
        why = "not tested: needs two or more seeds per side, or one record per side with utility intervals"
        return _untested(name, worse_up, fig_old, fig_new, why, margin)
    # The same target's utility in every cell that attacks it: one test, identified by its evidence.
    identity = ("utility", name, tuple(a), tuple(b))
    return _test(name, "utility", worse_up, fig_old, fig_new, diff, margin, identity)


def _cell_tests(
    new: Sequence[ResultRecord],
    old: Sequence[ResultRecord],
    *,
    margin: float,
    utility_margin: float,
    resamples: int,
    identity: tuple[Any, ...],
) -> tuple[str, list[_Test]]:
    why_not = _pairing(new, old)
    try:
        tests = _privacy(new, old, why_not is None, margin, resamples, identity)
    except ValueError as exc:
        raise ConfigError(f"{_label(new[0])}: cannot compare its attack scores ({exc})") from None
    tests += [_utility(new, old, field, name, worse_up, utility_margin) for field, name, worse_up in UTILITY_METRICS]
    pairing = f"paired by seed ({_seeds(seed_of(r) for r in new)})" if why_not is None else f"unpaired: {why_not}"
    return pairing, tests


def compare_cell(
    new: Sequence[ResultRecord],
    old: Sequence[ResultRecord],
    *,
    alpha: float = ALPHA,
    resamples: int = stats.RESAMPLES,
    margin: float = MARGIN,
    utility_margin: float = UTILITY_MARGIN,
    correction: str = CORRECTION,
) -> tuple[str, list[MetricChange]]:
    """(how the records paired, every metric's change) for the records of one cell on each side.

    The correction spans this cell's metrics only; `compare` spans every cell.

    Raises:
        ConfigError: a record's per-query evidence cannot be resampled (no members or no non-members).
    """
    pairing, tests = _cell_tests(
        new, old, margin=margin, utility_margin=utility_margin, resamples=resamples, identity=("cell",)
    )
    return pairing, _decide(tests, alpha, correction)[0]


def check_options(
    *,
    alpha: float,
    resamples: int,
    margin: float = MARGIN,
    utility_margin: float = UTILITY_MARGIN,
    correction: str = CORRECTION,
) -> None:
    """Raises: ConfigError: alpha outside (0, 1), no resample, a negative margin or an unknown correction."""
    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha must lie between 0 and 1 (e.g. 0.05), got {alpha}")
    if resamples < 1:
        raise ConfigError(f"--resamples must be at least 1 (e.g. {stats.RESAMPLES}), got {resamples}")
    for flag, value, example in (("--margin", margin, MARGIN), ("--utility-margin", utility_margin, 1.0)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(
                f"{flag} is a difference no larger than which is no change: >= 0 (e.g. {example}), got {value}"
            )
    if correction not in stats.CORRECTIONS:
        close = difflib.get_close_matches(correction, stats.CORRECTIONS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"--correction {correction!r} is unknown; {hint}choose one of {', '.join(stats.CORRECTIONS)}")


def compare(
    new: Path,
    old: Path,
    *,
    alpha: float = ALPHA,
    resamples: int = stats.RESAMPLES,
    privacy_only: bool = False,
    ignore: Sequence[str] = (),
    margin: float = MARGIN,
    utility_margin: float = UTILITY_MARGIN,
    correction: str = CORRECTION,
) -> ComparisonReport:
    """Compare the records at `new` against those at `old`, cell by cell.

    Args:
        new, old: a record file or a folder of records each.
        alpha: the level of a "regression" or "improvement", after the correction (intervals are 95% regardless).
        resamples: bootstrap resamples for the privacy figures (seeded: the same inputs give the same report).
        privacy_only: utility regressions are reported but do not fail the gate (and are
            corrected as a family of their own).
        ignore: settings (dotted for nested ones) left out of the cell match, e.g. `defense_args`
            to set a new recipe against the old one.
        margin: a change in attack AUC or TPR of at most this much is no change.
        utility_margin: the same for FID and CLIP score (in their own units).
        correction: how the p-values of all tests are adjusted together (`holm`, `bh`, `none`).

    Raises:
        ConfigError: a path holds no records, no cell is on both sides, or an option is out of range.
        RecordError: a named record file is invalid.
    """
    check_options(alpha=alpha, resamples=resamples, margin=margin, utility_margin=utility_margin, correction=correction)
    new_records, new_skipped = load_records(new, name="NEW")
    old_records, old_skipped = load_records(old, name="OLD")
    _check_ignored(ignore, (*new_records, *old_records))
    new_cells, old_cells = _cells(new_records, ignore), _cells(old_records, ignore)
    shared = [k for k in new_cells if k in old_cells]
    if not shared:
        differ = _closest_difference(new_cells, old_cells, ignore)
        hint = (
            f"the closest cells differ in {', '.join(differ)}; if that is the change under test, "
            f"pass --ignore {' --ignore '.join(differ)}"
            if differ
            else "their configurations differ"
        )
        raise ConfigError(
            f"nothing to compare: none of NEW's {len(new_cells)} cell(s) ({_cell_list(new_cells)}) is among OLD's "
            f"{len(old_cells)} ({_cell_list(old_cells)}); a cell is the whole run configuration but the seed; {hint}"
        )
    keys = sorted(shared, key=lambda k: (_label(new_cells[k][0]), k))
    pairings, tests = {}, []
    for key in keys:
        pairings[key], cell_tests = _cell_tests(
            new_cells[key],
            old_cells[key],
            margin=margin,
            utility_margin=utility_margin,
            resamples=resamples,
            identity=("privacy", key),
        )
        tests += [(key, t) for t in cell_tests]
    # One family for what the gate reads; with --privacy-only the utility tests are a family of their own.
    families = [[t for t in tests if not privacy_only or t[1].change.kind == "privacy"]]
    if privacy_only:
        families.append([t for t in tests if t[1].change.kind != "privacy"])
    decided: dict[str, list[MetricChange]] = defaultdict(list)
    n_tests = 0
    for family in families:
        changes, counted = _decide([t for _, t in family], alpha, correction)
        n_tests += counted
        for (key, _), change in zip(family, changes, strict=True):
            decided[key].append(change)
    cells = []
    for key in keys:
        label_new, label_old = _label(new_cells[key][0]), _label(old_cells[key][0])
        label = label_new if label_new == label_old else f"{label_new} (old: {label_old})"
        metrics = tuple(decided[key])
        cells.append(CellComparison(label, key, len(new_cells[key]), len(old_cells[key]), pairings[key], metrics))
    return ComparisonReport(
        new=str(new),
        old=str(old),
        alpha=alpha,
        resamples=resamples,
        privacy_only=privacy_only,
        ignored=tuple(ignore),
        cells=tuple(_unique_labels(cells)),
        only_new=tuple(sorted(_label(v[0]) for k, v in new_cells.items() if k not in old_cells)),
        only_old=tuple(sorted(_label(v[0]) for k, v in old_cells.items() if k not in new_cells)),
        skipped=(*(f"NEW: {s}" for s in new_skipped), *(f"OLD: {s}" for s in old_skipped)),
        margin=margin,
        utility_margin=utility_margin,
        correction=correction,
        n_tests=n_tests,
    )


def _cell_list(cells: Mapping[str, Sequence[ResultRecord]], limit: int = 3) -> str:
    labels = sorted({_label(v[0]) for v in cells.values()})
    return "; ".join(labels[:limit]) + (f"; and {len(labels) - limit} more" if len(labels) > limit else "")


def _unique_labels(cells: list[CellComparison]) -> list[CellComparison]:
    """Cells that differ only in settings the label does not show get their key's start appended."""
    counts: dict[str, int] = defaultdict(int)
    for c in cells:
        counts[c.cell] += 1
    return [c if counts[c.cell] == 1 else replace(c, cell=f"{c.cell} [{c.key[:8]}]") for c in cells]


# ---------------------------------------------------------------- output

SHOWN_SKIPPED = 5


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _interval(low: float | None, high: float | None, signed: bool = False) -> str:
    if low is None or high is None:
        return ""
    return f" [{_number(low, signed)}, {_number(high, signed)}]"


def _p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if value >= 1e-4 else f"{value:.1e}"


def _figure(figure: Figure | None) -> str:
    return "n/a" if figure is None else _number(figure.value) + _interval(figure.low, figure.high)


def render(report: ComparisonReport, console: Console) -> None:
    """One table per cell, then the cells found on one side only, the files left out and the outcome."""
    colour = {REGRESSION: "red", IMPROVEMENT: "green"}
    for cell in report.cells:
        table = Table(title=f"{escape(cell.cell)}: {cell.n_new} new vs {cell.n_old} old record(s), {cell.pairing}")
        for column in (
            "metric",
            "old [95%]",
            "new [95%]",
            "change [95%]",
            "margin",
            "p",
            "p adj.",
            "verdict",
            "method",
        ):
            table.add_column(column, justify="left" if column in ("metric", "verdict", "method") else "right")
        for m in cell.metrics:
            arrow = "↓" if m.worse_when_higher else "↑"  # the better direction
            verdict = m.verdict if m.verdict not in colour else f"[{colour[m.verdict]}]{m.verdict}[/]"
            table.add_row(
                f"{m.metric} {arrow}",
                _figure(m.old),
                _figure(m.new),
                _number(m.change, signed=True) + _interval(m.low, m.high, signed=True),
                f"±{m.margin:g}",
                _p(m.p_value),
                _p(m.p_adjusted),
                verdict,
                escape(m.method),
            )
        console.print(table)
    for side, labels in (("NEW", report.only_new), ("OLD", report.only_old)):
        for label in labels:
            console.print(f"only in {side} (not compared): {escape(label)}", soft_wrap=True)
    # A folder with a model cache inside holds many JSON files that are not records: show a few.
    for skipped in report.skipped[:SHOWN_SKIPPED]:
        console.print(f"[yellow]skipped[/] {escape(skipped)}", soft_wrap=True)
    if len(report.skipped) > SHOWN_SKIPPED:
        console.print(f"[yellow]skipped[/] {len(report.skipped) - SHOWN_SKIPPED} more file(s) (all in --json)")
    regressions = report.regressions()
    for cell, m in regressions:
        console.print(
            f"[red]regression:[/] {escape(cell.cell)}: {m.metric} {_figure(m.old)} -> {_figure(m.new)}, "
            f"beyond the margin {m.margin:g}: p = {_p(m.p_value)}, {report.correction}-adjusted {_p(m.p_adjusted)} "
            f"< alpha {report.alpha}",
            soft_wrap=True,
        )
    gated = "privacy" if report.privacy_only else "privacy or utility"
    if regressions:
        console.print(f"[red]{len(regressions)} significant {gated} regression(s)[/] in {len(report.cells)} cell(s)")
    else:
        console.print(f"no significant {gated} regression in {len(report.cells)} cell(s) (alpha {report.alpha})")
    console.print(
        f"{report.n_tests} distinct test(s), one-sided against margins of {report.margin:g} (privacy) and "
        f"{report.utility_margin:g} (utility), p-values adjusted by {stats.CORRECTION_NAMES[report.correction]}",
        soft_wrap=True,
    )


def write_json(report: ComparisonReport, path: Path) -> None:
    """Raises: ConfigError: the file cannot be written (naming `--json` and the fix)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    except OSError as exc:
        raise ConfigError(
            f"--json {path} cannot be written ({exc.strerror or exc}); pass a writable file path"
        ) from None


# ---------------------------------------------------------------- the pytest assertion


@dataclass(frozen=True)
class PrivacyCheck:
    """A cell's attack AUC against its baseline (a pinned AUC or baseline records), tested as `compare` does."""

    cell: str
    auc: Estimate
    # The AUC minus the baseline's, with its 95% interval.
    change: Difference
    margin: float
    # One-sided p that the AUC exceeds the baseline by more than `margin`, and after Holm over all checked cells.
    p_value: float
    p_adjusted: float
    alpha: float = ALPHA

    @property
    def leaks_more(self) -> bool:
        """The AUC exceeds the baseline by more than `margin`, significantly after the correction."""
        return self.p_adjusted < self.alpha

    def describe(self) -> str:
        return (
            f"{self.cell}: AUC {self.auc.value:.3f} [{self.auc.low:.3f}, {self.auc.high:.3f}], "
            f"{self.change.value:+.3f} [{self.change.low:+.3f}, {self.change.high:+.3f}] against the baseline "
            f"({self.change.method}); beyond the margin {self.margin:g}: p = {_p(self.p_value)}, "
            f"Holm-adjusted {_p(self.p_adjusted)}"
        )


RecordsLike = Path | str | ResultRecord | Iterable[ResultRecord]


def _as_records(value: RecordsLike, name: str) -> tuple[ResultRecord, ...]:
    if isinstance(value, ResultRecord):
        return (value,)
    if isinstance(value, str | Path):
        return load_records(Path(value), name=name)[0]
    records = tuple(value)
    if not records or not all(isinstance(r, ResultRecord) for r in records):
        raise ConfigError(
            f"{name}: pass result records, a record file or a folder of them (got {len(records)} item(s))"
        )
    return records


def assert_privacy_within(
    records: RecordsLike,
    baseline: float | RecordsLike,
    *,
    margin: float = MARGIN,
    alpha: float = ALPHA,
    resamples: int = stats.RESAMPLES,
) -> tuple[PrivacyCheck, ...]:
    """Fail (AssertionError) when the attack AUC of `records` is significantly above `baseline`.

    The rule is `compare`'s: a one-sided test that AUC minus baseline exceeds `margin`, with
    a standard error that counts seeds and queries, Holm-adjusted over the cells checked, at
    level `alpha`. A pinned number is a ceiling for every cell of `records` (hierarchical
    bootstrap of their AUC); baseline records are matched cell by cell as in `compare`
    (paired by seed and query where they can be). Use it in a defense's own test suite, on
    records of the micro profile::

        from benchmark.app.compare import assert_privacy_within
        from benchmark.app.config import profile
        from benchmark.app.runner import run

        def test_my_defense_keeps_its_privacy(tmp_path):
            base = profile("micro").replace(defense="mydefense.v1", results_dir=tmp_path, cache_dir=tmp_path / "c")
            records = [run(base.replace(seed=s), show_progress=False).record for s in (0, 1, 2)]
            assert_privacy_within(records, 0.62)                       # pinned AUC
            assert_privacy_within(records, "tests/baseline-records")   # or committed records

    Returns:
        One check per cell, for logging.

    Raises:
        AssertionError: a cell leaks significantly more, each such cell named with its figures.
        ConfigError: no records, a pinned AUC outside [0, 1], or a cell missing from the baseline records.
    """
    check_options(alpha=alpha, resamples=resamples, margin=margin)
    new = _as_records(records, "records")
    cells = _cells(new, ())
    found: list[tuple[str, Estimate, Difference]] = []
    if isinstance(baseline, int | float) and not isinstance(baseline, bool):
        if not 0 <= baseline <= 1:
            raise ConfigError(f"a pinned baseline is an attack AUC in [0, 1], got {baseline}")
        pinned = float(baseline)
        for group in cells.values():
            auc = stats.auc_estimate(_runs(group), resamples=resamples)
            change = Difference(
                auc.value - pinned,
                auc.low - pinned,
                auc.high - pinned,
                math.nan,
                auc.n_seeds,
                f"{auc.method}, against the pinned AUC {pinned:g}",
                se=auc.se,
            )
            found.append((_label(group[0]), auc, change))
    else:
        old_cells = _cells(_as_records(baseline, "baseline"), ())
        missing = [_label(v[0]) for k, v in cells.items() if k not in old_cells]
        if missing:
            raise ConfigError(
                f"baseline records have no cell like {', '.join(sorted(missing))}; record the baseline with the "
                "same configuration (all but the seed)"
            )
        for key, group in cells.items():
            a, b = _runs(group), _runs(old_cells[key])
            paired = _pairing(group, old_cells[key]) is None
            diff = (stats.paired_auc_difference if paired else stats.unpaired_auc_difference)(a, b, resamples=resamples)
            found.append((_label(group[0]), stats.auc_estimate(a, resamples=resamples), diff))
    raw = [stats.margin_p_value(diff, margin, higher=True) for _, _, diff in found]
    # A record without a standard error (a single resample) cannot show a significant excess.
    raw = [1.0 if math.isnan(p) else p for p in raw]
    adjusted = stats.adjusted_p_values(raw, stats.HOLM)
    checks = [
        PrivacyCheck(cell, auc, diff, margin, float(p), float(q), alpha)
        for (cell, auc, diff), p, q in zip(found, raw, adjusted, strict=True)
    ]
    leaks = [c for c in checks if c.leaks_more]
    if leaks:
        over = f" by more than {margin:g}" if margin else ""
        raise AssertionError(
            f"attack AUC significantly above the baseline{over} in {len(leaks)} cell(s):\n"
            + "\n".join(f"  {c.describe()}" for c in leaks)
        )
    return tuple(checks)
