"""Contract test base classes for attack models and image encoders, built-in or third-party.

Authors of a new component subclass them in their own test suite (pytest collects
the inherited tests)::

    from attacks.testing import AttackModelContract, EncoderContract

    class TestMyAttackModel(AttackModelContract):
        name = "my_attack_model"

    class TestMyEncoder(EncoderContract):
        name = "my_encoder"
        def request(self, tmp_path): return EncoderRequest(path=...)

The checks are what the benchmark relies on: fitted on shadow scores only, a
finite score per query oriented so that higher means member, boolean decisions,
determinism, JSON-serialisable descriptions; (N, patches, dim) float32
embeddings that do not depend on batching. Needs pytest (a test dependency).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from attacks.attack_models import ATTACK_MODELS, AttackModel
from attacks.distances import DISTANCES
from attacks.encoders import ENCODERS, EncoderRequest, ImageEncoder


def gaussian_scores(n: int, seed: int, *, shift: float = 3.0, m: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """n members with scores shifted up by `shift`, n non-members; (2n, m) scores and labels."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n), np.zeros(n)].astype(int)
    return rng.normal(size=(2 * n, m)) + shift * labels[:, None], labels


class AttackModelContract:
    """Inherit and set `name` (a registered attack model), or override `make`."""

    name: ClassVar[str] = ""

    def make(self) -> AttackModel:
        if not self.name:
            raise AssertionError("an AttackModelContract subclass must set `name` or override make()")
        return ATTACK_MODELS.get(self.name)()

    @pytest.mark.parametrize("m", [1, 3])
    def test_fits_on_the_shadow_and_orients_scores(self, m: int) -> None:
        from sklearn.metrics import roc_auc_score

        attack = self.make()
        narrowest = getattr(attack, "min_features", 1)  # declared on `AttackModel`; 1 for any other object
        if m < narrowest:
            pytest.skip(f"{attack.name} reads at least {narrowest} scores per query")
        scores, labels = gaussian_scores(60, 7, m=m)
        original = scores.copy()
        assert attack.fit(scores, labels) is attack
        np.testing.assert_array_equal(scores, original)  # fit never mutates its input
        fresh, truth = gaussian_scores(60, 8, m=m)
        membership = attack.membership_score(fresh)
        predictions = attack.predict(fresh)
        assert membership.shape == (120,) and np.isfinite(membership).all()
        assert predictions.shape == (120,) and predictions.dtype == bool
        assert roc_auc_score(truth, membership) > 0.9, "a higher membership score must mean member"
        # Bayes accuracy is Phi(1.5) = 0.93.
        assert (predictions == truth.astype(bool)).mean() > 0.85

    def test_deterministic_and_described(self) -> None:
        scores, labels = gaussian_scores(60, 9)
        fresh, _ = gaussian_scores(20, 10)
        first, second = self.make().fit(scores, labels), self.make().fit(scores, labels)
        np.testing.assert_array_equal(first.membership_score(fresh), second.membership_score(fresh))
        described = first.describe()
        assert described["name"] == first.name
        json.dumps(described, allow_nan=False)

    def test_rejects_bad_input(self) -> None:
        scores, labels = gaussian_scores(10, 11)
        with pytest.raises(RuntimeError, match="fit"):
            self.make().predict(scores)
        with pytest.raises(ValueError, match="both members and non-members"):
            self.make().fit(scores, np.ones(len(scores)))
        with pytest.raises(ValueError, match="finite"):
            self.make().fit(np.full_like(scores, np.nan), labels)


class EncoderContract:
    """Inherit and set `name` (a registered encoder); override `request` if it needs a folder or data."""

    name: ClassVar[str] = ""
    image_size: ClassVar[int] = 8

    def request(self, tmp_path: Path) -> EncoderRequest:
        return EncoderRequest(cache_dir=tmp_path)

    @pytest.fixture
    def encoder(self, tmp_path: Path) -> ImageEncoder:
        if not self.name:
            raise AssertionError("an EncoderContract subclass must set `name`")
        return ENCODERS.get(self.name)(self.request(tmp_path))

    def images(self, n: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).uniform(size=(n, self.image_size, self.image_size, 3)).astype(np.float32)

    def test_embeddings_are_patch_grids(self, encoder: ImageEncoder) -> None:
        emb = encoder.embed(self.images(5))
        assert isinstance(emb, torch.Tensor) and emb.dtype == torch.float32
        assert emb.ndim == 3 and emb.shape[0] == 5 and emb.shape[1] >= 1 and emb.shape[2] >= 1
        assert torch.isfinite(emb).all()

    def test_deterministic_and_independent_of_batching(self, encoder: ImageEncoder) -> None:
        images = self.images(5)
        emb = encoder.embed(images)
        torch.testing.assert_close(encoder.embed(images), emb)
        torch.testing.assert_close(encoder.embed(images[2:3]), emb[2:3], atol=1e-5, rtol=1e-5)

    def test_an_image_is_most_similar_to_itself(self, encoder: ImageEncoder) -> None:
        emb = encoder.embed(self.images(5, seed=1))
        similarity = DISTANCES.get("cosine")(emb.unsqueeze(1), emb.unsqueeze(0))
        assert (similarity.diagonal() >= similarity.max(dim=1).values - 1e-5).all()

    def test_described(self, encoder: ImageEncoder) -> None:
        described = encoder.describe()
        assert described["name"] == self.name == encoder.name
        json.dumps(described, allow_nan=False)
