"""Gray-box access (`GrayBoxTarget`), attack families, and the loss attack end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attacks.attack import AttackConfig, Query
from attacks.families import ATTACK_FAMILIES, Access, AttackFamilyError, build_family
from attacks.loss import LossAttack, LossParams
from attacks.scenarios import QueryAccess
from benchmark.app.config import profile
from benchmark.app.runner import run
from benchmark.app.suite import cell_key
from benchmark.kernel.errors import ConfigError
from benchmark.kernel.registry import RegistryError
from benchmark.pipeline.models.diffusion import DiffusionModel, gray_box, load_model
from benchmark.pipeline.records import read_record
from benchmark.pipeline.target import GrayBoxTarget, NoisePrediction, SamplingConfig

LATENT = (4, 2, 2)


class FakePredictor:
    """Predicts the noise exactly for images whose mean is above 0.5 ("members"), badly otherwise."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[str], list[int], int]] = []

    def __call__(self, images, captions, timesteps, noise, seed):  # type: ignore[no-untyped-def]
        self.calls.append((len(images), list(captions), [int(t) for t in timesteps], seed))
        if noise is None:
            noise = np.random.default_rng(seed).standard_normal((len(images), *LATENT)).astype(np.float32)
        member = images.mean(axis=(1, 2, 3)) > 0.5
        prediction = np.where(member[:, None, None, None], noise, 0.0 * noise).astype(np.float32)
        return noise, prediction


def _fake(name: str = "fake") -> tuple[GrayBoxTarget, FakePredictor]:
    fake = FakePredictor()
    return GrayBoxTarget(fake, name=name, num_train_timesteps=100, latent_shape=LATENT), fake


