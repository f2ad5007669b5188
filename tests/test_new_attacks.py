"""CLiD, PIA and REDIFFUSE on fake targets: separation, no signal, validation, costs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from attacks.attack import AttackConfig, Query
from attacks.clid import CLiDParams, CLiDThreshold, clip_caption, score_clid
from attacks.families import AttackFamilyError, build_family
from attacks.pia import PIAParams, normalize_noise, score_pia
from attacks.rediffuse import ReDiffuseParams, score_rediffuse, ssim_gray, strength_for_timestep
from attacks.scenarios import QueryAccess
from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.target import BlackBoxTarget, GrayBoxTarget, SamplingConfig

LATENT = (2, 4, 4)
WORDS = "a small red bird sits on a green branch near the old wooden house".split()


def make_queries(n: int, seed: int) -> tuple[list[Query], np.ndarray]:
    """n members then n non-members: random 8x8 images, captions of 6 to 12 words."""
    rng = np.random.default_rng(seed)
    queries = []
    for i in range(2 * n):
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 13))))
        queries.append(Query(f"q{seed}-{i}", rng.random((8, 8, 3)).astype(np.float32), caption))
    return queries, np.r_[np.ones(n), np.zeros(n)].astype(int)


def _key(image: np.ndarray) -> bytes:
    return np.asarray(image, dtype=np.float32).tobytes()


class FakeModel:
    """Noise prediction whose error is small for a member image with its own full caption
    (conditional overfitting) and the same for everything else; `signal=False` removes it."""

    def __init__(self, queries: list[Query], labels: np.ndarray, *, signal: bool = True) -> None:
        self.members = {_key(q.image): q.caption for q, y in zip(queries, labels, strict=True) if y}
        self.signal = signal
        self.rows = 0

    def __call__(self, images, captions, steps, noise, seed):
        rng = np.random.default_rng(seed + 7919 * int(steps.sum()))
        n = len(images)
        if noise is None:
            noise = rng.standard_normal((n, *LATENT)).astype(np.float32)
        scale = np.ones(n)
        if self.signal:
            for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
                full = self.members.get(_key(image))
                if full is not None:
                    scale[i] = 0.3 if caption == full else 0.8
        error = rng.standard_normal(noise.shape) * scale.reshape(-1, 1, 1, 1)
        self.rows += n
        return noise, (noise + error).astype(np.float32)


def gray_box(model: FakeModel) -> GrayBoxTarget:
    return GrayBoxTarget(model, name="fake", num_train_timesteps=1000, latent_shape=LATENT)


def fake_img2img(queries: list[Query], labels: np.ndarray, *, signal: bool = True) -> BlackBoxTarget:
    """Variations scatter around the query image, tighter for members."""
    members = {_key(q.image) for q, y in zip(queries, labels, strict=True) if y}

    def img2img(images, captions, strength, seed):
        rng = np.random.default_rng(seed)
        scale = np.array([0.1 if signal and _key(image) in members else 0.35 for image in images])
        out = images + rng.standard_normal(images.shape) * scale.reshape(-1, 1, 1, 1)
        return np.clip(out, 0, 1).astype(np.float32)

    def generate(captions, seed):
        return np.zeros((len(captions), 8, 8, 3), dtype=np.float32)

    return BlackBoxTarget(generate, name="fake-i2i", img2img_fn=img2img)


def auc(labels: np.ndarray, column: np.ndarray) -> float:
    return float(roc_auc_score(labels, column))


# --- CLiD ---------------------------------------------------------------------------------


def test_clid_separates_members_and_counts_calls() -> None:
    queries, labels = make_queries(30, 0)
    model = FakeModel(queries, labels)
    scored = score_clid(gray_box(model), queries, query_batch=16)
    assert scored.scores.shape == (60, 5)
    assert CLiDParams().feature_names == ("D_clip30", "D_clip50", "D_clip70", "D_null", "L")
    for j in range(5):
        assert auc(labels, scored.scores[:, j]) > 0.9, CLiDParams().feature_names[j]
    assert scored.unet_calls == model.rows == 15 * 60 == CLiDParams().cost_per_query().unet_calls * 60
    assert scored.queries_spent == 60 and scored.images_generated == 0


def test_clid_no_signal_is_chance() -> None:
    queries, labels = make_queries(100, 1)
    scored = score_clid(gray_box(FakeModel(queries, labels, signal=False)), queries)
    for j in range(5):
        assert abs(auc(labels, scored.scores[:, j]) - 0.5) < 0.15


def test_clid_shares_noise_and_is_deterministic() -> None:
    queries, labels = make_queries(5, 2)
    first = score_clid(gray_box(FakeModel(queries, labels)), queries, seed=3)
    second = score_clid(gray_box(FakeModel(queries, labels)), queries, seed=3)
    np.testing.assert_array_equal(first.scores, second.scores)


def test_clid_threshold_fits_on_the_shadow_and_transfers() -> None:
    shadow_q, shadow_y = make_queries(30, 3)
    target_q, target_y = make_queries(30, 4)
    shadow = score_clid(gray_box(FakeModel(shadow_q, shadow_y)), shadow_q).scores
    target = score_clid(gray_box(FakeModel(target_q, target_y)), target_q).scores
    attack = CLiDThreshold().fit(shadow, shadow_y)
    assert 0.0 <= attack.alpha <= 1.0
    assert auc(target_y, attack.membership_score(target)) > 0.9
    assert (attack.predict(target) == target_y.astype(bool)).mean() > 0.8
    assert attack.describe()["alpha_fitted"] is True
    with pytest.raises(ConfigError, match="alpha"):
        CLiDThreshold(alpha=1.5)
    with pytest.raises(ValueError, match="both members and non-members"):
        CLiDThreshold().fit(shadow, np.ones(len(shadow)))


def test_clid_th_is_an_attack_model_of_the_clid_family_fitted_on_shadow_features_only() -> None:
    from attacks.attack import fit_attack_model
    from attacks.attack_models import ATTACK_MODELS, for_family
    from attacks.gray_box import RobustScaler

    assert ATTACK_MODELS.get("clid_th") is CLiDThreshold
    assert "clid_th" in for_family("clid") and "clid_th" not in for_family("loss")
    shadow_q, shadow_y = make_queries(30, 3)
    target_q, target_y = make_queries(30, 4)
    shadow = score_clid(gray_box(FakeModel(shadow_q, shadow_y)), shadow_q).scores
    target = score_clid(gray_box(FakeModel(target_q, target_y)), target_q).scores
    config = AttackConfig(attack="clid", attack_model="clid_th")
    attack = fit_attack_model(config, shadow, shadow_y)
    assert isinstance(attack, CLiDThreshold)
    # The robust scalers are the shadow's own (S of mean_j D_j and of L), nothing of the target's.
    assert attack.scale_d == RobustScaler.fit(shadow[:, :-1].mean(axis=1))
    assert attack.scale_l == RobustScaler.fit(shadow[:, -1])
    fitted = attack.describe()
    scored = attack.membership_score(target)
    assert attack.describe() == fitted  # applying it to the target changes nothing
    # Another target (scores shifted, labels never shown) leaves the fitted rule as it was.
    again = fit_attack_model(config, shadow, shadow_y)
    again.membership_score(target + 1.0)
    assert again.describe() == fitted
    assert auc(target_y, scored) > 0.9


@pytest.mark.parametrize("family", ["pang-wang", "loss", "pia"])
def test_clid_th_with_another_family_is_refused_before_training(family: str) -> None:
    from benchmark.app.config import profile

    message = rf"'clid_th'.*attack family clid only, not '{family}'.*--attack clid"
    with pytest.raises(ConfigError, match=message):
        AttackConfig(attack=family, attack_model="clid_th")
    # The run's validation, which comes before any model is trained, refuses it the same way.
    with pytest.raises(ConfigError, match=message):
        profile("micro").replace(attack=family, attack_model="clid_th").validate()
    profile("micro").replace(attack="clid", attack_model="clid_th").validate()


def test_clip_caption_drops_trailing_words() -> None:
    caption = "one two three four five six seven eight nine ten"
    assert clip_caption(caption, 0.3) == "one two three four five six seven"
    assert clip_caption(caption, 0.5) == "one two three four five"
    assert clip_caption(caption, 0.7) == "one two three"
    assert clip_caption("bird", 0.3) == "bird"


def test_clid_needs_captions() -> None:
    queries, labels = make_queries(2, 5)
    queries[0] = Query("x", queries[0].image, None)
    with pytest.raises(ValueError, match="captions"):
        score_clid(gray_box(FakeModel(queries, labels)), queries)


# --- PIA ----------------------------------------------------------------------------------


@pytest.mark.parametrize("normalized", [False, True])
def test_pia_separates_members_and_counts_calls(normalized: bool) -> None:
    queries, labels = make_queries(30, 6)
    model = FakeModel(queries, labels)
    scored = score_pia(gray_box(model), queries, PIAParams(normalized=normalized), query_batch=16)
    assert scored.scores.shape == (60, 1)
    assert auc(labels, scored.scores[:, 0]) > 0.9
    assert scored.unet_calls == model.rows == 2 * 60 == PIAParams().cost_per_query().unet_calls * 60


def test_pia_no_signal_is_chance() -> None:
    queries, labels = make_queries(100, 7)
    scored = score_pia(gray_box(FakeModel(queries, labels, signal=False)), queries)
    assert abs(auc(labels, scored.scores[:, 0]) - 0.5) < 0.15


def test_pia_uses_eps0_from_timestep_zero() -> None:
    calls = []

    class Recorder:
        name, num_train_timesteps = "rec", 100

        def predict_noise(self, images, captions, *, timesteps, noise=None, seed=0):
            calls.append((list(timesteps), None if noise is None else noise.copy()))
            pred = np.full((len(images), *LATENT), 2.0, dtype=np.float32)
            return type("P", (), {"noise": np.zeros_like(pred), "prediction": pred})()

    queries, _ = make_queries(2, 8)
    scored = score_pia(Recorder(), queries)
    assert calls[0][0] == [0] * 4 and calls[0][1] is None
    assert calls[1][0] == [50] * 4  # t = 500 of 1000, scaled to a 100-step schedule
    np.testing.assert_array_equal(calls[1][1], np.full((4, *LATENT), 2.0))
    np.testing.assert_array_equal(scored.scores, 0.0)


def test_pian_normalizes_to_a_standard_normals_mean_abs() -> None:
    eps = np.random.default_rng(0).standard_normal((3, *LATENT)).astype(np.float32) * 5
    np.testing.assert_allclose(np.abs(normalize_noise(eps)).mean(axis=(1, 2, 3)), np.sqrt(2 / np.pi), rtol=1e-5)


# --- REDIFFUSE ----------------------------------------------------------------------------


def test_rediffuse_separates_members_and_counts_images() -> None:
    queries, labels = make_queries(30, 9)
    target = fake_img2img(queries, labels)
    scored = score_rediffuse(target, queries, ReDiffuseParams(num_variations=4), query_batch=16)
    assert scored.scores.shape == (60, 2)
    assert auc(labels, scored.scores[:, 0]) > 0.9 and auc(labels, scored.scores[:, 1]) > 0.9
    assert scored.images_generated == 4 * 60 and scored.queries_spent == 60


def test_rediffuse_no_signal_is_chance() -> None:
    queries, labels = make_queries(100, 10)
    scored = score_rediffuse(fake_img2img(queries, labels, signal=False), queries, ReDiffuseParams(num_variations=2))
    for j in range(2):
        assert abs(auc(labels, scored.scores[:, j]) - 0.5) < 0.15


def test_ssim_is_one_for_identical_images() -> None:
    images = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(ssim_gray(images, images), 1.0, atol=1e-5)


def test_strength_for_timestep_matches_the_reference_setting() -> None:
    assert strength_for_timestep(50, num_inference_steps=20) == pytest.approx(ReDiffuseParams().strength)
    assert strength_for_timestep(0, num_inference_steps=20) == pytest.approx(0.05)


# --- validation, costs and registration -----------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: CLiDParams(timesteps=(0,)), "timestep"),
        (lambda: CLiDParams(timesteps=(450, 1000)), "timestep"),
        (lambda: CLiDParams(timesteps=()), "timestep"),
        (lambda: CLiDParams(samples_per_timestep=0), "samples_per_timestep"),
        (lambda: CLiDParams(clip_fractions=(0.0,)), "clip fractions"),
        (lambda: CLiDParams(clip_fractions=(1.0,)), "clip fractions"),
        (lambda: CLiDParams(clip_fractions=(0.3, 0.3)), "distinct"),
        (lambda: CLiDParams(clip_fractions=(), include_null_caption=False), "reduced condition"),
        (lambda: PIAParams(timestep=1000), "timestep"),
        (lambda: PIAParams(timestep=-5), "timestep"),
        (lambda: PIAParams(lp=0.5), "lp"),
        (lambda: ReDiffuseParams(num_variations=0), "num_variations"),
        (lambda: ReDiffuseParams(strength=0.0), "strength"),
        (lambda: ReDiffuseParams(strength=1.5), "strength"),
    ],
)
def test_bad_hyperparameters_raise_config_error(make, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()


@pytest.mark.parametrize(
    ("name", "args"),
    [("clid", (("timesteps", "0"),)), ("pia", (("timestep", "2000"),)), ("rediffuse", (("num_variations", "0"),))],
)
def test_families_reject_bad_overrides(name: str, args) -> None:
    with pytest.raises(AttackFamilyError):
        build_family(name, args)


def test_family_costs_and_access() -> None:
    config, sampling = AttackConfig(), SamplingConfig()
    assert build_family("clid").cost_per_query(config, sampling).to_dict() == {"images_generated": 0, "unet_calls": 15}
    assert build_family("pia").cost_per_query(config, sampling).to_dict() == {"images_generated": 0, "unet_calls": 2}
    # n = 10 variations of round(20 * 0.1) = 2 DDIM steps each.
    rediffuse = build_family("rediffuse")
    assert rediffuse.cost_per_query(config, sampling).to_dict() == {"images_generated": 10, "unet_calls": 20}
    assert rediffuse.access(QueryAccess.IMAGE_TO_IMAGE).value == "black-box-img2img"
    with pytest.raises(AttackFamilyError, match="img2img"):
        rediffuse.access(QueryAccess.TEXT)
    with pytest.raises(AttackFamilyError, match="gray-box"):
        build_family("clid").access(QueryAccess.IMAGE_TO_IMAGE)
    assert build_family("pia").access(QueryAccess.TEXT).value == "gray-box"


def test_families_score_through_the_real_interfaces() -> None:
    queries, labels = make_queries(10, 11)
    config = AttackConfig(query_batch=8)
    target = gray_box(FakeModel(queries, labels))
    for name, k in (("clid", 5), ("pia", 1)):
        scored = build_family(name).score(target, queries, config)
        assert scored.scores.shape == (20, k)
    with pytest.raises(TypeError, match="gray-box"):
        build_family("pia").score(fake_img2img(queries, labels), queries, config)
    scored = build_family("rediffuse", (("num_variations", "2"),)).score(fake_img2img(queries, labels), queries, config)
    assert scored.scores.shape == (20, 2)
