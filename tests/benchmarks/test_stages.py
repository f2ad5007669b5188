"""Per-stage timings of the pipeline (pytest-benchmark; timed with --benchmark-enable).

    python -m pytest tests/benchmarks --benchmark-enable

Each stage runs once (rounds=1, iterations=1) at 8 px on a handful of images, so the
suite stays fast; under the default `--benchmark-disable` each benchmark is a plain test.
Every benchmark also checks what its stage produced, not just that it ran.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from attacks.attack import AttackConfig, Query, score_queries
from attacks.encoders import PixelEncoder
from benchmark.pipeline.data.base import images_to_tensor
from benchmark.pipeline.data.scenes import ScenesDataset
from benchmark.pipeline.finetune import TrainConfig, train
from benchmark.pipeline.models.diffusion import black_box, generate, load_model
from benchmark.pipeline.reference_networks import ClipImageFeatures, load_clip_folder
from benchmark.pipeline.target import SamplingConfig
from benchmark.pipeline.utility_metrics import clip_score, fid_kid
from defenses import resolve

RESOLUTION = 8


def _scenes(n: int) -> tuple[np.ndarray, list[str]]:
    """n scene images (N, H, W, 3) in [0, 1] with their captions."""
    ds = ScenesDataset(resolution=RESOLUTION, size=max(n, 60))
    return np.stack([ds.image(i) for i in range(n)]), [ds.caption(i) for i in range(n)]


def _snapshot(model) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [p.detach().clone() for p in model.unet.parameters()]


def _changed(model, before: list[torch.Tensor]) -> int:  # type: ignore[no-untyped-def]
    return sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.unet.parameters(), strict=True))


def test_finetune_steps(benchmark, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    n_images, batch_size, epochs = 8, 4, 2
    model = load_model(tiny_model_dir)
    images, captions = _scenes(n_images)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=1e-3, seed=0)
    before = _snapshot(model)
    report = benchmark.pedantic(
        train, args=(model, images_to_tensor(list(images)), captions, config), rounds=1, iterations=1
    )
    assert report.steps == epochs * math.ceil(n_images / batch_size)
    assert len(report.loss_history) == report.steps
    assert all(math.isfinite(loss) for loss in report.loss_history)
    assert math.isfinite(report.final_loss) and report.final_loss > 0
    assert _changed(model, before) > 0
    benchmark.extra_info.update(
        {
            "resolution": RESOLUTION,
            "images": n_images,
            "batch_size": batch_size,
            "epochs": epochs,
            "steps": report.steps,
        }
    )


def test_dp_finetune_steps(benchmark, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    # Batch = the whole set (sample rate 1): calibrating the noise for eps 8 then takes well under a
    # second, where a subsampled run (e.g. batch 4 of 8) spends 5-7 s on one core in the accountant.
    # The calibration is part of the timed stage.
    n_images, batch_size, epochs = 8, 8, 4
    model = load_model(tiny_model_dir)
    images, captions = _scenes(n_images)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=1e-3, seed=0)
    defense = resolve("dpsgd.eps8")
    before = _snapshot(model)
    result = benchmark.pedantic(
        defense.fine_tune,
        kwargs={"model": model, "images": images_to_tensor(list(images)), "captions": captions, "train_config": config},
        rounds=1,
        iterations=1,
    )
    details = result.details["dpsgd"]
    epsilon = details["epsilon"]
    assert isinstance(epsilon, float) and math.isfinite(epsilon) and epsilon > 0
    # Noise is calibrated for the target; the accountant's epsilon must not overshoot it by much.
    assert epsilon <= 8.0 * 1.05
    assert details["steps"] > 0 and details["noise_multiplier"] > 0
    assert details["sample_rate"] == batch_size / n_images
    assert all(math.isfinite(loss) for loss in result.report.loss_history)
    assert _changed(model, before) > 0
    # The GradSampleModule is unwrapped again.
    assert type(model.unet).__name__ == "UNet2DConditionModel"
    benchmark.extra_info.update(
        {
            "resolution": RESOLUTION,
            "images": n_images,
            "batch_size": batch_size,
            "epochs": epochs,
            "steps": details["steps"],
            "epsilon": epsilon,
            "noise_multiplier": details["noise_multiplier"],
            "sample_rate": details["sample_rate"],
        }
    )


def test_generation(benchmark, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    n_images, steps, guidance = 4, 5, 2.0
    model = load_model(tiny_model_dir)
    _, captions = _scenes(n_images)
    kwargs = {"seed": 3, "num_inference_steps": steps, "guidance_scale": guidance}
    out = benchmark.pedantic(generate, args=(model, captions), kwargs=kwargs, rounds=1, iterations=1)
    assert out.shape == (n_images, 3, RESOLUTION, RESOLUTION)
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    assert torch.equal(generate(model, captions, **kwargs), out)  # same seed, same images
    assert not torch.equal(generate(model, captions, **{**kwargs, "seed": 4}), out)
    benchmark.extra_info.update(
        {"resolution": RESOLUTION, "images": n_images, "inference_steps": steps, "guidance_scale": guidance}
    )


def test_attack_scoring(benchmark, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    n_queries, generations, steps = 4, 2, 3
    model = load_model(tiny_model_dir)
    target = black_box(model, SamplingConfig(num_inference_steps=steps), name="tiny")
    images, captions = _scenes(n_queries)
    queries = [Query(query_id=f"q{i}", image=images[i], caption=captions[i]) for i in range(n_queries)]
    config = AttackConfig(encoder="pixels", generations_per_query=generations, query_batch=2)
    scored = benchmark.pedantic(
        score_queries, args=(target, queries, config), kwargs={"encoder": PixelEncoder()}, rounds=1, iterations=1
    )
    assert scored.scores.shape == (n_queries, generations)
    assert np.isfinite(scored.scores).all()
    assert np.all(np.abs(scored.scores) <= 1 + 1e-6)  # cosine similarities
    assert scored.queries_spent == n_queries == target.query_count
    assert scored.images_generated == n_queries * generations
    assert scored.query_ids == [q.query_id for q in queries]
    benchmark.extra_info.update(
        {
            "resolution": RESOLUTION,
            "queries": n_queries,
            "generations_per_query": generations,
            "inference_steps": steps,
            "query_batch": config.query_batch,
        }
    )


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save:UserWarning")
def test_utility_metrics(benchmark, tiny_clip_dir: Path) -> None:  # type: ignore[no-untyped-def]
    n_images, kid_subset_size, kid_subsets = 16, 8, 5
    bundle = load_clip_folder(tiny_clip_dir)
    images, captions = _scenes(n_images)
    # Exact multiples of 1/255: CLIP score's processor sees uint8.
    real = torch.from_numpy(np.round(images * 255) / 255).float().permute(0, 3, 1, 2)
    shifted = (real * 0.5 + 0.5).clamp(0, 1)
    feature = ClipImageFeatures(bundle)
    kid = {"kid_subset_size": kid_subset_size, "kid_subsets": kid_subsets, "seed": 0}

    def metrics() -> tuple[float, float, float]:
        same, _, _ = fid_kid(real, real, feature, **kid)
        other, _, _ = fid_kid(real, shifted, feature, **kid)
        return same, other, clip_score(bundle, real, captions)

    fid_same, fid_shifted, score = benchmark.pedantic(metrics, rounds=1, iterations=1)
    assert abs(fid_same) < 1e-3
    assert fid_shifted > fid_same + 1e-3
    assert math.isfinite(score) and 0 <= score <= 100
    benchmark.extra_info.update(
        {
            "resolution": RESOLUTION,
            "images": n_images,
            "kid_subset_size": kid_subset_size,
            "kid_subsets": kid_subsets,
            "fid_same": fid_same,
            "fid_shifted": fid_shifted,
            "clip_score": score,
        }
    )