def test_counts_predictions_and_null_captions() -> None:
    target, fake = _fake()
    images = np.zeros((3, 8, 8, 3), dtype=np.float32)
    out = target.predict_noise(images, ["a", None, "c"], timesteps=[1, 2, 99], seed=4)
    assert isinstance(out, NoisePrediction)
    assert out.noise.shape == out.prediction.shape == (3, *LATENT) and out.noise.dtype == np.float32
    assert (target.query_count, target.unet_calls, target.images_generated) == (3, 3, 0)
    assert fake.calls == [(3, ["a", "", "c"], [1, 2, 99], 4)]
    given = np.ones((1, *LATENT), dtype=np.float32)
    again = target.predict_noise(images[:1], ["a"], timesteps=np.array([5]), noise=given)
    np.testing.assert_array_equal(again.noise, given)
    assert (target.query_count, target.unet_calls) == (4, 4)
    assert "unet_calls=4" in repr(target)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"timesteps": [0, 100]}, "timesteps must be in"),
        ({"timesteps": [-1, 0]}, "timesteps must be in"),
        ({"timesteps": [0]}, "timesteps must be 2 integers"),
        ({"timesteps": [0.5, 1.0]}, "integers"),
        ({"timesteps": [0, 1], "noise": np.zeros((2, 3))}, "noise must have shape"),
        ({"timesteps": [0, 1], "captions": ["a"]}, "2 images but 1 captions"),
    ],
)
def test_rejects_bad_input_without_counting(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    target, fake = _fake()
    args = {"captions": ["a", "b"], **kwargs}
    with pytest.raises(ValueError, match=match):
        target.predict_noise(np.zeros((2, 8, 8, 3)), **args)
    assert fake.calls == [] and target.query_count == 0 and target.unet_calls == 0


@pytest.fixture(scope="module")
def tiny_gray(tiny_model_dir: Path) -> GrayBoxTarget:
    return gray_box(load_model(tiny_model_dir), name="tiny", batch_size=3)


def _leaks(value: object) -> bool:
    return isinstance(value, (torch.nn.Module, torch.Tensor, torch.nn.Parameter, DiffusionModel))


def test_gray_box_from_model_exposes_no_weights(tiny_gray: GrayBoxTarget) -> None:
    public = [name for name in dir(tiny_gray) if not name.startswith("_")]
    assert set(public) >= {"predict_noise", "query_count", "unet_calls", "name", "num_train_timesteps"}
    for name in public:
        assert not _leaks(getattr(tiny_gray, name)), f"public attribute {name!r} exposes the model"
    assert not hasattr(tiny_gray, "__dict__") and "__dict__" not in GrayBoxTarget.__slots__
    for slot in GrayBoxTarget.__slots__:
        assert not _leaks(getattr(tiny_gray, slot)), f"slot {slot!r} holds the model itself"
    with pytest.raises(AttributeError):
        tiny_gray.model = object()  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        tiny_gray.unet_calls = 0  # type: ignore[misc]
    with pytest.raises(TypeError, match="DiffusionModel"):
        gray_box(torch.nn.Linear(2, 2), name="x")


def test_gray_box_from_model_is_deterministic_and_batch_independent(
    tiny_gray: GrayBoxTarget, tiny_model_dir: Path
) -> None:
    images = np.random.default_rng(0).uniform(size=(5, 8, 8, 3)).astype(np.float32)
    captions = ["a red circle", None, "a blue square", "x", "y"]
    steps = [0, 100, 450, 700, 999]
    before = tiny_gray.query_count, tiny_gray.unet_calls
    first = tiny_gray.predict_noise(images, captions, timesteps=steps, seed=3)
    assert first.prediction.shape == (5, *tiny_gray.latent_shape) and first.prediction.dtype == np.float32
    assert (tiny_gray.query_count - before[0], tiny_gray.unet_calls - before[1]) == (5, 5)
    again = tiny_gray.predict_noise(images, captions, timesteps=steps, seed=3)
    np.testing.assert_array_equal(first.noise, again.noise)
    np.testing.assert_array_equal(first.prediction, again.prediction)
    one_batch = gray_box(load_model(tiny_model_dir), name="tiny", batch_size=64)
    other = one_batch.predict_noise(images, captions, timesteps=steps, seed=3)
    np.testing.assert_allclose(other.prediction, first.prediction, rtol=1e-4, atol=1e-5)
    different = tiny_gray.predict_noise(images, captions, timesteps=steps, seed=4)
    assert not np.array_equal(different.noise, first.noise)
    given = tiny_gray.predict_noise(images, captions, timesteps=steps, noise=first.noise, seed=99)
    np.testing.assert_allclose(given.prediction, first.prediction, rtol=1e-5, atol=1e-6)


# --- families ---------------------------------------------------------------------------------


def test_registry_has_the_built_in_families() -> None:
    assert {"pang-wang", "loss"} <= set(ATTACK_FAMILIES.names())
    with pytest.raises(RegistryError, match="did you mean 'loss'"):
        ATTACK_FAMILIES.get("los")
    pang = build_family("pang-wang")
    assert pang.access(QueryAccess.TEXT) is Access.BLACK_BOX
    assert pang.access(QueryAccess.IMAGE_TO_IMAGE) is Access.BLACK_BOX_IMG2IMG
    cost = pang.cost_per_query(AttackConfig(generations_per_query=3), SamplingConfig(num_inference_steps=20))
    assert (cost.images_generated, cost.unet_calls) == (3, 60)
    loss = build_family("loss")
    assert loss.access(QueryAccess.TEXT) is Access.GRAY_BOX
    with pytest.raises(AttackFamilyError, match="gray-box"):
        loss.access(QueryAccess.IMAGE_TO_IMAGE)
    assert loss.cost_per_query(AttackConfig(), SamplingConfig()).to_dict() == {"images_generated": 0, "unet_calls": 3}


def test_loss_defaults_and_scaling() -> None:
    params = LossParams()
    assert params.timesteps == (440, 450, 460) and params.pairs == 3
    assert params.model_timesteps(1000) == [440, 450, 460]
    assert params.model_timesteps(100) == [44, 45, 46]
    assert LossParams(timesteps=(450,), draws_per_timestep=2).model_timesteps(1000) == [450, 450]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((("timesteps", "1000"),), "timesteps must be in"),
        ((("draws_per_timestep", "0"),), "draws_per_timestep must be"),
        ((("lr", "1"),), "no hyperparameter 'lr'"),
        ((("schedule_steps", "x"),), "schedule_steps"),
    ],
)
def test_bad_hyperparameters(args: tuple[tuple[str, str], ...], match: str) -> None:
    with pytest.raises(AttackFamilyError, match=match):
        build_family("loss", args)


