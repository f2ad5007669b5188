"""Result records for tests, built from the writer's own types (never by hand)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from benchmark.app.config import RunConfig, profile
from benchmark.pipeline.finetune import TrainConfig
from benchmark.pipeline.models.tiny_sd import build_tiny_sd_pipeline
from benchmark.pipeline.privacy_metrics import privacy_metrics
from benchmark.pipeline.records import (
    AttackRecord,
    ComponentRecord,
    Network,
    Provenance,
    ResultRecord,
    TrainingRecord,
    UtilityFigures,
    UtilityRecord,
)
from benchmark.pipeline.target import SamplingConfig


def make_record(
    *,
    defense: str = "none",
    preset: str | None = None,
    seed: int = 0,
    scenario: str = "I",
    attack_model: str = "threshold",
    auc: float = 0.8,
    tpr1: float = 0.3,
    fid: float | None = 10.0,
    clip: float = 25.0,
    epsilon: float | None = None,
    network: tuple[str, str] = ("clip-ref", "a" * 64),
    n_nonmembers: int = 8,
    **overrides: Any,
) -> ResultRecord:
    """A small valid record; `overrides` replace top-level fields of the result.

    The privacy figures are recomputed from per-query scores built to give `auc`
    (to 1/4000) and, at the lowest FPR, `tpr1` (to 1/250): a record's figures
    must follow from its evidence (`check_consistency`).
    """

    def comp(name: str, **details: Any) -> ComponentRecord:
        return ComponentRecord(name=name, version="1", origin="test", details=details)

    labels, scores = _scores(auc, tpr1, n_nonmembers)
    predictions = [int(s > (n_nonmembers - 1) / 2) for s in scores]
    computed = privacy_metrics(labels, scores, predictions, bootstrap=None)
    privacy = dataclasses.replace(
        computed,
        tpr_at_fpr=tuple(dataclasses.replace(t, ci=(0.0, min(1.0, t.tpr + 0.1))) for t in computed.tpr_at_fpr),
        auc_ci=(max(0.0, computed.auc - 0.1), min(1.0, computed.auc + 0.1)),
    )
    utility = None
    if fid is not None:
        utility = UtilityRecord(
            feature_network=Network(*network),
            clip_model=Network(*network),
            n_real=10,
            n_generated=10,
            kid_subset_size=5,
            kid_subsets=2,
            seed=0,
            target=UtilityFigures(fid=fid, kid_mean=fid / 1000, kid_std=0.001, clip_score=clip),
        )
    record = ResultRecord(
        run_id=f"r-{defense}-{preset}-{seed}-{scenario}-{attack_model}".replace(" ", "_").replace("|", "_"),
        provenance=Provenance(
            package="diffusion-mia-bench",
            package_version="0.1.0",
            git_commit=None,
            created="2026-01-01T00:00:00+00:00",
            python="3.11",
            platform="test",
            libraries={},
        ),
        seeds={"seed": seed, "shadow_seed": 10000 + seed},
        config={},
        components={
            "dataset": comp("scenes"),
            "model": comp("tiny"),
            "defense": comp(defense, preset=preset, config={}),
            "attack_model": comp(attack_model),
            "encoder": comp("pixels"),
        },
        splits={"members": [], "nonmembers": []},
        training=TrainingRecord(
            target={"defense_details": {defense: {"epsilon": epsilon}} if epsilon is not None else {}}, shadow={}
        ),
        attack=AttackRecord(
            scenario=scenario,
            attack_model=attack_model,
            encoder="pixels",
            distance="cosine",
            generations_per_query=2,
            query_access="text",
            strength=None,
            seed=seed,
            caption_source="ground_truth",
            captioner_fine_tuned=None,
            caption_exact_match=None,
            shadow_mode="aware",
            shadow_defense=defense,
            defense_aware_shadow=True,
            queries_spent=len(labels),
            images_generated=2 * len(labels),
            images_per_second=1.0,
            model_time_fraction=0.5,
            query_batch=8,
            shadow_queries_spent=len(labels),
            shadow_overlap_with_target_members=0,
            query_ids=[f"q{i}" for i in range(len(labels))],
            captions=["a caption"] * len(labels),
            labels=labels,
            scores=[[s] for s in scores],
            membership_scores=scores,
            predictions=predictions,
            shadow_fit=privacy,
        ),
        privacy=privacy,
        timings_s={"total": 1.0},
        peak_memory_mb=1.0,
        utility=utility,
    )
    return dataclasses.replace(record, **overrides)


MEMBERS = 250


def _scores(auc: float, tpr1: float, n_nonmembers: int) -> tuple[list[int], list[float]]:
    """Labels and scores whose AUC is `auc` and whose TPR above every non-member is `tpr1` (as near as feasible).

    Non-members score 0 .. n-1. A member earns half-steps h in [0, 2n]: h // 2
    non-members below it and, for odd h, a tie with the next one; h = 2n puts it
    above every non-member.
    """
    n, m = n_nonmembers, MEMBERS
    top = min(m, max(0, round(tpr1 * m)))
    rest = m - top
    wanted = round(auc * 2 * n * m) - top * 2 * n
    spread = min(max(wanted, 0), rest * (2 * n - 1))
    steps = [2 * n] * top + [spread // rest + (i < spread % rest) for i in range(rest)] if rest else [2 * n] * top
    members = [h / 2 - 0.5 if h % 2 == 0 else (h - 1) / 2 for h in steps]
    return [1] * m + [0] * n, members + [float(i) for i in range(n)]


def overfit_micro(tmp_path: Path, **changes: Any) -> RunConfig:
    """The micro profile fine-tuned long enough to memorise its 8 members (400 epochs at lr 3e-3), 32
    non-members per side: the recipe on which an undefended micro target clearly leaks."""
    config = profile("micro").replace(
        members=8,
        nonmembers=32,
        shadow_members=8,
        shadow_nonmembers=32,
        generations_per_query=3,
        finetune=TrainConfig(epochs=400, batch_size=8, learning_rate=3e-3),
        sampling=SamplingConfig(num_inference_steps=10),
        results_dir=tmp_path / "results",
        cache_dir=tmp_path / "cache",
    )
    return config.replace(**changes)


def tiny_sd_pipeline(corpus: list[str], *, sample_size: int = 8, latent_scale: int = 2, seed: int = 0) -> Any:
    """A randomly initialised, tiny but real `StableDiffusionPipeline` (VAE, CLIP text encoder, UNet).

    Save it with `save_pretrained` and load it with `load_model`, as a user's Stable
    Diffusion folder. The defaults give 16 px images (8 px latents); `sample_size=64,
    latent_scale=8` gives 512 px images from 64 px latents. Built by the package
    (`build_tiny_sd_pipeline`), which the GPU check (`benchmark.app.bench_gpu`) uses too.
    """
    return build_tiny_sd_pipeline(corpus, sample_size=sample_size, latent_scale=latent_scale, seed=seed)
