"""Seeded dataset splits and the attacker's shadow split."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from rich.console import Console

from attacks.scenarios import Scenario
from benchmark.app import stages
from benchmark.app.config import profile
from benchmark.kernel.errors import ConfigError
from benchmark.kernel.progress import StageTimer
from benchmark.pipeline.data.scenes import DEFAULT_SIZE, EXTENDED_SIZE, ScenesDataset
from benchmark.pipeline.data.splits import Splits, SplitSizes, make_splits, shadow_split

SIZES = SplitSizes(public=40, members=20, nonmembers=20, auxiliary=30, utility=10)
POOL = 150


def _parts(splits: Splits) -> dict[str, tuple[int, ...]]:
    return splits.as_dict()


def test_splits_are_pairwise_disjoint_and_sized() -> None:
    splits = make_splits(POOL, SIZES, public_seed=0, seed=0)
    parts = _parts(splits)
    for name, wanted in (
        ("public", SIZES.public),
        ("members", SIZES.members),
        ("nonmembers", SIZES.nonmembers),
        ("auxiliary", SIZES.auxiliary),
        ("utility", SIZES.utility),
    ):
        assert len(parts[name]) == wanted, name
        assert len(set(parts[name])) == wanted, f"{name} has repeats"
    for (a, xs), (b, ys) in itertools.combinations(parts.items(), 2):
        assert not set(xs) & set(ys), f"{a} and {b} overlap"
    every = set().union(*map(set, parts.values()))
    assert every <= set(range(POOL))
    assert len(every) == SIZES.total


def test_pool_exactly_used_up() -> None:
    sizes = SplitSizes(public=3, members=2, nonmembers=2, auxiliary=2, utility=1)
    splits = make_splits(10, sizes, public_seed=1, seed=2)
    assert sorted(itertools.chain.from_iterable(_parts(splits).values())) == list(range(10))


def test_deterministic_for_fixed_seeds() -> None:
    a = make_splits(POOL, SIZES, public_seed=3, seed=5)
    b = make_splits(POOL, SIZES, public_seed=3, seed=5)
    assert a == b


def test_changing_seed_keeps_public_but_changes_members() -> None:
    a = make_splits(POOL, SIZES, public_seed=0, seed=0)
    b = make_splits(POOL, SIZES, public_seed=0, seed=1)
    assert a.public == b.public
    assert set(a.members) != set(b.members)
    assert set(a.nonmembers) != set(b.nonmembers)


def test_changing_public_seed_changes_public() -> None:
    a = make_splits(POOL, SIZES, public_seed=0, seed=0)
    b = make_splits(POOL, SIZES, public_seed=1, seed=0)
    assert set(a.public) != set(b.public)


def test_sizes_exceeding_pool_raise_config_error() -> None:
    with pytest.raises(ConfigError, match=rf"need {SIZES.total} images .* the dataset has {SIZES.total - 1}"):
        make_splits(SIZES.total - 1, SIZES, public_seed=0, seed=0)


@pytest.mark.parametrize(
    "sizes",
    [
        SplitSizes(public=0, members=0, nonmembers=5, auxiliary=0, utility=0),
        SplitSizes(public=0, members=5, nonmembers=0, auxiliary=0, utility=0),
        SplitSizes(public=-1, members=5, nonmembers=5, auxiliary=0, utility=0),
    ],
)
def test_degenerate_sizes_raise_config_error(sizes: SplitSizes) -> None:
    with pytest.raises(ConfigError):
        make_splits(100, sizes, public_seed=0, seed=0)


@pytest.fixture
def splits() -> Splits:
    return make_splits(POOL, SIZES, public_seed=0, seed=0)


def test_scenario_overlaps() -> None:
    assert Scenario.III.auxiliary_member_overlap == 0
    assert Scenario.IV.auxiliary_member_overlap == 0
    assert Scenario.I.auxiliary_member_overlap == 0.5
    assert Scenario.II.auxiliary_member_overlap == 0.5


def test_shadow_without_overlap_uses_only_auxiliary(splits: Splits) -> None:
    shadow = shadow_split(splits, members=10, nonmembers=10, target_member_overlap=0.0, seed=0)
    assert shadow.overlap_with_target_members == 0
    assert len(shadow.members) == 10 and len(shadow.nonmembers) == 10
    assert not set(shadow.members) & set(splits.members)
    assert set(shadow.members) | set(shadow.nonmembers) <= set(splits.auxiliary)
    assert not set(shadow.members) & set(shadow.nonmembers)
    assert not (set(shadow.members) | set(shadow.nonmembers)) & set(splits.nonmembers)


def test_shadow_with_half_overlap(splits: Splits) -> None:
    shadow = shadow_split(splits, members=10, nonmembers=10, target_member_overlap=0.5, seed=0)
    assert shadow.overlap_with_target_members == 5
    assert len(set(shadow.members) & set(splits.members)) == 5
    assert len(set(shadow.members) & set(splits.auxiliary)) == 5
    assert len(set(shadow.members)) == 10
    # Target non-members are the attack's evaluation set: never in the shadow.
    assert not (set(shadow.members) | set(shadow.nonmembers)) & set(splits.nonmembers)
    assert set(shadow.nonmembers) <= set(splits.auxiliary)
    assert not set(shadow.members) & set(shadow.nonmembers)


def test_shadow_split_deterministic_and_seeded(splits: Splits) -> None:
    a = shadow_split(splits, members=10, nonmembers=10, target_member_overlap=0.5, seed=3)
    b = shadow_split(splits, members=10, nonmembers=10, target_member_overlap=0.5, seed=3)
    c = shadow_split(splits, members=10, nonmembers=10, target_member_overlap=0.5, seed=4)
    assert a == b
    assert (a.members, a.nonmembers) != (c.members, c.nonmembers)


def test_shadow_split_raises_when_auxiliary_too_small(splits: Splits) -> None:
    # 30 auxiliary images; 20 + 20 needed without overlap.
    with pytest.raises(ConfigError, match="auxiliary pool has 30"):
        shadow_split(splits, members=20, nonmembers=20, target_member_overlap=0.0, seed=0)
    # With half the members from the target, 10 + 20 fits exactly.
    shadow = shadow_split(splits, members=20, nonmembers=20, target_member_overlap=0.5, seed=0)
    assert len(shadow.members) == 20 and len(shadow.nonmembers) == 20


def test_shadow_split_raises_when_target_members_too_few(splits: Splits) -> None:
    with pytest.raises(ConfigError, match="target members"):
        shadow_split(splits, members=50, nonmembers=0, target_member_overlap=1.0, seed=0)


@pytest.mark.parametrize("scenario", list(Scenario))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scenario_shadow_splits(scenario: Scenario, seed: int) -> None:
    """I/II: exactly half the shadow's members are target members; III/IV: none. Never a target non-member."""
    sizes = SplitSizes(public=10, members=20, nonmembers=20, auxiliary=40, utility=0)
    splits = make_splits(120, sizes, public_seed=0, seed=seed)
    shadow = shadow_split(
        splits, members=20, nonmembers=20, target_member_overlap=scenario.auxiliary_member_overlap, seed=seed
    )
    shadow_members, shadow_nonmembers = set(shadow.members), set(shadow.nonmembers)
    overlap = len(shadow_members & set(splits.members))
    if scenario in (Scenario.I, Scenario.II):
        assert overlap == shadow.overlap_with_target_members == 10 == len(shadow_members) // 2
    else:
        assert overlap == shadow.overlap_with_target_members == 0
    assert not (shadow_members | shadow_nonmembers) & set(splits.nonmembers)
    assert not shadow_nonmembers & set(splits.members), "the shadow's non-members are never target members"
    assert not (shadow_members | shadow_nonmembers) & set(splits.public)
    assert len(shadow_members) == 20 and len(shadow_nonmembers) == 20
    assert scenario.caption_source.value == ("captioner" if scenario in (Scenario.II, Scenario.IV) else "ground_truth")


