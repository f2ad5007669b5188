"""Attack models, similarities and encoders on synthetic inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.attack import AttackConfig, Query, fit_attack_model, score_queries
from attacks.attack_models import ATTACK_MODELS, ThresholdAttack
from attacks.distances import DISTANCES
from attacks.encoders import ENCODERS, PixelEncoder
from benchmark.target import BlackBoxTarget


def _separable(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    members = rng.uniform(0.7, 0.9, size=(20, 3))
    nonmembers = rng.uniform(0.1, 0.3, size=(30, 3))
    return np.r_[members, nonmembers], np.r_[np.ones(20), np.zeros(30)].astype(int)


def test_threshold_attack_is_registered() -> None:
    assert ATTACK_MODELS.get("threshold") is ThresholdAttack


def test_threshold_between_classes_and_perfect_predictions() -> None:
    scores, labels = _separable()
    attack = ThresholdAttack().fit(scores, labels)
    reduced = scores.mean(axis=1)
    assert attack.threshold is not None
    assert reduced[labels == 0].max() < attack.threshold <= reduced[labels == 1].min()
    np.testing.assert_array_equal(attack.predict(scores), labels.astype(bool))
    np.testing.assert_allclose(attack.membership_score(scores), reduced)
    assert attack.describe()["threshold"] == attack.threshold


def test_threshold_generalises_to_fresh_separable_scores() -> None:
    attack = ThresholdAttack().fit(*_separable(0))
    scores, labels = _separable(1)
    np.testing.assert_array_equal(attack.predict(scores), labels.astype(bool))


def test_threshold_maximises_youden_j() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(60), np.zeros(60)].astype(int)
    scores = (rng.normal(size=120) + labels)[:, None]
    attack = ThresholdAttack().fit(scores, labels)
    flagged = attack.predict(scores)
    j = flagged[labels == 1].mean() - flagged[labels == 0].mean()
    # Brute force over every cut point.
    best = max((scores[:, 0] >= t)[labels == 1].mean() - (scores[:, 0] >= t)[labels == 0].mean() for t in scores[:, 0])
    assert j == pytest.approx(best)


def test_threshold_never_worse_than_chance_on_its_fit_data() -> None:
    # Inverted scores: every member below every non-member. The best Youden's J
    # is 0 ("flag nobody"); a finite stand-in for +inf must keep that meaning.
    labels = np.r_[np.ones(10), np.zeros(10)].astype(int)
    scores = np.r_[np.arange(10.0), np.arange(10.0) + 100][:, None]
    attack = ThresholdAttack().fit(scores, labels)
    flagged = attack.predict(scores)
    assert flagged[labels == 1].mean() - flagged[labels == 0].mean() >= 0


def test_threshold_attack_rejects_bad_input() -> None:
    attack = ThresholdAttack()
    with pytest.raises(RuntimeError, match="fit"):
        attack.predict(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="both members and non-members"):
        attack.fit(np.zeros((4, 2)), np.ones(4))
    with pytest.raises(ValueError, match="finite"):
        attack.fit(np.array([[np.nan], [1.0]]), np.array([1, 0]))


@pytest.mark.parametrize("name", DISTANCES.names())
def test_similarity_higher_for_identical_pair(name: str) -> None:
    torch.manual_seed(0)
    n, m, patches, dim = 6, 3, 4, 32
    query = torch.randn(n, patches, dim)
    generated = torch.randn(n, m, patches, dim)
    generated[:, 0] = query  # the first generation reproduces the query exactly
    similarity = DISTANCES.get(name)(query.unsqueeze(1), generated)
    assert similarity.shape == (n, m)
    identical, different = similarity[:, 0], similarity[:, 1:]
    assert (identical[:, None] > different).all(), f"{name}: higher must mean more likely member"


@pytest.mark.parametrize("name", DISTANCES.names())
def test_similarity_closer_pair_scores_higher(name: str) -> None:
    torch.manual_seed(1)
    query = torch.randn(4, 2, 64)
    near = query + 0.05 * torch.randn_like(query)
    far = torch.randn_like(query)
    generated = torch.stack([near, far], dim=1)
    similarity = DISTANCES.get(name)(query.unsqueeze(1), generated)
    assert (similarity[:, 0] > similarity[:, 1]).all()


def test_all_expected_distances_registered() -> None:
    assert set(DISTANCES.names()) >= {"cosine", "l1", "l2", "hamming"}


@pytest.mark.parametrize(("resolution", "pool", "dim"), [(8, 2, 3 * 4 * 4), (16, 2, 3 * 8 * 8), (8, 1, 3 * 8 * 8)])
def test_pixel_encoder_shape_and_centring(resolution: int, pool: int, dim: int) -> None:
    images = np.random.default_rng(0).uniform(size=(5, resolution, resolution, 3)).astype(np.float32)
    emb = PixelEncoder(pool=pool).embed(images)
    assert emb.shape == (5, 1, dim)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.mean(dim=-1), torch.zeros(5, 1), atol=1e-6, rtol=0)


def test_pixel_encoder_ignores_overall_brightness() -> None:
    image = np.random.default_rng(0).uniform(0.2, 0.6, size=(1, 8, 8, 3)).astype(np.float32)
    enc = ENCODERS.get("pixels")()
    torch.testing.assert_close(enc.embed(image), enc.embed(image + 0.3), atol=1e-5, rtol=0)


def test_score_queries_counts_and_orients_scores() -> None:
    """Query images reproduced by the 'model' score above unrelated ones."""
    rng = np.random.default_rng(0)
    remembered = {f"caption {i}": rng.uniform(size=(8, 8, 3)).astype(np.float32) for i in range(4)}

    def generate(captions: list[str], seed: int) -> np.ndarray:
        noise = np.random.default_rng(seed).uniform(size=(len(captions), 8, 8, 3)).astype(np.float32)
        return np.stack([remembered.get(c, noise[k]) for k, c in enumerate(captions)])

    queries = [Query(f"q{i}", remembered[f"caption {i}"], f"caption {i}") for i in range(4)]
    queries += [Query(f"q{i}", rng.uniform(size=(8, 8, 3)).astype(np.float32), f"other {i}") for i in range(4, 8)]
    target = BlackBoxTarget(generate, name="fake")
    config = AttackConfig(generations_per_query=2, query_batch=3)
    scored = score_queries(target, queries, config)
    assert scored.scores.shape == (8, 2)
    assert scored.query_ids == [q.query_id for q in queries]
    assert scored.queries_spent == 8 and scored.images_generated == 16
    labels = np.r_[np.ones(4), np.zeros(4)].astype(int)
    attack = fit_attack_model(config, scored.scores, labels)
    assert scored.scores[:4].min() > scored.scores[4:].max()
    np.testing.assert_array_equal(attack.predict(scored.scores), labels.astype(bool))


def test_attack_config_validates_names() -> None:
    with pytest.raises(KeyError, match="did you mean 'cosine'"):
        AttackConfig(distance="cosin")
    with pytest.raises(ValueError, match="generations"):
        AttackConfig(generations_per_query=0)
