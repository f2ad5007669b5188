"""Result records for tests, built from the writer's own types (never by hand)."""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmark.pipeline.privacy_metrics import PrivacyMetrics, TprAtFpr
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
    """A small valid record; `overrides` replace top-level fields of the result."""

    def comp(name: str, **details: Any) -> ComponentRecord:
        return ComponentRecord(name=name, version="1", origin="test", details=details)

    labels = [1, 0] * n_nonmembers
    scores = [float(i % 7) + (0.5 if lab else 0.0) for i, lab in enumerate(labels)]
    privacy = PrivacyMetrics(
        auc=auc,
        balanced_accuracy=auc,
        tpr_at_fpr=tuple(
            TprAtFpr(
                target_fpr=fpr,
                tpr=tpr1 if fpr == 0.01 else tpr1 / 2,
                realised_fpr=0.0,
                threshold=1.0,
                n_nonmembers=n_nonmembers,
                supported=n_nonmembers >= 1 / fpr,
                ci=(0.0, min(1.0, tpr1 + 0.1)),
            )
            for fpr in (0.01, 0.001)
        ),
        n_members=n_nonmembers,
        n_nonmembers=n_nonmembers,
        auc_ci=(max(0.0, auc - 0.1), min(1.0, auc + 0.1)),
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
            predictions=labels,
            shadow_fit=privacy,
        ),
        privacy=privacy,
        timings_s={"total": 1.0},
        peak_memory_mb=1.0,
        utility=utility,
    )
    return dataclasses.replace(record, **overrides)