def test_owner_pool_confines_the_owner_sets_but_not_the_public_split() -> None:
    owner = range(0, POOL, 2)
    splits = make_splits(
        POOL,
        SplitSizes(public=40, members=10, nonmembers=10, auxiliary=10, utility=5),
        public_seed=0,
        seed=0,
        owner_pool=owner,
    )
    assert set(splits.members + splits.nonmembers + splits.auxiliary + splits.utility) <= set(owner)
    assert any(i % 2 for i in splits.public)
    # Without an owner pool the split is what it always was.
    assert make_splits(POOL, SIZES, public_seed=0, seed=0) == make_splits(
        POOL, SIZES, public_seed=0, seed=0, owner_pool=None
    )


def test_owner_pool_too_small_says_what_to_lower() -> None:
    with pytest.raises(ConfigError, match="owner's domain, which has"):
        make_splits(POOL, SIZES, public_seed=0, seed=0, owner_pool=range(0, POOL, 5))


def _digest(indices: tuple[int, ...]) -> str:
    return hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()[:16]


def test_default_scenes_split_is_pinned() -> None:
    """The default pool's split for seed 0, as committed records and cached base models know it."""
    ds = ScenesDataset(resolution=8, size=DEFAULT_SIZE)
    sizes = SplitSizes(public=2000, members=32, nonmembers=128, auxiliary=96, utility=200)
    splits = make_splits(DEFAULT_SIZE, sizes, public_seed=0, seed=0, owner_pool=ds.owner_pool)
    assert splits.members[:5] == (3523, 3367, 555, 835, 3053)
    assert {name: _digest(part) for name, part in splits.as_dict().items()} == {
        "public": "dcc1271c931872fa",
        "members": "be50a1e3abaf4303",
        "nonmembers": "712aba3a4b7ed0ef",
        "auxiliary": "f9a1f3fd27b2da18",
        "utility": "86c479e346e021e2",
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_profile_splits_fit_and_are_disjoint(seed: int) -> None:
    """The full profile's 1,900 owner images fit in the extended pool beside its public split."""
    config = profile("full").replace(seed=seed).validate()
    assert config.dataset_size == EXTENDED_SIZE
    with StageTimer(Console(quiet=True), show=False) as timer:
        data = stages.load_data(config, tuple(Scenario), public_size=config.public_split_size, timer=timer)
    assert len(data.dataset) == EXTENDED_SIZE
    parts = data.splits.as_dict()
    assert {name: len(part) for name, part in parts.items()} == {
        "public": 2000,
        "members": 100,
        "nonmembers": 1000,
        "auxiliary": 600,
        "utility": 200,
    }
    for (a, xs), (b, ys) in itertools.combinations(parts.items(), 2):
        assert not set(xs) & set(ys), f"{a} and {b} overlap"
    owner = set(data.dataset.owner_pool)
    assert set().union(*(set(parts[n]) for n in ("members", "nonmembers", "auxiliary", "utility"))) <= owner
    # The public split depends on the public seed alone: 2,255 owner images are left for 1,900.
    assert len(owner - set(parts["public"])) == 2255
    for scenario, shadow in data.shadows.items():
        assert len(shadow.members) == 100 and len(shadow.nonmembers) == 500, scenario
        assert not (set(shadow.members) | set(shadow.nonmembers)) & set(parts["nonmembers"])


@pytest.mark.parametrize("name", ["default", "full"])
def test_target_and_shadow_see_every_member_in_every_step(name: str) -> None:
    # The recipe that memorises: with batches of 32 out of the full profile's 100 members the
    # undefended target never did (AUC 0.486); with the whole set per step it does (docs/findings.md).
    config = profile(name)
    assert config.finetune.batch_size == config.members == config.shadow_members
