"""What the leaderboard is made of: one entry per record, rows of a table, and the Pareto front.

Shared by the table builder (`leaderboard.build`) and the plots (`leaderboard.plots`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Entry:
    """One valid record, reduced to what the leaderboard shows."""

    path: str
    dataset: str
    scenario: str
    defense: str
    attack_model: str
    seed: int
    auc: float
    auc_ci: tuple[float, float] | None
    # target FPR -> (tpr, ci, n_nonmembers, supported)
    tpr: dict[float, tuple[float, tuple[float, float] | None, int, bool]]
    epsilon: float | None
    utility_key: tuple[str, str]
    fid: float | None
    kid: float | None
    clip: float | None
    labels: list[int]
    scores: list[float]
    # The control: the same fitted attack on the base model, and the base model's utility.
    control_auc: float | None = None
    control_auc_ci: tuple[float, float] | None = None
    base_fid: float | None = None
    base_kid: float | None = None
    base_clip: float | None = None
    # The attack family and the access it had; a record from before families is Pang & Wang's black box.
    family: str = "pang-wang"
    access: str = "black-box"
    # Which query each score belongs to: two records are compared paired only on the same queries.
    query_ids: list[str] = field(default_factory=list)

    @property
    def attack(self) -> str:
        """The attack as the board names it: family/attack-model."""
        return f"{self.family}/{self.attack_model}"


@dataclass(frozen=True)
class Cell:
    """One defense's records of one scenario and attack (family/attack-model): one record per seed, by seed."""

    scenario: str
    attack: str
    entries: tuple[Entry, ...]

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(e.seed for e in self.entries)

    @property
    def mean_auc(self) -> float:
        """The records' own AUC, mean over seeds: what the worst case is chosen by."""
        return math.fsum(e.auc for e in self.entries) / len(self.entries)

    @property
    def has_scores(self) -> bool:
        """Every record holds per-query scores of members and non-members (a control does not)."""
        return bool(self.entries) and all(
            len(e.scores) == len(e.labels) and len(set(e.labels)) == 2 for e in self.entries
        )

    @property
    def name(self) -> str:
        return f"{self.scenario} / {self.attack}"


def cells(entries: list[Entry]) -> list[Cell]:
    """`entries` (one defense's) as cells sorted by (scenario, attack); per seed the first record by path.

    A second record of the same cell and seed (a re-run) is not a second seed: counting it
    would narrow the interval without new evidence.
    """
    by_cell: dict[tuple[str, str], dict[int, Entry]] = {}
    for e in sorted(entries, key=lambda e: (e.scenario, e.attack, e.seed, e.path)):
        by_cell.setdefault((e.scenario, e.attack), {}).setdefault(e.seed, e)
    return [Cell(scenario, attack, tuple(seeds.values())) for (scenario, attack), seeds in sorted(by_cell.items())]


def worst_cell(found: list[Cell]) -> Cell:
    """The cell with the highest mean AUC over seeds (ties: the first by scenario, then attack)."""
    return max(sorted(found, key=lambda c: (c.scenario, c.attack)), key=lambda c: c.mean_auc)


BASE_MODEL_ROW = "base model, not fine-tuned (reference)"
# The accesses of a black-box attacker (a provider's API); anything else (gray-box) reads the model's internals.
BLACK_BOX_ACCESS = ("black-box", "black-box-img2img")


@dataclass
class Row:
    defense: str
    seeds: list[int]
    # The attacks behind the row, as family/attack-model.
    attack_models: list[str]
    cells: dict[str, str] = field(default_factory=dict)
    # The worst-case AUC the Pareto front and the plots use: over all attacks measured.
    auc: float = math.nan
    # Worst-case AUC over the black-box attacks, and over all attacks where a gray-box one was run.
    auc_black_box: float | None = None
    auc_all: float | None = None
    # The all-attacks AUC interval lies entirely above the black-box one: the defense stops only the black box.
    black_box_only: bool = False
    fid: float | None = None
    clip: float | None = None
    pareto: bool = False
    reference: bool = False
    # The cell behind `auc` and the target's utility per seed (fid, clip): what the significance tests compare.
    cell: Cell | None = None
    utility_by_seed: dict[int, tuple[float | None, float | None]] = field(default_factory=dict)
    # 95% intervals for the plots: AUC over seeds and queries, FID and CLIP score over seeds (None: not known).
    auc_interval: tuple[float, float] | None = None
    fid_interval: tuple[float, float] | None = None
    clip_interval: tuple[float, float] | None = None


@dataclass
class Table:
    dataset: str
    scenario: str
    utility_key: tuple[str, str]
    rows: list[Row]


def pareto(points: list[tuple[float, ...]]) -> list[bool]:
    """Non-dominated points, every coordinate lower-is-better."""
    front = []
    for i, p in enumerate(points):
        dominated = any(
            all(a <= b for a, b in zip(q, p, strict=True)) and any(a < b for a, b in zip(q, p, strict=True))
            for j, q in enumerate(points)
            if j != i
        )
        front.append(not dominated)
    return front
