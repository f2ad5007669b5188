"""Seeded splits of one pool: public | members | non-members | auxiliary | utility-eval.

Members and non-members are drawn from the same shuffled pool, so they share one
distribution; a result on shifted sets would measure the shift, not membership.
The public part depends only on `public_seed`, so changing the run seed reuses the
cached base model.

A dataset may confine the owner's data to one domain (`owner_pool`): the public
split is then still drawn from the whole pool, and members, non-members,
auxiliary and utility-eval images only from that domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from benchmark.kernel.errors import ConfigError


@dataclass(frozen=True)
class SplitSizes:
    public: int
    members: int
    nonmembers: int
    auxiliary: int
    utility: int

    @property
    def total(self) -> int:
        return self.public + self.members + self.nonmembers + self.auxiliary + self.utility


@dataclass(frozen=True)
class Splits:
    """Indices into the dataset; pairwise disjoint."""

    public: tuple[int, ...]
    members: tuple[int, ...]
    nonmembers: tuple[int, ...]
    auxiliary: tuple[int, ...]
    utility: tuple[int, ...]

    def as_dict(self) -> dict[str, tuple[int, ...]]:
        return asdict(self)


def make_splits(
    pool_size: int, sizes: SplitSizes, *, public_seed: int, seed: int, owner_pool: Sequence[int] | None = None
) -> Splits:
    """Split `range(pool_size)` deterministically.

    Args:
        owner_pool: indices the owner's sets may come from (default: the whole pool).

    Raises:
        ConfigError: the requested sizes do not fit in the pool.
    """
    for name, value in asdict(sizes).items():
        if value < 0:
            raise ConfigError(f"split size {name} must be >= 0, got {value}")
    if sizes.members < 1 or sizes.nonmembers < 1:
        raise ConfigError("need at least one member and one non-member")
    if sizes.total > pool_size:
        raise ConfigError(
            f"the splits need {sizes.total} images (public {sizes.public}, members {sizes.members}, "
            f"non-members {sizes.nonmembers}, auxiliary {sizes.auxiliary}, utility {sizes.utility}) "
            f"but the dataset has {pool_size}; lower --members/--nonmembers or use a larger dataset"
        )
    public_order = np.random.default_rng(public_seed).permutation(pool_size)
    public = np.sort(public_order[: sizes.public])
    rest = public_order[sizes.public :]
    if owner_pool is not None:
        rest = rest[np.isin(rest, np.asarray(owner_pool))]
        owner_sets = sizes.total - sizes.public
        if owner_sets > len(rest):
            raise ConfigError(
                f"the owner's sets need {owner_sets} images (members {sizes.members}, non-members "
                f"{sizes.nonmembers}, auxiliary {sizes.auxiliary}, utility {sizes.utility}) from the owner's "
                f"domain, which has {len(rest)} left after the public split of {sizes.public}; lower those "
                "sizes or --public, or use a larger --dataset-size"
            )
    rest = rest[np.random.default_rng([public_seed, seed]).permutation(len(rest))]
    bounds = np.cumsum([sizes.members, sizes.nonmembers, sizes.auxiliary, sizes.utility])
    members, nonmembers, auxiliary, utility, _ = np.split(rest, bounds)
    return Splits(
        public=tuple(int(i) for i in public),
        members=tuple(int(i) for i in members),
        nonmembers=tuple(int(i) for i in nonmembers),
        auxiliary=tuple(int(i) for i in auxiliary),
        utility=tuple(int(i) for i in utility),
    )


@dataclass(frozen=True)
class ShadowSplit:
    """The attacker's auxiliary data: what it fine-tunes its shadow on, and what it holds out."""

    members: tuple[int, ...]
    nonmembers: tuple[int, ...]
    overlap_with_target_members: int


def shadow_split(
    splits: Splits, *, members: int, nonmembers: int, target_member_overlap: float, seed: int
) -> ShadowSplit:
    """Draw the shadow's members and non-members.

    `target_member_overlap` is the fraction of shadow members that are real target
    members (scenarios I/II: 0.5; III/IV: 0). Target non-members are never used:
    the attack is evaluated on them.

    Raises:
        ConfigError: the auxiliary pool is too small for the requested sizes.
    """
    from_target = int(round(members * target_member_overlap))
    if from_target > len(splits.members):
        raise ConfigError(
            f"scenario needs {from_target} target members in the shadow but there are {len(splits.members)}"
        )
    from_aux = members - from_target
    need = from_aux + nonmembers
    if need > len(splits.auxiliary):
        raise ConfigError(
            f"the shadow needs {need} auxiliary images ({from_aux} members + {nonmembers} non-members) "
            f"but the auxiliary pool has {len(splits.auxiliary)}; lower --shadow-members/--shadow-nonmembers "
            "or use a larger dataset"
        )
    rng = np.random.default_rng([seed, 7])
    aux = np.asarray(splits.auxiliary)[rng.permutation(len(splits.auxiliary))]
    target_part = np.asarray(splits.members)[rng.permutation(len(splits.members))[:from_target]]
    shadow_members = np.concatenate([target_part, aux[:from_aux]]).astype(int)
    return ShadowSplit(
        members=tuple(int(i) for i in shadow_members),
        nonmembers=tuple(int(i) for i in aux[from_aux:need]),
        overlap_with_target_members=from_target,
    )
