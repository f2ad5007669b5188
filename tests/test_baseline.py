"""The model-free baseline: the attack models fed only query-image features, no model queries.

On the embedded data, whose members and non-members are a seeded split of one
pool, it must sit at chance; on a shifted split it must not (so it is not
vacuously 0.5).
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from attacks.attack import BASELINE_FEATURES, ModelFreeBaseline, image_features
from attacks.attack_models import ATTACK_MODELS
from attacks.encoders import build_encoder
from benchmark.pipeline.data.scenes import ScenesDataset
from benchmark.pipeline.data.splits import SplitSizes, make_splits, shadow_split


@pytest.fixture(scope="module")
def embedded() -> dict[str, np.ndarray]:
    """300/300 target members/non-members and a 300/300 shadow of the owner's domain, 8 px (no model needed)."""
    ds = ScenesDataset(resolution=8, size=2400)
    splits = make_splits(
        len(ds),
        SplitSizes(public=0, members=300, nonmembers=300, auxiliary=600, utility=0),
        public_seed=0,
        seed=0,
        owner_pool=ds.owner_pool,
    )
    shadow = shadow_split(splits, members=300, nonmembers=300, target_member_overlap=0.0, seed=0)
    encoder = build_encoder("pixels")

    def features(indices: tuple[int, ...]) -> np.ndarray:
        return image_features(np.stack([ds.image(i) for i in indices]), encoder)

    return {
        "shadow": np.r_[features(shadow.members), features(shadow.nonmembers)],
        "shadow_labels": np.r_[np.ones(300), np.zeros(300)].astype(int),
        "target": np.r_[features(splits.members), features(splits.nonmembers)],
        "target_labels": np.r_[np.ones(300), np.zeros(300)].astype(int),
    }


def test_features_shape(embedded: dict[str, np.ndarray]) -> None:
    assert embedded["target"].shape == (600, len(BASELINE_FEATURES))
    assert np.isfinite(embedded["target"]).all()


@pytest.mark.parametrize("name", ATTACK_MODELS.names())
def test_baseline_sits_at_chance_on_the_embedded_data(name: str, embedded: dict[str, np.ndarray]) -> None:
    baseline = ModelFreeBaseline(name).fit(embedded["shadow"], embedded["shadow_labels"])
    auc = roc_auc_score(embedded["target_labels"], baseline.membership_score(embedded["target"]))
    # 300 + 300 queries: the AUC's standard deviation under the null is about 0.024.
    assert abs(auc - 0.5) < 0.1, f"{name}: model-free AUC {auc:.3f}; the split itself leaks"
    assert baseline.describe()["attack_model"] == name


@pytest.mark.parametrize("name", ATTACK_MODELS.names())
def test_baseline_detects_a_shifted_split(name: str, embedded: dict[str, np.ndarray]) -> None:
    """Members brighter than non-members (a distribution shift): the baseline must see it."""
    column = BASELINE_FEATURES.index("pixel_mean")

    def shifted(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
        out = features.copy()
        out[:, column] += 0.15 * labels
        return out

    shadow = shifted(embedded["shadow"], embedded["shadow_labels"])
    target = shifted(embedded["target"], embedded["target_labels"])
    baseline = ModelFreeBaseline(name).fit(shadow, embedded["shadow_labels"])
    auc = roc_auc_score(embedded["target_labels"], baseline.membership_score(target))
    assert auc > 0.6, f"{name}: a shifted split went unnoticed (AUC {auc:.3f})"