def test_loss_attack_scores_members_higher() -> None:
    target, fake = _fake()
    images = np.stack([np.full((8, 8, 3), v, dtype=np.float32) for v in (0.9, 0.1, 0.8, 0.2, 0.7)])
    queries = [Query(f"q{i}", im, f"c{i}") for i, im in enumerate(images)]
    config = AttackConfig(attack="loss", query_batch=2, seed=7)
    family = LossAttack()
    scored = family.score(target, queries, config)
    assert scored.scores.shape == (5, 3)
    members = np.array([True, False, True, False, True])
    assert scored.scores[members].min() > scored.scores[~members].max()
    assert scored.queries_spent == 5 and scored.unet_calls == 15 and scored.images_generated == 0
    # Batches of two queries x three (t, eps) pairs, timesteps scaled to the model's 100 steps.
    assert [c[0] for c in fake.calls] == [6, 6, 3] and fake.calls[0][2] == [44, 45, 46, 44, 45, 46]
    assert [c[3] for c in fake.calls] == [7, 9, 11]
    with pytest.raises(ValueError, match="no caption"):
        family.score(target, [Query("x", images[0], None)], config)
    with pytest.raises(TypeError, match="gray-box"):
        family.score(object(), queries, config)  # type: ignore[arg-type]


# --- the run's configuration: errors before any training ------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"attack": "los"}, "did you mean 'loss'"),
        ({"attack": "loss", "query_access": QueryAccess.IMAGE_TO_IMAGE}, "needs gray-box access"),
        ({"attack": "loss", "attack_args": (("timesteps", "-1"),)}, "timesteps must be in"),
        ({"attack": "pang-wang", "attack_args": (("timesteps", "450"),)}, "no hyperparameter"),
    ],
)
def test_bad_attack_fails_before_training(tmp_path: Path, changes: dict, match: str) -> None:  # type: ignore[type-arg]
    config = profile("micro").replace(results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", **changes)
    with pytest.raises(ConfigError, match=match):
        run(config, show_progress=False)
    assert not (tmp_path / "cache" / "finetuned").exists() and not (tmp_path / "results").exists()


def test_cell_key_includes_the_family_and_reads_old_records_as_pang_wang() -> None:
    config = profile("micro")
    old = config.to_dict()
    del old["attack"], old["attack_args"]
    assert cell_key(old) == cell_key(config)
    assert cell_key(config.replace(attack="loss")) != cell_key(config)
    assert cell_key(config.replace(attack="loss", attack_args=(("timesteps", "450"),))) != cell_key(
        config.replace(attack="loss")
    )


def test_loss_run_records_the_family(micro_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The micro run's fine-tunes reused; the loss attack scored end to end and recorded."""
    config = micro_run.config.replace(attack="loss", results_dir=tmp_path / "results")
    outcome = run(config, show_progress=False)
    record = read_record(outcome.path)
    attack = record.attack
    assert attack.family == "loss" and attack.access == "gray-box" and attack.family_version == "1"
    assert attack.hyperparameters is not None and attack.hyperparameters["timesteps"] == [440, 450, 460]
    assert attack.cost_per_query == {"images_generated": 0, "unet_calls": 3}
    n = len(attack.query_ids)
    assert attack.unet_calls == 3 * n and attack.images_generated == 0 and attack.queries_spent == n
    assert np.asarray(attack.scores).shape == (n, 3)
    assert record.control is not None and record.baseline is not None
    assert record.components["attack"].name == "loss"
    assert json.loads(outcome.path.read_text())["config"]["attack"] == "loss"
    # Pang & Wang's records name their family too.
    pang = read_record(micro_run.outcome.path).attack
    assert pang.family == "pang-wang" and pang.access == "black-box"
