"""Recompute a stored record and compare (RobustBench's recomputation check for contributed results).

The record's own configuration is run again from scratch (the same seeds, splits
and components; a plugin defense must be installed). The figures must agree
within stated tolerances: training on another machine or thread count is not
bit-identical, so the check is a tolerance, not equality. The member and
non-member ids must match exactly: a record on other data is not a reproduction.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import pandas as pd
from rich.console import Console

from benchmark.app.config import RunConfig
from benchmark.app.runner import run
from benchmark.app.suite import cell_key
from benchmark.kernel.errors import BenchmarkError
from benchmark.pipeline.records import ResultRecord, read_record

# Two draws with the seed-to-seed spread sigma differ by less than 1.96 x sqrt(2) x sigma, 95% of the time.
SPREAD_MULTIPLIER = 1.96 * math.sqrt(2)

# A defense's own spread replaces the folder's only on this many degrees of freedom or more. An sd
# on k of them is uncertain by a factor: the 95% interval for sigma runs from 0.52 to 6.3 times the
# estimate with k = 2 (one configuration's utility over three seeds), from 0.64 to 2.2 with k = 6.
MIN_DEFENSE_DOF = 6

# Tolerance field -> (figure, relative, drawn per cell). Attack figures are drawn per cell; FID and
# CLIP score are the target's, one value per configuration and seed whatever the scenario and attack
# model, so they are counted once per seed, not once per cell.
_SPREADS: dict[str, tuple[str, bool, bool]] = {
    "auc": ("attack_auc", False, True),
    "balanced_accuracy": ("attack_balanced_accuracy", False, True),
    "fid_relative": ("fid", True, False),
    "clip_score_relative": ("clip_score", True, False),
}


class SpreadBasis(TypedDict):
    """What a measured tolerance rests on (plain JSON values).

    For FID and CLIP score a cell is a defense configuration over all its scenarios and attack
    models, and a record is one seed's value.
    """

    sd: float
    cells: int
    records: int
    # "defense": the groups of the record's own configuration; "folder": every group of the folder.
    scope: Literal["defense", "folder"]


@dataclass(frozen=True)
class _Pooled:
    """A pooled within-group sum of squares and what it counts."""

    squares: float
    dof: int
    cells: int
    records: int

    @classmethod
    def of(cls, stats: pd.DataFrame) -> _Pooled:
        """From per-group rows with `n` (values) and `ss` (squared deviations from the group mean)."""
        return cls(float(stats["ss"].sum()), int((stats["n"] - 1).sum()), len(stats), int(stats["n"].sum()))

    @property
    def sd(self) -> float:
        return math.sqrt(self.squares / self.dof)


def defense_key(config: dict[str, Any]) -> str:
    """A cell's configuration without seed, scenario and attack model: one defense's fine-tuned targets."""
    return cell_key({**config, "seed": None, "scenario": None, "attack_model": None})


@dataclass(frozen=True)
class Tolerance:
    """How far a recomputed figure may sit from the stored one.

    AUC and balanced accuracy are absolute; FID, CLIP score and epsilon are relative.
    The defaults are fixed guesses for a folder without repeated seeds; `from_seed_spread`
    sets them from the spread measured between seeds of the same cell.
    """

    auc: float = 0.10
    balanced_accuracy: float = 0.10
    fid_relative: float = 0.25
    clip_score_relative: float = 0.15
    # The accountant is deterministic: only the noise multiplier's search tolerance moves it.
    epsilon_relative: float = 0.01
    # Where the figures came from: figure name (attack_auc, fid, ...) -> what its spread rests on.
    basis: dict[str, SpreadBasis] = field(default_factory=dict, compare=False)

    @classmethod
    def from_seed_spread(
        cls,
        records: Iterable[ResultRecord],
        *,
        fallback: Tolerance | None = None,
        like: ResultRecord | None = None,
    ) -> Tolerance:
        """Tolerances of SPREAD_MULTIPLIER x the pooled seed-to-seed standard deviation.

        The spread is measured within groups of records that differ only by seed and pooled
        over groups (absolute for AUC and balanced accuracy, of the logarithm for FID and CLIP
        score, so relative). For attack figures a group is a cell (the whole configuration but
        the seed). FID and CLIP score measure the target, the same for every scenario and
        attack model: a group is the configuration without seed, scenario and attack model,
        and each seed's value counts once.

        With `like`, each figure is pooled over the groups of `like`'s defense configuration
        (`defense_key`) alone when they give MIN_DEFENSE_DOF degrees of freedom or more, so a
        steady defense is not judged by the spread of a noisy one; otherwise over the folder.
        `basis` names the scope used. A figure with no repeated group keeps `fallback`'s value.
        """
        fallback = fallback or cls()
        columns = ["cell", "defense", "target", "seed", *(metric for metric, _, _ in _SPREADS.values())]
        frame = pd.DataFrame(
            [
                {
                    "cell": cell_key({**record.config, "seed": None}),
                    "defense": defense_key(record.config),
                    # Records of another attack family or access on the same defense measure the same target.
                    "target": repr((record.config.get("defense"), record.config.get("defense_args"))),
                    "seed": record.config.get("seed"),
                    **figures(record),
                }
                for record in records
            ],
            columns=columns,
        )
        own = defense_key(like.config) if like is not None else None
        values: dict[str, float] = {}
        basis: dict[str, SpreadBasis] = {}
        for name, (metric, relative, per_cell) in _SPREADS.items():
            x = pd.to_numeric(frame[metric], errors="coerce")
            data = frame.assign(x=x)[x > 0]
            if not per_cell:
                # Every scenario, attack model and attack family repeats its target's value in a seed:
                # the first one stands for them.
                data = data.drop_duplicates(["target", "seed", "x"])
            if relative:
                data = data.assign(x=np.log(data["x"]))
            keys = ["defense", "cell"] if per_cell else ["defense"]
            squared = (data["x"] - data.groupby(keys)["x"].transform("mean")) ** 2
            stats = data.assign(ss=squared).groupby(keys).agg(n=("x", "size"), ss=("ss", "sum"))
            stats = stats[stats["n"] >= 2]
            if stats.empty:
                continue
            pooled = _Pooled.of(stats)
            scope: Literal["defense", "folder"] = "folder"
            if own is not None:
                mine = _Pooled.of(stats[stats.index.get_level_values("defense") == own])
                if mine.dof >= MIN_DEFENSE_DOF:
                    pooled, scope = mine, "defense"
            sd = pooled.sd
            values[name] = math.expm1(SPREAD_MULTIPLIER * sd) if relative else SPREAD_MULTIPLIER * sd
            basis[metric] = SpreadBasis(sd=sd, cells=pooled.cells, records=pooled.records, scope=scope)
        return replace(fallback, **values, basis=basis)

    def allowed(self, metric: str, stored: float) -> float:
        absolute = {"attack_auc": self.auc, "attack_balanced_accuracy": self.balanced_accuracy}
        relative = {"fid": self.fid_relative, "clip_score": self.clip_score_relative, "epsilon": self.epsilon_relative}
        if metric in absolute:
            return absolute[metric]
        return relative[metric] * abs(stored)


@dataclass(frozen=True)
class Comparison:
    metric: str
    stored: float | None
    recomputed: float | None
    allowed: float

    @property
    def ok(self) -> bool:
        if self.stored is None or self.recomputed is None:
            return self.stored is None and self.recomputed is None
        return abs(self.recomputed - self.stored) <= self.allowed + 1e-12


@dataclass(frozen=True)
class Reproduction:
    path: Path
    comparisons: list[Comparison]
    same_data: bool
    recomputed_path: Path
    # What differs between the machine that wrote the record and this one (results may move with it).
    environment: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.same_data and all(c.ok for c in self.comparisons)


class ReproductionError(BenchmarkError):
    """A record that cannot be recomputed (unreadable, or a component that is not installed)."""


COMPARED = ("attack_auc", "attack_balanced_accuracy", "fid", "clip_score", "epsilon")


def figures(record: ResultRecord) -> dict[str, float | None]:
    """The compared figures of a record, each read from its home (epsilon from the target's defense report)."""
    utility = record.utility.target if record.utility is not None else None
    return {
        "attack_auc": record.privacy.auc,
        "attack_balanced_accuracy": record.privacy.balanced_accuracy,
        "fid": utility.fid if utility is not None else None,
        "clip_score": utility.clip_score if utility is not None else None,
        "epsilon": record.training.epsilon,
    }


def reproduce(
    path: Path,
    *,
    cache_dir: Path | None = None,
    results_dir: Path | None = None,
    tolerance: Tolerance = Tolerance(),
    console: Console | None = None,
    show_progress: bool = True,
    record: ResultRecord | None = None,
) -> Reproduction:
    """Re-run the configuration stored in the record at `path` and compare its figures.

    Args:
        cache_dir: cache for base and fine-tuned models (None: the default cache).
            Cached fine-tunes keyed by the same inputs are reused; for an
            independent check use an empty cache.
        results_dir: where the recomputed record goes (None: a temporary folder, removed).
        record: the record at `path` when the caller has read it already (None: read here).

    Raises:
        RecordError: the file is not a valid record (`read_record`: not a regular file, over
            `MAX_RECORD_BYTES`, invalid, or figures that contradict its own per-query scores);
            nothing is run.
        ReproductionError: its configuration cannot be run here.
    """

    stored = record if record is not None else read_record(path)
    try:
        config = RunConfig.from_dict(stored.config)
    except BenchmarkError as exc:
        raise ReproductionError(f"{path}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="reproduce-") as tmp:
        target_dir = Path(results_dir) if results_dir is not None else Path(tmp)
        # A record stores input paths under the home folder as `~/...` (see `portable_path`).
        home_paths = {
            name: value.expanduser()
            for name, value in vars(config).items()
            if isinstance(value, Path) and value.parts[:1] == ("~",)
        }
        config = config.replace(results_dir=target_dir, cache_dir=cache_dir, **home_paths)
        try:
            config.validate()
        except BenchmarkError as exc:
            origin = stored.components["defense"].origin
            raise ReproductionError(
                f"{path}: cannot run its configuration here ({exc}); install the components it names "
                f"(defense from {origin})"
            ) from None
        outcome = run(config, console=console, show_progress=show_progress)
        fresh = outcome.record
    same_data = all(stored.splits.get(k) == fresh.splits.get(k) for k in ("members", "nonmembers"))
    environment = environment_differences(stored, fresh)
    before, after = figures(stored), figures(fresh)
    comparisons = [
        Comparison(
            name,
            before[name],
            after[name],
            tolerance.allowed(name, before[name]) if before[name] is not None else 0.0,
        )
        for name in COMPARED
    ]
    return Reproduction(
        path=Path(path),
        comparisons=comparisons,
        same_data=same_data,
        recomputed_path=outcome.path,
        environment=environment,
    )


# What moves a figure between machines without changing the configuration (docs/reproducing.md).
ENVIRONMENT = ("threads", "interop_threads", "processor", "deterministic_algorithms")


def environment_differences(stored: ResultRecord, fresh: ResultRecord) -> list[str]:
    """`name: stored -> here` for each recorded setting of the machine that differs (unknown ones are named)."""
    out = []
    for name in ENVIRONMENT:
        before, after = getattr(stored.provenance, name), getattr(fresh.provenance, name)
        if before != after:
            out.append(f"{name}: {'not recorded' if before is None else before} -> {after}")
    for library, version in fresh.provenance.libraries.items():
        if stored.provenance.libraries.get(library) != version:
            out.append(f"{library}: {stored.provenance.libraries.get(library, 'not recorded')} -> {version}")
    return out
