"""One benchmark run, end to end: the pipeline of DESIGN.md in the order it happens.

data -> base model -> target fine-tune under a defense -> shadow fine-tune ->
black-box attack -> privacy metrics -> result record.
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from attacks.attack import AttackConfig, Query, fit_attack_model, score_queries
from attacks.attack_models import ATTACK_MODELS
from attacks.encoders import ENCODERS
from attacks.scenarios import CaptionSource
from benchmark.cache import cached
from benchmark.config import RunConfig
from benchmark.data.base import DATASETS, DatasetSpec, ImageTextDataset, images_to_tensor
from benchmark.data.splits import Splits, SplitSizes, make_splits, shadow_split
from benchmark.errors import ConfigError
from benchmark.finetune import TrainConfig, TrainReport
from benchmark.metrics import privacy_metrics
from benchmark.models.diffusion import DiffusionModel, load_model
from benchmark.models.registry import MODELS, BaseModel, BaseModelRequest
from benchmark.plugins import component_origin
from benchmark.progress import StageTimer
from benchmark.results import Metric, ResultRecord, new_run_id, provenance, write_record
from benchmark.target import BlackBoxTarget
from defenses import DEFENSES, Defense, resolve


@dataclass
class RunOutcome:
    record: ResultRecord
    path: Path


@dataclass
class FineTuned:
    model: DiffusionModel
    report: dict[str, Any]
    from_cache: bool


def run(config: RunConfig, *, console: Console | None = None, show_progress: bool = True) -> RunOutcome:
    """Run one configuration and write its result record.

    Nothing is written unless every stage succeeds, so an interrupted or failed
    run leaves no partial result.
    """
    config = config.validate()
    torch.manual_seed(config.seed)
    with StageTimer(console, show=show_progress) as timer:
        with timer.stage("data") as _:
            dataset = DATASETS.get(config.dataset)(
                DatasetSpec(config.dataset, config.resolution, config.dataset_path, config.dataset_size)
            )
            splits = make_splits(
                len(dataset),
                SplitSizes(
                    public=config.public if config.model == "tiny" else 0,
                    members=config.members,
                    nonmembers=config.nonmembers,
                    auxiliary=config.shadow_members + config.shadow_nonmembers,
                    utility=config.utility,
                ),
                public_seed=config.public_seed,
                seed=config.seed,
            )
            if config.scenario.caption_source is CaptionSource.CAPTIONER:
                raise ConfigError(
                    f"scenario {config.scenario.value} needs a captioner, which this version does not have yet; "
                    "use --scenario I or III"
                )
            shadow = shadow_split(
                splits,
                members=config.shadow_members,
                nonmembers=config.shadow_nonmembers,
                target_member_overlap=config.scenario.auxiliary_member_overlap,
                seed=config.seed,
            )
        defense = resolve(config.defense, config.defense_args)

        pretrain_steps = config.pretrain.epochs * -(-len(splits.public) // config.pretrain.batch_size)
        with timer.stage("base model", total=pretrain_steps if config.model == "tiny" else None) as advance:
            base = MODELS.get(config.model)(
                BaseModelRequest(
                    dataset=dataset,
                    public_indices=splits.public,
                    resolution=config.resolution,
                    pretrain=config.pretrain,
                    cache_dir=config.cache_path,
                    model_path=config.model_path,
                ),
                lambda step, total, loss: advance(info=f"loss {loss:.4f}"),
            )

        target = _fine_tune_stage(
            timer, "fine-tune target", config, base, defense, dataset, splits.members, seed=config.seed
        )
        shadow_model = _fine_tune_stage(
            timer, "fine-tune shadow", config, base, defense, dataset, shadow.members, seed=config.seed + 10_000
        )

        attack_config = AttackConfig(
            scenario=config.scenario,
            attack_model=config.attack_model,
            encoder=config.encoder,
            distance=config.distance,
            generations_per_query=config.generations_per_query,
            seed=config.seed,
        )
        encoder = ENCODERS.get(config.encoder)()
        target_queries, target_labels = _target_queries(dataset, splits, seed=config.seed)
        shadow_queries = [_query(dataset, i) for i in shadow.members + shadow.nonmembers]
        shadow_labels = np.r_[np.ones(len(shadow.members)), np.zeros(len(shadow.nonmembers))].astype(int)

        with timer.stage("attack: shadow", total=len(shadow_queries)) as advance:
            shadow_box = BlackBoxTarget.from_model(shadow_model.model, config.sampling, name="shadow")
            shadow_scores = score_queries(shadow_box, shadow_queries, attack_config, encoder=encoder, progress=advance)
            attack_model = fit_attack_model(attack_config, shadow_scores.scores, shadow_labels)
        with timer.stage("attack: target", total=len(target_queries)) as advance:
            target_box = BlackBoxTarget.from_model(target.model, config.sampling, name="target")
            target_scores = score_queries(target_box, target_queries, attack_config, encoder=encoder, progress=advance)
        membership = attack_model.membership_score(target_scores.scores)
        predictions = attack_model.predict(target_scores.scores)
        privacy = privacy_metrics(target_labels, membership, predictions)
        shadow_privacy = privacy_metrics(
            shadow_labels,
            attack_model.membership_score(shadow_scores.scores),
            attack_model.predict(shadow_scores.scores),
        )

        control = None
        if config.control:
            with timer.stage("attack: base model (control)", total=len(target_queries)) as advance:
                base_box = BlackBoxTarget.from_model(base.load(), config.sampling, name="base")
                base_scores = score_queries(base_box, target_queries, attack_config, encoder=encoder, progress=advance)
                control = privacy_metrics(
                    target_labels,
                    attack_model.membership_score(base_scores.scores),
                    attack_model.predict(base_scores.scores),
                )

    record = ResultRecord(
        run_id=new_run_id(config.defense, config.seed),
        provenance=provenance(),
        seeds={"seed": config.seed, "public_seed": config.public_seed, "shadow_seed": config.seed + 10_000},
        config=config.to_dict(),
        components={
            "dataset": {
                **dataset.describe(),
                "version": str(dataset.describe().get("version", "1")),
                "origin": component_origin(DATASETS, config.dataset),
            },
            "model": {
                **base.description,
                "origin": component_origin(MODELS, config.model),
                "from_cache": base.from_cache,
            },
            "defense": {**defense.describe(), "origin": component_origin(DEFENSES, config.defense)},
            "attack_model": {
                **attack_model.describe(),
                "version": "1",
                "origin": component_origin(ATTACK_MODELS, config.attack_model),
            },
            "encoder": {**encoder.describe(), "version": "1", "origin": component_origin(ENCODERS, config.encoder)},
        },
        splits={
            **{name: [dataset.ids[i] for i in idx] for name, idx in splits.as_dict().items()},
            "shadow_members": [dataset.ids[i] for i in shadow.members],
            "shadow_nonmembers": [dataset.ids[i] for i in shadow.nonmembers],
        },
        training={"target": target.report, "shadow": shadow_model.report},
        attack={
            **attack_config.to_dict(),
            "queries_spent": target_scores.queries_spent,
            "images_generated": target_scores.images_generated,
            "shadow_queries_spent": shadow_scores.queries_spent,
            "shadow_overlap_with_target_members": shadow.overlap_with_target_members,
            "defense_aware_shadow": True,
            "query_ids": target_scores.query_ids,
            "labels": [int(v) for v in target_labels],
            "scores": target_scores.scores.tolist(),
            "membership_scores": [float(v) for v in membership],
            "predictions": [int(v) for v in predictions],
            "shadow_fit": shadow_privacy.to_dict(),
        },
        privacy=privacy.to_dict(),
        control=control.to_dict() if control is not None else None,
        metrics=_headline_metrics(privacy, control),
        timings_s={k: round(v, 3) for k, v in timer.timings.items()},
        peak_memory_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        notes=_notes(privacy),
    )
    path = write_record(record, config.results_dir)
    return RunOutcome(record=record, path=path)


def _query(dataset: ImageTextDataset, index: int) -> Query:
    return Query(query_id=dataset.ids[index], image=dataset.image(index), caption=dataset.caption(index))


def _target_queries(dataset: ImageTextDataset, splits: Splits, *, seed: int) -> tuple[list[Query], np.ndarray]:
    """Members and non-members, shuffled so the query order carries no label."""
    indices = np.asarray(splits.members + splits.nonmembers)
    labels = np.r_[np.ones(len(splits.members)), np.zeros(len(splits.nonmembers))].astype(int)
    order = np.random.default_rng([seed, 11]).permutation(len(indices))
    return [_query(dataset, int(i)) for i in indices[order]], labels[order]


def _fine_tune_stage(
    timer: StageTimer,
    name: str,
    config: RunConfig,
    base: BaseModel,
    defense: Defense,
    dataset: ImageTextDataset,
    indices: tuple[int, ...],
    *,
    seed: int,
) -> FineTuned:
    train_config = TrainConfig(**{**config.finetune.to_dict(), "seed": seed})
    steps = train_config.epochs * -(-len(indices) // train_config.batch_size)
    inputs = {
        "base": str(base.model_dir),
        "base_description": base.description,
        "dataset": dataset.describe(),
        "ids": [dataset.ids[i] for i in indices],
        "train": train_config.to_dict(),
        "defense": defense.describe(),
        "torch": torch.__version__.split("+")[0],
    }
    with timer.stage(name, total=steps) as advance:

        def build(folder: Path) -> None:
            model = base.load()
            images = images_to_tensor([dataset.image(i) for i in indices])
            captions = [dataset.caption(i) for i in indices]
            result = defense.fine_tune(
                model=model,
                images=images,
                captions=captions,
                train_config=train_config,
                on_step=lambda step, total, loss: advance(info=f"loss {loss:.4f}"),
            )
            model.save(folder)
            report = _report_dict(result.report, train_config)
            report["defense_details"] = result.details
            (folder / "train_report.json").write_text(json.dumps(report, indent=2))

        def load(folder: Path) -> FineTuned:
            report = json.loads((folder / "train_report.json").read_text())
            return FineTuned(model=load_model(folder), report=report, from_cache=True)

        tuned, hit, _ = cached(config.cache_path, "finetuned", inputs, build, load)
        tuned.from_cache = hit
        tuned.report["from_cache"] = hit
    return tuned


def _report_dict(report: TrainReport, config: TrainConfig) -> dict[str, Any]:
    history = report.loss_history
    # Per-epoch means keep the record small while showing the training curve.
    per_epoch = max(1, len(history) // max(1, report.epochs_completed))
    curve = [float(np.mean(history[i : i + per_epoch])) for i in range(0, len(history), per_epoch)]
    return {
        "config": config.to_dict(),
        "steps": report.steps,
        "epochs_completed": report.epochs_completed,
        "final_loss": report.final_loss,
        "loss_per_epoch": curve,
        "notes": report.notes,
    }


def _headline_metrics(privacy, control) -> dict[str, Metric]:  # type: ignore[no-untyped-def]
    tpr1, tpr01 = privacy.tpr(0.01), privacy.tpr(0.001)
    metrics = {
        "attack_auc": Metric(privacy.auc, False, "ROC AUC of the attack on the target (0.5 = chance)"),
        "attack_tpr_at_1pct_fpr": Metric(tpr1.tpr, False, f"TPR at FPR <= 1% ({tpr1.n_nonmembers} non-members)"),
        "attack_tpr_at_0.1pct_fpr": Metric(tpr01.tpr, False, f"TPR at FPR <= 0.1% ({tpr01.n_nonmembers} non-members)"),
        "attack_balanced_accuracy": Metric(
            privacy.balanced_accuracy, False, "the paper's ASR, threshold fitted on the shadow"
        ),
    }
    if control is not None:
        metrics["control_auc_base_model"] = Metric(
            control.auc, False, "same attack on the base model before fine-tuning; should be near 0.5"
        )
    return metrics


def _notes(privacy) -> list[str]:  # type: ignore[no-untyped-def]
    notes = []
    for entry in privacy.tpr_at_fpr:
        if not entry.supported:
            notes.append(
                f"TPR at FPR {entry.target_fpr:g} is not supported by {entry.n_nonmembers} non-members "
                f"(needs >= {int(np.ceil(1 / entry.target_fpr))}); use --preset full"
            )
    return notes
