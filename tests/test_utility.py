"""Utility metrics: FID/KID/CLIP score against independent computations, networks, caches, bad input."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from attacks.training_data import TrainingData
from benchmark.kernel.errors import ConfigError, ModelError
from benchmark.pipeline.reference_networks import (
    ClipBundle,
    ClipImageFeatures,
    InceptionFeatures,
    ReferenceClipTraining,
    check_fid_weights,
    fidelity_inception,
    inception_without_weights,
    load_clip_folder,
    reference_clip,
    sha256_file,
)
from benchmark.pipeline.utility_metrics import UtilitySettings, clip_score, fid_kid, measure

torch.set_num_threads(1)


class Flatten(nn.Module):
    """Fixed features: the pixels themselves."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).double()


def _images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 2, 2, generator=g) * 0.8 + shift).clamp(0, 1)


def _fid_numpy(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _kid_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the polynomial kernel (x.y / d + 1)^3 (Binkowski et al.)."""
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    m = len(a)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )


def test_fid_and_kid_match_independent_computation() -> None:
    real, fake = _images(40, 0), _images(40, 1, shift=0.1)
    fid, kid_mean, kid_std = fid_kid(real, fake, Flatten(12), kid_subset_size=40, kid_subsets=1, seed=0)
    a, b = real.flatten(1).double().numpy(), fake.flatten(1).double().numpy()
    assert fid == pytest.approx(_fid_numpy(a, b), rel=1e-4, abs=1e-6)
    # One subset of all samples: the subset draw is a permutation, which the estimator ignores.
    assert kid_mean == pytest.approx(_kid_numpy(a, b), rel=1e-4, abs=1e-7)
    assert kid_std == pytest.approx(0.0, abs=1e-9)


def test_kid_subsets_are_seeded_and_leave_global_rng_alone() -> None:
    real, fake = _images(30, 0), _images(30, 1, shift=0.1)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = fid_kid(real, fake, Flatten(12), kid_subset_size=10, kid_subsets=20, seed=5)
    assert torch.rand(1) == expected_next
    assert fid_kid(real, fake, Flatten(12), kid_subset_size=10, kid_subsets=20, seed=5) == first
    assert first[2] > 0  # several subsets: a spread


def test_too_few_samples_for_kid_subset() -> None:
    with pytest.raises(ConfigError, match="kid_subset_size=8.*--utility"):
        fid_kid(_images(5, 0), _images(5, 1), Flatten(12), kid_subset_size=8, kid_subsets=2, seed=0)


def _scene_batch(n: int, resolution: int = 16) -> tuple[torch.Tensor, list[str]]:
    from benchmark.pipeline.data.scenes import ScenesDataset

    ds = ScenesDataset(resolution=resolution, size=n)
    images = np.stack([ds.image(i) for i in range(n)])
    # Exact multiples of 1/255: torchmetrics' processor sees uint8, so nothing is lost.
    tensor = torch.from_numpy(np.round(images * 255) / 255).float().permute(0, 3, 1, 2)
    return tensor, [ds.caption(i) for i in range(n)]


def test_standard_clip_folder_loads_and_hashes(tiny_clip_dir: Path) -> None:
    bundle = load_clip_folder(tiny_clip_dir)
    expected = hashlib.sha256((tiny_clip_dir / "model.safetensors").read_bytes()).hexdigest()
    assert bundle.weights_sha256 == expected
    images, captions = _scene_batch(12)
    result = measure(
        bundle=bundle, real=images, fake=images.flip(0), captions=captions, settings=UtilitySettings(kid_subset_size=6)
    )
    assert result.details["feature_network"]["weights_sha256"] == expected
    assert result.details["n_generated"] == 12 and result.details["kid_subset_size"] == 6
    assert np.isfinite([result.fid, result.kid_mean, result.kid_std, result.clip_score]).all()
    record = result.record()
    assert (record.target.fid, record.target.clip_score) == (
        result.fid,
        result.clip_score,
    ) and record.base_model is None
    assert record.feature_network.weights_sha256 == expected


def test_clip_score_matches_formula_with_same_model(tiny_clip_dir: Path) -> None:
    bundle = load_clip_folder(tiny_clip_dir)
    images, captions = _scene_batch(10)
    with torch.no_grad():
        image = ClipImageFeatures(bundle)(images)
        tokens = bundle.processor.tokenizer(captions, padding=True, return_tensors="pt")
        text = bundle.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
    cos = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    expected = max(float(100 * cos.mean()), 0.0)
    assert clip_score(bundle, images, captions) == pytest.approx(expected, abs=1e-3)


def test_real_images_against_themselves_give_fid_near_zero(tiny_clip_dir: Path) -> None:
    bundle = load_clip_folder(tiny_clip_dir)
    images, _ = _scene_batch(24)
    fid, _, _ = fid_kid(images, images, ClipImageFeatures(bundle), kid_subset_size=12, kid_subsets=5, seed=0)
    other, _ = _scene_batch(48)
    fid_other, _, _ = fid_kid(images, other[24:], ClipImageFeatures(bundle), kid_subset_size=12, kid_subsets=5, seed=0)
    assert abs(fid) < 1e-3  # KID is unbiased, not zero: its random subsets differ on each side
    assert fid_other > fid + 1e-3


def test_not_a_clip_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_clip_folder(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelError, match="not a CLIP model.*'vit'"):
        load_clip_folder(tmp_path)


def test_fid_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        check_fid_weights(tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(10, 5)}, wrong)
    with pytest.raises(ConfigError, match=r"not an Inception-v3 state dict.*\(10, 5\)"):
        check_fid_weights(wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(ConfigError, match="not a PyTorch weights file"):
        check_fid_weights(garbage)


def _fidelity_usable() -> bool:
    try:
        fidelity_inception()
    except ConfigError:
        return False
    return True


FIDELITY = _fidelity_usable()


@pytest.mark.skipif(
    not FIDELITY,
    reason="torch-fidelity with a torchvision built for this torch is not importable here (CI's CPU torch 2.13.0 "
    "has none); run in an environment with torch 2.14.1 + torchvision 0.29.1 + torch-fidelity",
)
def test_fid_weights_path_runs_torchmetrics_inception_on_a_randomly_initialised_network(
    tmp_path: Path, tiny_clip_dir: Path
) -> None:
    net = inception_without_weights()
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(net.state_dict(), weights)  # the standard format: a plain state dict
    check_fid_weights(weights)
    real, captions = _scene_batch(12, resolution=16)
    feature = InceptionFeatures(weights)
    same = fid_kid(real, real, feature, kid_subset_size=6, kid_subsets=5, seed=0)
    other = fid_kid(real, real.flip(1), feature, kid_subset_size=6, kid_subsets=5, seed=0)
    # A random Inception's features are tiny, so FID is judged relative to a real difference.
    assert other[0] > 0 and abs(same[0]) < 1e-4 * other[0]
    # The run's path: the record names the Inception network and the weights file's hash.
    bundle = load_clip_folder(tiny_clip_dir)
    settings = UtilitySettings(kid_subset_size=6, kid_subsets=5, seed=0, fid_weights=weights)
    result = measure(bundle=bundle, real=real, fake=real.flip(1), captions=captions, settings=settings)
    assert result.details["feature_network"]["name"] == "inception-v3-compat (torch-fidelity)"
    assert result.details["feature_network"]["weights_sha256"] == sha256_file(weights)
    assert result.fid == pytest.approx(other[0], rel=1e-4)
    # A state dict with one tensor of another shape is refused before torch-fidelity loads it.
    state = net.state_dict()
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=r"does not fit torch-fidelity's FID Inception: 1 of \d+ tensors"):
        check_fid_weights(tmp_path / "bad.pth")


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_fid_weights_without_torch_fidelity_says_what_to_install(tmp_path: Path) -> None:
    shaped = tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.zeros(3, 2048)}, shaped)
    with pytest.raises(ConfigError, match="pip install torch-fidelity"):
        check_fid_weights(shaped)


def test_torch_fidelity_that_fails_to_import_names_the_torchvision_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "torch_fidelity" else real_find_spec(name, *a)
    )
    # A None entry in sys.modules makes the import fail, as torchvision's operator registration does here.
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(ConfigError, match="installed but fails to import.*torchvision.*matching pair"):
        fidelity_inception()


def test_reference_cache_is_rebuilt_when_corrupt(tmp_path: Path) -> None:
    images, captions = _scene_batch(24, resolution=8)
    public = TrainingData.from_arrays(images.permute(0, 2, 3, 1).numpy(), captions, name="public")
    training = ReferenceClipTraining(hidden_size=32, layers=1, projection_dim=16, steps=2, batch_size=8)
    first = reference_clip(public=public, cache_dir=tmp_path, training=training)
    assert first.details["from_cache"] is False
    assert reference_clip(public=public, cache_dir=tmp_path, training=training).details["from_cache"] is True
    [weights] = (tmp_path / "utility-clip").glob("*/model.safetensors")
    weights.write_bytes(b"corrupt")
    rebuilt = reference_clip(public=public, cache_dir=tmp_path, training=training)
    assert rebuilt.details["from_cache"] is False
    assert rebuilt.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert 0.0 <= rebuilt.details["retrieval"]["top1"] <= 1.0


def test_config_and_cli_flags(tmp_path: Path) -> None:
    from benchmark.app.cli import _add_run_parser, config_from_args
    from benchmark.app.config import profile

    with pytest.raises(ConfigError, match="KID subset size 50 is larger than the 8"):
        profile("micro").replace(kid_subset_size=50).validate()
    profile("micro").replace(kid_subset_size=50, utility_metrics=False).validate()
    parser = argparse.ArgumentParser()
    _add_run_parser(parser.add_subparsers(dest="command"))
    config = config_from_args(parser.parse_args(["run", "--no-utility", "--clip-model", str(tmp_path)]))
    assert config.utility_metrics is False and config.clip_model == tmp_path
    with pytest.raises(ModelError, match="no config.json"):
        config.replace(utility_metrics=True).validate()


def test_micro_record_has_utility(micro_run) -> None:  # type: ignore[no-untyped-def]
    record = micro_run.outcome.record
    directions = {f.name: f.higher_is_better for f in record.figures()}
    assert directions["utility.fid"] is False and directions["utility.kid_mean"] is False
    assert directions["utility.clip_score"] is True
    utility = record.utility
    assert utility.n_real == micro_run.config.utility
    assert utility.n_generated == micro_run.config.utility * micro_run.config.utility_generations
    # Every figure has its interval, and the difference to the base model its paired test.
    intervals, paired = utility.details["intervals"], utility.details["vs_base_model"]
    for name in ("fid", "kid_mean", "clip_score"):
        low, high = intervals[name]
        assert low <= high
        assert paired[name]["low"] <= paired[name]["high"] and 0 < paired[name]["p_value"] <= 1
    assert utility.feature_network.weights_sha256 == utility.clip_model.weights_sha256
    assert "utility" in record.timings_s
    assert isinstance(ClipBundle, type)


@pytest.mark.slow
def test_reference_model_ranks_true_captions_above_shuffled(tmp_path: Path) -> None:
    """The default reference model: retrieval far above chance; shuffled captions score clearly lower."""
    from benchmark.app.config import profile
    from benchmark.pipeline.data.scenes import ScenesDataset

    ds = ScenesDataset(resolution=16, size=2200)
    public = TrainingData.from_arrays(
        np.stack([ds.image(i) for i in range(2000)]), [ds.caption(i) for i in range(2000)], name="public"
    )
    bundle = reference_clip(public=public, cache_dir=tmp_path, training=profile("default").reference_clip)
    retrieval = bundle.details["retrieval"]
    assert retrieval["top1"] > 10 * retrieval["chance_top1"]
    images = torch.from_numpy(np.stack([ds.image(i) for i in range(2000, 2200)])).permute(0, 3, 1, 2)
    captions = [ds.caption(i) for i in range(2000, 2200)]
    shuffled = captions[1:] + captions[:1]
    assert clip_score(bundle, images, captions) > clip_score(bundle, images, shuffled) + 5


def test_micro_record_has_the_base_model_as_utility_control(micro_run) -> None:  # type: ignore[no-untyped-def]
    record = micro_run.outcome.record
    base = record.utility.base_model
    assert base is not None
    figures = {f.name: f for f in record.figures()}
    assert figures["utility.base_model.fid"].value == base.fid
    assert figures["utility.base_model.clip_score"].higher_is_better is True
    # Another model (the base, before fine-tuning) under the same protocol gives other figures.
    assert base.fid != record.utility.target.fid


def test_several_generations_intervals_and_the_paired_difference(tiny_clip_dir: Path) -> None:
    """Three generations per caption; a model against itself differs by 0, against a shifted one clearly."""
    from benchmark.pipeline.utility_metrics import paired_differences

    bundle = load_clip_folder(tiny_clip_dir)
    real, captions = _scene_batch(20)
    fake = torch.cat([real.roll(1, 0), real.roll(2, 0), real.flip(-1)])
    settings = UtilitySettings(kid_subset_size=10, kid_subsets=5, bootstrap=200)
    result = measure(bundle=bundle, real=real, fake=fake, captions=captions, settings=settings)
    assert result.details["n_generated"] == 60 and result.details["generations_per_caption"] == 3
    # The per-image CLIP scores average to torchmetrics' CLIPScore over the same images.
    assert result.clip_score == pytest.approx(clip_score(bundle, fake, captions * 3), abs=1e-3)
    for name in ("fid", "kid_mean", "clip_score"):
        low, high = result.details["intervals"][name]
        # The tiny test CLIP scores below 0, where CLIPScore clips: that interval is [0, 0].
        assert low < high or name == "clip_score"

    same = paired_differences(result.samples, result.samples, resamples=200, seed=0)
    assert all(same[k]["difference"] == 0 and same[k]["low"] == same[k]["high"] == 0 for k in same)
    assert all(same[k]["p_value"] == 1 for k in same)

    darker = measure(bundle=bundle, real=real, fake=fake * 0.3, captions=captions, settings=settings)
    worse = paired_differences(darker.samples, result.samples, resamples=200, seed=0)
    assert worse["fid"]["low"] > 0 and worse["fid"]["p_value"] < 0.05
    with pytest.raises(ValueError, match="same real images"):
        other = measure(bundle=bundle, real=real.flip(0), fake=fake, captions=captions, settings=settings)
        paired_differences(other.samples, result.samples, resamples=10, seed=0)


def test_generation_seeds_start_at_the_run_seed_and_differ() -> None:
    from benchmark.pipeline.utility_metrics import generation_seeds

    seeds = generation_seeds(UtilitySettings(seed=4, generations=3))
    assert seeds[0] == 4 and len(set(seeds)) == 3


def test_records_from_before_several_generations_reproduce_with_one() -> None:
    from benchmark.app.config import RunConfig, upgrade_config_dict

    old = RunConfig().to_dict()
    del old["utility_generations"]
    assert upgrade_config_dict(old)["utility_generations"] == 1
    assert RunConfig().utility_generations == 3
